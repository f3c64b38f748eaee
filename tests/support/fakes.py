"""Test stand-ins that record what the code under test asked for."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from shared.core.jobtypes import QUEUES


class RecordingCelery:
    """Stands in for celery.Celery: records what the gateway revokes and asks; `sent` reads the
    wake-ups the gateway put on the broker (real Redis lists, in kombu's stored form)."""

    def __init__(self, consumed: tuple[str, ...] = (), broker: redis.Redis | None = None) -> None:
        self.broker = broker
        self.revoked: list[str] = []
        self.consumed = consumed
        self.control = self

    @property
    def sent(self) -> list[dict[str, Any]]:
        """Each waiting wake-up as {"name", "args", "queue"}, oldest first, queue by queue."""
        assert self.broker is not None, "pass the test's Redis client as `broker`"
        return [
            {
                "name": message["headers"]["task"],
                "args": json.loads(base64.b64decode(message["body"]))[0],
                "queue": message["properties"]["delivery_info"]["routing_key"],
            }
            for queue in QUEUES
            for message in map(json.loads, reversed(self.broker.lrange(queue, 0, -1)))
        ]

    def revoke(self, task_ids: str | list[str]) -> None:
        self.revoked += [task_ids] if isinstance(task_ids, str) else task_ids

    def inspect(self, timeout: float) -> RecordingCelery:
        return self

    def active_queues(self) -> dict[str, list[dict[str, str]]]:
        return {"worker@test": [{"name": name} for name in self.consumed]}
