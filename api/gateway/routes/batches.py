"""/v1/batches: many jobs in one submit, with per-item results as JSONL.

Every item is a submit body (plus an optional `custom_id`) and goes through the same
prepare/launch steps as POST /v1/jobs; all items are validated first, so an invalid batch is
refused whole, naming every bad item (`items[i].params.field`), with nothing queued.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request, stream_with_context
from flask.typing import ResponseReturnValue

from api.gateway.apidoc import Body, Reply, documented
from api.gateway.app import services
from api.gateway.auth import authenticate, current_tenant
from api.gateway.errors import ApiError
from api.gateway.limits import json_depth
from api.gateway.submission import (
    Prepared,
    admit,
    idempotency_key,
    prepare,
    record,
    webhook_target,
)
from shared.core.batches import Batch, BatchStore, batch_out
from shared.core.schemas import ErrorBody
from shared.core.webhooks import WebhookStore, batch_subject

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")
bp.before_request(authenticate)

JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/jsonlines")
MAX_PAGE = 100
BATCH_NOT_FOUND = "No such batch (or another tenant's)"
MAX_DETAILS = 1000  # bad items named in one refusal
CUSTOM_ID_CHARS = 200


def _store() -> BatchStore:
    return BatchStore(services().redis)


def _batch_or_404(batch_id: str) -> Batch:
    batch = _store().get_for_tenant(current_tenant(), batch_id)
    if batch is None:
        raise ApiError(404, "not_found", f"no batch {batch_id}")
    return batch


def _out(batch: Batch) -> dict[str, Any]:
    return batch_out(batch, _store().status(batch.id))


def _parse_json(data: bytes) -> Any:
    depth_limit = services().settings.max_json_depth
    if json_depth(data) > depth_limit:
        raise ValueError(f"nests deeper than {depth_limit} levels (HEARTCLUSTER_MAX_JSON_DEPTH)")
    return json.loads(data)


def _read_request() -> tuple[list[Any], dict[str, Any]]:
    """(items, options): a JSON object {"items": [...], "webhook_url", "idempotency_key"}, or
    JSONL (one item a line) as the body or as a multipart `file`, options then in the query
    string or form fields."""
    settings = services().settings
    file = request.files.get("file") if request.mimetype == "multipart/form-data" else None
    data = file.read() if file is not None else request.get_data(cache=False)
    if request.content_length is None and len(data) >= settings.max_batch_bytes:
        raise ApiError(
            413,
            "too_large",
            f"the body is {settings.max_batch_bytes} bytes or more; less allowed "
            "(HEARTCLUSTER_MAX_BATCH_BYTES)",
        )
    if file is None and request.mimetype not in JSONL_TYPES:
        try:
            body = _parse_json(data or b"null")
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, "malformed_json", f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object with `items`")
        unknown = sorted(set(body) - {"items", "webhook_url", "idempotency_key"})
        if unknown:
            raise ApiError(422, "invalid_params", "unknown field", unknown[0])
        options = {k: v for k, v in body.items() if k != "items"}
        return body.get("items"), options
    items: list[Any] = []
    for number, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        try:
            items.append(_parse_json(line))
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(
                400, "malformed_json", f"line {number + 1} is not valid JSON: {error}", "items"
            ) from None
    source = request.form if file is not None else request.args
    options = {k: source[k] for k in ("webhook_url", "idempotency_key") if k in source}
    return items, options


def _prepare_items(tenant: str, items: Any) -> list[tuple[str | None, Prepared]]:
    """Every item validated (as POST /v1/jobs would) before anything is created."""
    limit = services().settings.max_batch_items
    if not isinstance(items, list) or not items:
        raise ApiError(422, "invalid_params", "must be a non-empty list of submit bodies", "items")
    if len(items) > limit:
        raise ApiError(
            422,
            "invalid_params",
            f"{len(items)} items; at most {limit} allowed (HEARTCLUSTER_MAX_BATCH_ITEMS)",
            "items",
        )
    problems: list[dict[str, str]] = []
    bad: list[int] = []
    prepared: list[tuple[str | None, Prepared]] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        where = f"items[{index}]"
        found = _item_problems(item, where, seen, index)
        if not found:
            body = {k: v for k, v in item.items() if k != "custom_id"}
            try:
                prepared.append((item.get("custom_id"), prepare(tenant, body)))
            except ApiError as error:
                details = error.extra.get("details") or [
                    {"field": error.field, "message": error.message}
                ]
                found = [
                    {
                        "field": f"{where}.{d['field']}" if d["field"] else where,
                        "message": d["message"],
                    }
                    for d in details
                ]
        if found:
            bad.append(index)
            problems += found
    if bad:
        error = ApiError(
            422,
            "invalid_items",
            f"{len(bad)} of {len(items)} items are invalid; nothing was queued",
            problems[0]["field"],
        )
        error.extra["details"] = problems[:MAX_DETAILS]
        error.extra["invalid_items"] = bad
        raise error
    return prepared


def _item_problems(item: Any, where: str, seen: dict[str, int], index: int) -> list[dict]:
    if not isinstance(item, dict):
        return [{"field": where, "message": "must be a JSON object (a submit body)"}]
    problems = []
    custom_id = item.get("custom_id")
    if custom_id is not None:
        if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= CUSTOM_ID_CHARS:
            message = f"must be a string of 1 to {CUSTOM_ID_CHARS} characters"
            problems.append({"field": f"{where}.custom_id", "message": message})
        elif custom_id in seen:
            message = f"repeats items[{seen[custom_id]}].custom_id; they must be unique"
            problems.append({"field": f"{where}.custom_id", "message": message})
        else:
            seen[custom_id] = index
    if item.get("idempotency_key") is not None:
        message = "items take no idempotency key; give the batch one"
        problems.append({"field": f"{where}.idempotency_key", "message": message})
    return problems


@bp.post("")
@documented(
    {
        202: Reply("Created: every item recorded, queued in order by the workers"),
        200: Reply("Idempotent replay: the batch first created with this key"),
        400: "The body is not JSON or JSONL, or not an object with `items`",
        409: "The idempotency key was used before with other items, or that batch is still "
        "being created",
        413: "The body is over the batch body limit",
        415: "Neither JSON, JSONL nor a multipart `file`",
        429: Reply(
            "Over a quota, counting all the items (`error.field` names it, as for POST "
            "/v1/jobs); `Retry-After` says when to try again where waiting helps",
            ErrorBody,
            headers={"Retry-After": "Seconds to wait (rate limit and daily quotas)"},
        ),
        422: "Invalid items (refused whole: `error.details` names each `items[i].field`), or a "
        "bad `webhook_url` / `idempotency_key`",
    },
    body=Body(
        media_type="application/json",
        schema={
            "type": "object",
            "additionalProperties": False,
            "required": ["items"],
            "properties": {
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "description": "A submit body (SubmitRequest) with an optional `custom_id`",
                    },
                },
                "webhook_url": {"type": "string"},
                "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 200},
            },
        },
    ),
)
def create_batch() -> ResponseReturnValue:
    """Submit up to HEARTCLUSTER_MAX_BATCH_ITEMS jobs at once; 202 with the batch.

    Body: {"items": [submit bodies, each with an optional unique `custom_id`], "webhook_url",
    "idempotency_key"}, or JSONL items (Content-Type application/jsonl, or a multipart `file`)
    with `webhook_url` / `idempotency_key` as query or form fields. The `webhook_url` receives
    `batch.completed`; items may name their own for their job events. An invalid item refuses
    the whole batch (422 `invalid_items`, `details` naming each bad field). A repeated
    idempotency key answers 200 with the first batch.
    """
    tenant = current_tenant()
    items, options = _read_request()
    url = options.get("webhook_url")
    if url is not None and not isinstance(url, str):
        raise ApiError(422, "invalid_params", "must be a URL string", "webhook_url")
    body_key = options.get("idempotency_key")
    if body_key is not None and (not isinstance(body_key, str) or not 1 <= len(body_key) <= 200):
        raise ApiError(422, "invalid_params", "must be 1 to 200 characters", "idempotency_key")
    key = idempotency_key(body_key)
    webhook_url = webhook_target(tenant, url, "webhook_url")
    prepared = _prepare_items(tenant, items)
    admit(tenant, [item for _, item in prepared])
    digest = hashlib.sha256(json.dumps([items, webhook_url], sort_keys=True).encode()).hexdigest()
    store = _store()
    batch = Batch.new(tenant, len(prepared), digest, webhook_url)
    if key is not None:
        existing = store.claim_idempotency_key(tenant, key, batch.id)
        if existing is not None:
            return _replay(existing, digest)
    items_out: list[tuple[str | None, str]] = []
    to_send: list[str] = []
    transaction = services().redis.pipeline(transaction=True)
    for custom_id, item in prepared:
        job, to_queue = record(item, tenant, None, transaction, priority="batch")
        items_out.append((custom_id, job.id))
        to_send.append((to_queue or job).id)
    if webhook_url is not None:
        WebhookStore(services().redis).watch(batch_subject(batch.id), webhook_url, transaction)
    transaction.execute()
    # the workers send the Celery messages (see workers/background.py): thousands take a
    # while, and an HTTP request must not
    store.create(batch, items_out, to_send)
    response = jsonify(_out(batch))
    response.status_code = 202
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    return response


def _replay(batch_id: str, digest: str) -> ResponseReturnValue:
    batch = _store().get(batch_id)
    if batch is None:
        raise ApiError(409, "conflict", "a batch with this idempotency key is being created")
    if batch.request_hash != digest:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"idempotency key already used for batch {batch.id} with other items",
            "idempotency_key",
        )
    response = jsonify(_out(batch))
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.get("")
@documented(
    {200: Reply("The tenant's batches, newest first"), 422: "A bad `limit` or `before`"},
    query={
        "limit": {"schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
        "before": {"schema": {"type": "number"}, "description": "A batch's `created_at`"},
    },
)
def list_batches() -> ResponseReturnValue:
    """The tenant's batches, newest first; `limit` (1-100), `before` (a created_at) pages on."""
    try:
        limit = int(request.args.get("limit", "20"))
        before = float(request.args["before"]) if "before" in request.args else None
    except ValueError:
        raise ApiError(422, "invalid_params", "limit and before must be numbers", "limit") from None
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(422, "invalid_params", f"limit must be 1 to {MAX_PAGE}", "limit")
    batches = _store().list(current_tenant(), limit, before)
    return jsonify({"batches": [_out(batch) for batch in batches]})


@bp.get("/<batch_id>")
@documented({200: Reply("The batch: counts per state and progress"), 404: BATCH_NOT_FOUND})
def get_batch(batch_id: str) -> ResponseReturnValue:
    """Counts per state, progress (0-100 over all items) and state: in_progress, cancelling,
    completed or cancelled."""
    return jsonify(_out(_batch_or_404(batch_id)))


@bp.get("/<batch_id>/results")
@documented(
    {
        200: Reply(
            "One JSON line per item, in submit order",
            content={"application/jsonl": {"schema": {"type": "string"}}},
        ),
        404: BATCH_NOT_FOUND,
    }
)
def batch_results(batch_id: str) -> ResponseReturnValue:
    """JSONL, one line per item in submit order: index, custom_id, job_id, state, error and
    artifact URLs (state `deleted` for a job deleted since)."""
    batch = _batch_or_404(batch_id)
    base = request.host_url.rstrip("/")
    items = _store().items(batch.id)

    def lines() -> Iterator[str]:
        for item in items:
            job = item.job
            urls = {
                name: f"{base}/v1/jobs/{item.job_id}/artifacts/{name}"
                for name in (job.artifacts if job else [])
            }
            line = {
                "index": item.index,
                "custom_id": item.custom_id,
                "job_id": item.job_id,
                "state": job.state if job else "deleted",
                "error": job.error if job else None,
                "artifacts": urls,
            }
            yield json.dumps(line) + "\n"

    return Response(stream_with_context(lines()), mimetype="application/jsonl")


@bp.post("/<batch_id>/cancel")
@documented({200: Reply("The batch after the request"), 404: BATCH_NOT_FOUND})
def cancel_batch(batch_id: str) -> ResponseReturnValue:
    """Cancel every item that has not finished: queued ones at once, running ones stop within
    a frame; finished items keep their results. Answers with the batch."""
    svc = services()
    batch = _store().request_cancel(_batch_or_404(batch_id))
    for job_id in _store().job_ids(batch.id):
        svc.jobs.cancel(job_id)  # a queued one also leaves the scheduler: it never starts
    return jsonify(_out(batch))
