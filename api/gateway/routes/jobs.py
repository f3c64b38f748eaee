"""/v1/jobs: submit, list, get, cancel, progress events (SSE) and artifact downloads."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify, redirect, request, send_file, stream_with_context
from flask.typing import ResponseReturnValue

from api.gateway.apidoc import Body, Reply, documented
from api.gateway.app import services
from api.gateway.auth import authenticate, current_tenant
from api.gateway.errors import ApiError
from api.gateway.replies import EVENT_STREAM, artifact_content
from shared.core.inpaint import GapError, plan_gap
from shared.core.jobs import STATES, Job, Upload
from shared.core.queueing import enqueue, revoke
from shared.core.schemas import (
    AUDIO_ARTIFACTS,
    PARAMS_FOR_TYPE,
    DecodeParams,
    EncodeParams,
    ExtendParams,
    InpaintParams,
    InvalidRequest,
    JobList,
    JobOut,
    SubmitRequest,
    TranscribeParams,
    job_out,
    parse_submit,
)
from shared.core.storage import ObjectNotFound, artifact_key, content_type_for
from shared.core.tokens import FRAMES_PER_SECOND

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
bp.before_request(authenticate)

MAX_PAGE = 200
CONTEXT_POSITIONS = 8192  # HeartMuLa's context: prompt + song frames
MIN_PROMPT_ROWS = 6  # BOS <tags> EOS, the muq slot, BOS EOS: the shortest possible prompt
SSE_KEEPALIVE_S = 15.0
NOT_FOUND = "No such job (or another tenant's)"


def _job_or_404(job_id: str) -> Job:
    job = services().jobs.get_for_tenant(current_tenant(), job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id}")
    return job


def _json_body() -> Any:
    """The request's JSON (whatever its Content-Type claims); 400 when it does not parse."""
    try:
        return json.loads(request.get_data(cache=False) or b"null")
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {error}") from None


def _source_job(tenant: str, job_id: str, field: str, *needs: tuple[str, ...]) -> Job:
    """A finished job of this tenant (404 if not theirs) holding, for each group in `needs`,
    one of its artifacts (422 if not)."""
    source = services().jobs.get_for_tenant(tenant, job_id)
    if source is None:
        raise ApiError(404, "not_found", f"no job {job_id}", field)
    for names in needs:
        if source.state != "succeeded" or not any(n in source.artifacts for n in names):
            raise ApiError(
                422,
                "invalid_params",
                f"job {source.id} has no {' or '.join(names)} (state {source.state})",
                field,
            )
    return source


def _song_frames(source: Job) -> int:
    """Frames of a finished job's tokens.npy (read from the store: a few kilobytes)."""
    data = services().store.get_bytes(artifact_key(source.tenant, source.id, "tokens.npy"))
    return int(np.load(io.BytesIO(data), allow_pickle=False).shape[1])


def _check_extension_fits(song_frames: int, params: ExtendParams) -> None:
    """Refuse at once what cannot fit the model's context (the worker re-checks exactly,
    with the real prompt length)."""
    new_frames = round(params.duration_s * 1000) // 80
    room = CONTEXT_POSITIONS - MIN_PROMPT_ROWS - song_frames
    if new_frames > room:
        raise ApiError(
            422,
            "invalid_params",
            f"the song has {song_frames} frames; with the prompt at most {max(room, 0)} new "
            f"frames ({max(room, 0) * 0.08:.2f} s) fit the {CONTEXT_POSITIONS}-position context",
            "params.duration_s",
        )


def _inherit_prompt(params: Any, parent: Job | None) -> None:
    """Extend/inpaint: tags and lyrics default to the parent job's."""
    inherited = parent.params if parent is not None else {}
    if params.tags is None:
        params.tags = inherited.get("tags")
        if params.tags is None:
            raise ApiError(
                422, "invalid_params", "the source has no tags to reuse; give tags", "params.tags"
            )
    if params.lyrics is None:
        params.lyrics = inherited.get("lyrics", "")


def _check_inputs(tenant: str, params: Any) -> Job | None:
    """Referenced jobs and uploads must be this tenant's (else 404) and usable (else 422).

    Returns the parent job the new one builds on, if any; fills inherited params in place.
    """
    source_id = getattr(params, "source_job_id", None)
    parent = None
    if isinstance(params, DecodeParams | ExtendParams) and source_id is not None:
        parent = _source_job(tenant, source_id, "params.source_job_id", ("tokens.npy",))
        if isinstance(params, ExtendParams):
            _check_extension_fits(_song_frames(parent), params)
    elif isinstance(params, InpaintParams):
        parent = _source_job(
            tenant, source_id, "params.source_job_id", ("tokens.npy",), AUDIO_ARTIFACTS
        )
        try:
            plan_gap(params.start_s, params.end_s, _song_frames(parent))
        except GapError as error:
            raise ApiError(422, "invalid_params", str(error), f"params.{error.field}") from None
    elif isinstance(params, TranscribeParams) and source_id is not None:
        parent = _source_job(tenant, source_id, "params.source_job_id", AUDIO_ARTIFACTS)
    if isinstance(params, DecodeParams) and source_id is None:
        _upload_of_kind(tenant, params.tokens_upload_id, "tokens", "params.tokens_upload_id")
    if isinstance(params, EncodeParams | ExtendParams | TranscribeParams) and params.upload_id:
        upload = _upload_of_kind(tenant, params.upload_id, "audio", "params.upload_id")
        if isinstance(params, ExtendParams):
            _check_extension_fits(int(upload.duration_s * FRAMES_PER_SECOND) + 1, params)
    if isinstance(params, ExtendParams | InpaintParams):
        _inherit_prompt(params, parent)
    return parent


def _upload_of_kind(tenant: str, upload_id: str | None, kind: str, field: str) -> Upload:
    upload = services().uploads.get_for_tenant(tenant, upload_id or "")
    if upload is None:
        raise ApiError(404, "not_found", f"no upload {upload_id}", field)
    if upload.kind != kind:
        raise ApiError(
            422, "invalid_params", f"upload {upload.id} is {upload.kind}, not {kind}", field
        )
    return upload


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
    svc = services()
    tenant = current_tenant()
    try:
        submission, params = parse_submit(_json_body(), svc.settings)
    except InvalidRequest as error:
        # a body that is not an object is malformed (400); a bad field is invalid (422)
        if error.field is None:
            api_error = ApiError(400, "bad_request", error.message)
        else:
            api_error = ApiError(422, "invalid_params", error.message, error.field)
        api_error.extra["details"] = error.details
        raise api_error from None
    key = _idempotency_key(submission.idempotency_key)
    parent = _check_inputs(tenant, params)
    # An extend of an uploaded song waits for an encode job of that upload (its parent).
    first_step = None
    if isinstance(params, ExtendParams) and params.upload_id is not None:
        first_step = Job.new(tenant, "encode", {"upload_id": params.upload_id})
        parent = first_step
    job = Job.new(
        tenant, submission.type, params.model_dump(), parent_job_id=parent.id if parent else None
    )
    if first_step is not None:
        job.stage, job.message = "waiting", f"waiting for encode job {first_step.id}"
    if key is None:
        svc.jobs.create(job)
    else:
        job, created = svc.jobs.create_idempotent(job, key)
        if not created:
            if (job.type, job.params) != (submission.type, params.model_dump()):
                raise ApiError(
                    409,
                    "idempotency_conflict",
                    f"idempotency key already used for job {job.id} with other parameters",
                    "idempotency_key",
                )
            response = jsonify(job_out(job))
            response.headers["Location"] = f"/v1/jobs/{job.id}"
            response.headers["Idempotent-Replayed"] = "true"
            return response
    if first_step is not None:
        svc.jobs.create(first_step)
        svc.jobs.add_dependent(first_step.id, job.id)
    try:
        enqueue(svc.celery, first_step or job)
    except Exception as error:  # broker unreachable: the job must not sit queued forever
        for unqueued in filter(None, (first_step, job)):
            svc.jobs.fail(unqueued.id, "enqueue_failed", f"could not queue the job: {error}")
        raise ApiError(503, "unavailable", "the job queue is unreachable; try again") from error
    response = jsonify(job_out(job))
    response.status_code = 202
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return response


def _idempotency_key(from_body: str | None) -> str | None:
    header = request.headers.get("Idempotency-Key")
    if header is not None and not 1 <= len(header.strip()) <= 200:
        raise ApiError(422, "invalid_params", "must be 1 to 200 characters", "Idempotency-Key")
    header = header.strip() if header is not None else None
    if header and from_body and header != from_body:
        raise ApiError(
            422,
            "invalid_params",
            "the Idempotency-Key header and idempotency_key differ",
            "idempotency_key",
        )
    return header or from_body


@bp.get("")
@documented(
    {
        200: Reply("The page of jobs, newest first", JobList),
        422: "A bad `state`, `type`, `limit` or `cursor` (one this listing did not hand out)",
    },
    query={
        "state": {"schema": {"enum": list(STATES)}},
        "type": {"schema": {"enum": list(PARAMS_FOR_TYPE)}},
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
    if job_type is not None and job_type not in PARAMS_FOR_TYPE:
        raise ApiError(
            422, "invalid_params", f"type must be one of {list(PARAMS_FOR_TYPE)}", "type"
        )
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
    """Queued → cancelled at once (and its message revoked); running → its worker is told to
    stop and the job ends `cancelled` shortly; finished jobs are returned unchanged."""
    svc = services()
    before = _job_or_404(job_id)
    job = svc.jobs.cancel(job_id)
    if before.state == "queued" and job.state == "cancelled":
        revoke(svc.celery, job_id)
    return jsonify(job_out(job))


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
