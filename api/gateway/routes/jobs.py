"""/v1/jobs: submit, list, get, cancel, progress events (SSE) and artifact downloads."""

from __future__ import annotations

import json
from collections.abc import Iterator

from flask import Blueprint, Response, jsonify, redirect, request, send_file, stream_with_context
from flask.typing import ResponseReturnValue

from api.gateway.apidoc import Body, Reply, documented
from api.gateway.app import services
from api.gateway.auth import authenticate, current_tenant
from api.gateway.errors import ApiError
from api.gateway.limits import json_body
from api.gateway.replies import EVENT_STREAM, artifact_content
from api.gateway.submission import idempotency_key, launch, prepare
from shared.core.jobs import STATES, Job
from shared.core.jobtypes import JOB_TYPES
from shared.core.retention import Deleter, NotFinished
from shared.core.schemas import ErrorBody, JobList, JobOut, SubmitRequest, job_out
from shared.core.storage import ObjectNotFound, artifact_key, content_type_for

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
bp.before_request(authenticate)

MAX_PAGE = 200
SSE_KEEPALIVE_S = 15.0
NOT_FOUND = "No such job (or another tenant's)"


def _job_or_404(job_id: str) -> Job:
    job = services().jobs.get_for_tenant(current_tenant(), job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id}")
    return job


@bp.post("")
@documented(
    {
        202: Reply("Created and queued", JobOut, headers={"Location": "The job's URL"}),
        200: Reply(
            "Idempotent replay: the job first created with this key",
            JobOut,
            headers={"Location": "The job's URL", "Idempotent-Replayed": "`true`"},
        ),
        400: "The body is not JSON, or not a JSON object",
        404: "A referenced job or upload does not exist (or is another tenant's); "
        "`error.field` names it",
        409: "The idempotency key was used before with other parameters",
        413: "The body is over {settings.max_upload_bytes} bytes (the upload limit) and 64 KiB",
        422: "Invalid parameters; `error.field` names the first bad one and `error.details` "
        "lists all. Beyond the schema: `end_s` must be greater than `start_s`; a referenced job "
        "must have succeeded with the artifacts the job needs, an upload must be of the right "
        "kind, and an extension must fit the model's context; the Idempotency-Key header and "
        "`idempotency_key` must agree",
        429: Reply(
            "Over a quota; `error.field` names it: `submits_per_minute` (rate limit), "
            "`max_queued`, `storage_bytes`, `audio_seconds_per_day` or "
            "`finetune_gpu_seconds_per_day`; `Retry-After` says when to try again where waiting "
            "helps",
            ErrorBody,
            headers={"Retry-After": "Seconds to wait (rate limit and daily quotas)"},
        ),
        503: "The job queue is unreachable; nothing was queued",
    },
    headers={
        "Idempotency-Key": {
            "description": "Like `idempotency_key` in the body (surrounding spaces ignored)",
            "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"},
        }
    },
    body=Body(SubmitRequest),
)
def submit() -> ResponseReturnValue:
    """Validate, record (state queued) and enqueue a job; 202 with the job.

    With an idempotency key (header `Idempotency-Key` or body `idempotency_key`) a repeated
    submit answers 200 with the first job and enqueues nothing.
    """
    tenant = current_tenant()
    prepared = prepare(tenant, json_body())
    job, created = launch(prepared, tenant, idempotency_key(prepared.submission.idempotency_key))
    response = jsonify(job_out(job))
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if created:
        response.status_code = 202
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.get("")
@documented(
    {
        200: Reply("The page of jobs, newest first", JobList),
        422: "A bad `state`, `type`, `limit` or `cursor` (one this listing did not hand out)",
    },
    query={
        "state": {"schema": {"enum": list(STATES)}},
        "type": {"schema": {"enum": list(JOB_TYPES)}},
        "limit": {"schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50}},
        "cursor": {
            "description": "`next_cursor` of the previous page",
            "schema": {"type": "string", "minLength": 1},
        },
    },
)
def list_jobs() -> ResponseReturnValue:
    """The tenant's jobs, newest first; filters `state`, `type`; pages by `limit`, `cursor`."""
    args = request.args
    state, job_type = args.get("state"), args.get("type")
    if state is not None and state not in STATES:
        raise ApiError(422, "invalid_params", f"state must be one of {list(STATES)}", "state")
    if job_type is not None and job_type not in JOB_TYPES:
        raise ApiError(422, "invalid_params", f"type must be one of {list(JOB_TYPES)}", "type")
    try:
        limit = int(args.get("limit", "50"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(422, "invalid_params", f"limit must be 1 to {MAX_PAGE}", "limit")
    try:
        jobs, cursor = services().jobs.list(
            current_tenant(), state=state, type=job_type, limit=limit, cursor=args.get("cursor")
        )
    except ValueError as error:
        raise ApiError(422, "invalid_params", str(error), "cursor") from None
    return jsonify({"jobs": [job_out(job) for job in jobs], "next_cursor": cursor})


@bp.get("/<job_id>")
@documented({200: Reply("The job", JobOut), 404: NOT_FOUND})
def get_job(job_id: str) -> ResponseReturnValue:
    """The job: its state, progress, error and artifacts."""
    return jsonify(job_out(_job_or_404(job_id)))


@bp.post("/<job_id>/cancel")
@documented({200: Reply("The job after the request", JobOut), 404: NOT_FOUND})
def cancel_job(job_id: str) -> ResponseReturnValue:
    """Queued → cancelled at once (it leaves the scheduler, so it never starts); running → its
    worker is told to stop and the job ends `cancelled` shortly; finished jobs are returned
    unchanged."""
    _job_or_404(job_id)
    return jsonify(job_out(services().jobs.cancel(job_id)))


@bp.delete("/<job_id>")
@documented(
    {
        204: Reply("Deleted: the record, its artifacts and its webhook state"),
        404: NOT_FOUND,
        409: "The job has not finished: cancel it first",
    }
)
def delete_job(job_id: str) -> ResponseReturnValue:
    """Delete a finished job: its record, artifacts and webhook state go (204). A queued or
    running job is a 409: cancel it first. Another tenant's job is a 404."""
    svc = services()
    try:
        found = Deleter(svc.redis, svc.store).delete_job(current_tenant(), job_id)
    except NotFinished as error:
        raise ApiError(409, "conflict", str(error)) from None
    if not found:
        raise ApiError(404, "not_found", f"no job {job_id}")
    return "", 204


@bp.get("/<job_id>/events")
@documented(
    {200: Reply("The event stream", content={"text/event-stream": EVENT_STREAM}), 404: NOT_FOUND}
)
def job_events(job_id: str) -> ResponseReturnValue:
    """Server-Sent Events: `state` and `progress` events (data = {"event", "job"}), starting
    with the current state and ending after a terminal one; comments keep idle streams open."""
    _job_or_404(job_id)
    events = services().jobs.events(job_id, idle_s=SSE_KEEPALIVE_S)

    def stream() -> Iterator[str]:
        for event in events:
            if event is None:
                yield ": keep-alive\n\n"
                continue
            payload = {"event": event["event"], "job": job_out(event["job"])}
            yield f"event: {event['event']}\ndata: {json.dumps(payload)}\n\n"

    return Response(
        stream_with_context(stream()),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@bp.get("/<job_id>/artifacts/<name>")
@documented(
    {
        200: Reply("The artifact's bytes (local store)", content=artifact_content()),
        302: Reply(
            "To a presigned URL of the artifact (S3 store)", headers={"Location": "The URL"}
        ),
        404: "No such job (or another tenant's), or the job has no such artifact",
    }
)
def get_artifact(job_id: str, name: str) -> ResponseReturnValue:
    """302 to a presigned URL (S3), or the bytes streamed (local store)."""
    job = _job_or_404(job_id)
    if name not in job.artifacts:
        raise ApiError(404, "not_found", f"job {job_id} has no artifact {name!r}")
    store = services().store
    key = artifact_key(job.tenant, job.id, name)
    url = store.presigned_url(key)
    if url is not None:
        return redirect(url, code=302)
    try:
        stream = store.open(key)
    except ObjectNotFound:
        raise ApiError(404, "not_found", f"artifact {name!r} is missing from the store") from None
    return send_file(
        stream, mimetype=content_type_for(name), as_attachment=True, download_name=name
    )
