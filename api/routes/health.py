"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from api.app import services
from api.errors import ApiError
from shared.queueing import QUEUES, consumed_queues
from shared.storage import StorageError

bp = Blueprint("health", __name__)

WORKER_REPLY_TIMEOUT_S = 1.0


@bp.get("/healthz")
def healthz():
    """The process answers."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
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
    checks: dict[str, object] = {}
    try:
        svc.redis.ping()
        checks["redis"] = {"ok": True}
    except Exception as error:  # any client error means not ready; say which
        checks["redis"] = {"ok": False, "error": str(error)}
    try:
        svc.store.check()
        checks["store"] = {"ok": True}
    except StorageError as error:
        checks["store"] = {"ok": False, "error": str(error)}
    queues = {name: False for name in QUEUES}
    if checks["redis"]["ok"]:
        queues = consumed_queues(svc.celery, timeout_s=WORKER_REPLY_TIMEOUT_S)
    checks["queues"] = {name: {"consumers": consumed} for name, consumed in queues.items()}
    ready = (
        checks["redis"]["ok"] and checks["store"]["ok"] and all(queues[name] for name in required)
    )
    response = jsonify({"status": "ready" if ready else "not_ready", "checks": checks})
    response.status_code = 200 if ready else 503
    return response
