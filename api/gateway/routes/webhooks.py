"""/v1/webhooks: the tenant's signing secret and default endpoint, and delivery attempts."""

from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from api.gateway.apidoc import Body, Reply, documented
from api.gateway.app import services
from api.gateway.auth import authenticate, current_tenant
from api.gateway.errors import ApiError
from api.gateway.limits import json_body
from api.gateway.submission import checked_webhook_url
from shared.core.batches import BatchStore
from shared.core.webhooks import (
    EVENTS,
    ROTATION_GRACE_S,
    WebhookStore,
    batch_subject,
    job_subject,
)

bp = Blueprint("webhooks", __name__, url_prefix="/v1/webhooks")
bp.before_request(authenticate)

MAX_PAGE = 200


def _hooks() -> WebhookStore:
    return WebhookStore(services().redis)


@bp.get("")
@documented({200: Reply("The default endpoint, whether a secret is set, the events sent")})
def get_webhooks() -> ResponseReturnValue:
    """The default endpoint, whether a signing secret exists, and the events sent."""
    hooks, tenant = _hooks(), current_tenant()
    return jsonify(
        {
            "endpoint": hooks.endpoint(tenant),
            "secret_set": hooks.has_secret(tenant),
            "events": list(EVENTS),
        }
    )


@bp.post("/secret")
@documented(
    {201: Reply("The new signing secret (shown once); the previous one still signs for a while")}
)
def rotate_secret() -> ResponseReturnValue:
    """Create or rotate the signing secret (`whsec_` + base64); 201 with it, the only time it
    is shown. After a rotation the previous secret also signs for 24 hours."""
    secret = _hooks().rotate_secret(current_tenant())
    response = jsonify({"secret": secret, "previous_secret_valid_for_s": ROTATION_GRACE_S})
    response.status_code = 201
    return response


@bp.put("/endpoint")
@documented(
    {
        200: Reply("The default endpoint after the request"),
        400: "The body is not JSON",
        422: "`url` is not an allowed http(s) URL (private and loopback targets are refused "
        "unless the operator allows them)",
    },
    body=Body(
        schema={
            "type": "object",
            "additionalProperties": False,
            "required": ["url"],
            "properties": {"url": {"type": ["string", "null"]}},
        }
    ),
)
def set_endpoint() -> ResponseReturnValue:
    """{"url": URL or null}: the endpoint for jobs and batches that name none of their own
    (from their submit on; null removes it). Needs a signing secret."""
    body = json_body()
    if not isinstance(body, dict) or "url" not in body:
        raise ApiError(422, "invalid_params", 'send {"url": URL or null}', "url")
    url = body["url"]
    if url is not None and not isinstance(url, str):
        raise ApiError(422, "invalid_params", "must be a URL string or null", "url")
    tenant = current_tenant()
    if url is not None:
        checked_webhook_url(tenant, url, "url")
    _hooks().set_endpoint(tenant, url)
    return get_webhooks()


@bp.get("/deliveries")
@documented(
    {
        200: Reply("Delivery attempts, newest first"),
        404: "No such job or batch (or another tenant's)",
        422: "A bad `limit`",
    },
    query={
        "job_id": {"schema": {"type": "string", "minLength": 1}},
        "batch_id": {"schema": {"type": "string", "minLength": 1}},
        "limit": {"schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
    },
)
def list_deliveries() -> ResponseReturnValue:
    """Deliveries with every attempt (time, HTTP status or error): of one job (`job_id`), one
    batch (`batch_id`), or the tenant's newest (`limit`, 1-200)."""
    svc, tenant, args = services(), current_tenant(), request.args
    hooks = _hooks()
    if "job_id" in args:
        if svc.jobs.get_for_tenant(tenant, args["job_id"]) is None:
            raise ApiError(404, "not_found", f"no job {args['job_id']}", "job_id")
        deliveries = hooks.for_subject(job_subject(args["job_id"]))
    elif "batch_id" in args:
        if BatchStore(svc.redis).get_for_tenant(tenant, args["batch_id"]) is None:
            raise ApiError(404, "not_found", f"no batch {args['batch_id']}", "batch_id")
        deliveries = hooks.for_subject(batch_subject(args["batch_id"]))
    else:
        try:
            limit = int(args.get("limit", "50"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_PAGE:
            raise ApiError(422, "invalid_params", f"limit must be 1 to {MAX_PAGE}", "limit")
        deliveries = hooks.for_tenant(tenant, limit)
    return jsonify({"deliveries": [d.out() for d in deliveries]})
