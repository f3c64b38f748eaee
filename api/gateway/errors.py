"""Every error leaves the gateway as JSON `{"error": {"code", "message", "field"}}`, including
Flask's own 404/405/413 and unexpected exceptions (500, details only in the log)."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from shared.core.outage import REDIS_ERRORS, Outage

log = logging.getLogger(__name__)
# Sent with 503 while Redis is away: a restart with an append-only file takes seconds.
REDIS_RETRY_AFTER_S = 5

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_params",
    503: "unavailable",
}


class ApiError(Exception):
    """Raised by route code to answer with a JSON error."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.extra: dict[str, object] = {}


def error_response(
    status: int, code: str, message: str, field: str | None = None, **extra: object
) -> Response:
    response = jsonify({"error": {"code": code, "message": message, "field": field, **extra}})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="heartcluster"'
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return error_response(error.status, error.code, error.message, error.field, **error.extra)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        response = error_response(
            status, _CODES.get(status, "http_error"), error.description or error.name
        )
        for name, value in error.get_headers():  # e.g. Allow on a 405
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        if isinstance(error, REDIS_ERRORS):
            return _redis_away(app, error)
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")

    @app.after_request
    def _redis_answered(response: Response) -> Response:
        """While Redis is away, each answered request checks whether it is back (one PING)."""
        outage = _redis_outage(app)
        if outage.away:
            try:
                app.extensions["heartcluster"].redis.ping()
            except REDIS_ERRORS:
                return response
            outage.ok()
        return response


def _redis_outage(app: Flask) -> Outage:
    return app.extensions.setdefault("heartcluster-redis-outage", Outage(log))


def _redis_away(app: Flask, error: Exception) -> Response:
    """503 + Retry-After while the job store / broker cannot be reached (logged once)."""
    _redis_outage(app).failed(error)
    response = error_response(
        503, "unavailable", "the job store (Redis) is unreachable; retry shortly"
    )
    response.headers["Retry-After"] = str(REDIS_RETRY_AFTER_S)
    return response
