"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from api.gateway.apidoc import Reply, documented
from api.gateway.app import services
from api.gateway.errors import ApiError
from api.gateway.replies import Health, Readiness
from shared.core.queueing import QUEUES, consumed_queues
from shared.core.storage import StorageError

bp = Blueprint("health", __name__)

WORKER_REPLY_TIMEOUT_S = 1.0


@bp.get("/healthz")
@documented({200: Reply("The process is alive", Health)})
def healthz() -> ResponseReturnValue:
    """The process answers."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@documented(
    {
        200: Reply(
            "Redis and the object store answer, and each named queue has a worker", Readiness
        ),
        422: "`queues` names an unknown queue",
        503: Reply("Not ready; `checks` says what failed", Readiness),
    },
    query={
        "queues": {
            "description": f"Comma-separated queues ({', '.join(QUEUES)}) that must have a live "
            "worker; empty names are ignored",
            "schema": {
                "type": "string",
                "pattern": "^(?:(?:{0})?,)*(?:{0})?$".format("|".join(QUEUES)),
            },
        }
    },
)
def readyz() -> ResponseReturnValue:
    """Redis and the object store reachable, and for each queue whether a worker consumes it.

    Workers are found by asking them over the broker (Celery `inspect active_queues`, waiting
    up to a second for replies). Ready (200) needs Redis and the store; `?queues=gpu,cpu` also
    requires a live consumer on each named queue (e.g. a launcher waiting for its workers).
    """
    required = [name for name in request.args.get("queues", "").split(",") if name]
    unknown = sorted(set(required) - set(QUEUES))
    if unknown:
        raise ApiError(422, "invalid_params", f"unknown queue(s) {unknown}", "queues")
    svc = services()
    redis_error = store_error = None
    try:
        svc.redis.ping()
    except Exception as error:  # whatever the client raises, Redis is not usable: say why
        redis_error = str(error)
    try:
        svc.store.check()
    except StorageError as error:
        store_error = str(error)
    consumed = (
        consumed_queues(svc.celery, timeout_s=WORKER_REPLY_TIMEOUT_S)
        if redis_error is None
        else dict.fromkeys(QUEUES, False)
    )
    ready = redis_error is None and store_error is None and all(consumed[name] for name in required)
    checks = {
        "redis": {"ok": redis_error is None, "error": redis_error},
        "store": {"ok": store_error is None, "error": store_error},
        "queues": {name: {"consumers": live} for name, live in consumed.items()},
    }
    response = jsonify({"status": "ready" if ready else "not_ready", "checks": checks})
    response.status_code = 200 if ready else 503
    return response
