"""Reply bodies that only the gateway builds (probes, progress events, artifact files), described
for the OpenAPI document; the job and upload bodies live in shared/core/schemas.py."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from shared.core.schemas import JobOut
from shared.core.storage import CONTENT_TYPES, content_type_for


class Health(BaseModel):
    status: Literal["ok"]


class ServiceCheck(BaseModel):
    ok: bool
    error: str | None = Field(description="Why the service is not usable; null when ok.")


class QueueCheck(BaseModel):
    consumers: bool = Field(description="Whether a live worker consumes the queue.")


class ReadinessChecks(BaseModel):
    redis: ServiceCheck
    store: ServiceCheck
    queues: dict[str, QueueCheck]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: ReadinessChecks


EventName = Literal["state", "progress"]


class JobEvent(BaseModel):
    """The data line of one Server-Sent Event: the job as it is after the change."""

    event: EventName
    job: JobOut


# One event of the stream (the schema of a text/event-stream entry describes each event, as
# OpenAPI 3.2's itemSchema does); keep-alive comments are not events.
EVENT_STREAM: dict[str, Any] = {
    "schema": {
        "type": "object",
        "description": "One event: `state` or `progress`, its data a JobEvent. The stream starts "
        "with the job's current state and ends after a terminal one; `: keep-alive` comments "
        "keep an idle stream open.",
        "required": ["event", "data"],
        "properties": {
            "event": {"enum": list(get_args(EventName))},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": JobEvent,
            },
        },
    },
}


def artifact_content() -> dict[str, dict[str, Any]]:
    """Media type → which artifacts are served with it (content_type_for, by extension)."""
    names: dict[str, list[str]] = {}
    for extension, content_type in CONTENT_TYPES.items():
        names.setdefault(content_type.split(";")[0], []).append(f"*{extension}")
    names.setdefault(content_type_for(""), []).append("any other name")
    return {
        media_type: {"schema": {"description": "Artifacts named " + ", ".join(found)}}
        for media_type, found in names.items()
    }
