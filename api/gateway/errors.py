"""Every error leaves the gateway as JSON `{"error": {"code", "message", "field"}}`, including
Flask's own 404/405/413, unexpected exceptions (500, details only in the log), and the errors
Werkzeug's development server answers itself before Flask sees the request (431, 414, 400)."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException
from werkzeug.serving import WSGIRequestHandler

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
    431: "headers_too_large",
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
        self.headers: dict[str, str] = {}  # e.g. Retry-After of a 429


def code_for(status: int) -> str:
    """The error code of a status no route names itself (e.g. 414 → 'request_uri_too_long')."""
    try:
        return _CODES.get(status) or HTTPStatus(status).name.lower()
    except ValueError:
        return "http_error"


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
        response = error_response(
            error.status, error.code, error.message, error.field, **error.extra
        )
        response.headers.update(error.headers)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        response = error_response(status, code_for(status), error.description or error.name)
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


class JsonErrorRequestHandler(WSGIRequestHandler):
    """Werkzeug's server with its own error replies as JSON too: a header line over 64 KiB or
    over 100 headers (431), a request line over 64 KiB (414), a malformed request line (400)."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        phrase, _ = self.responses.get(code, ("Error", ""))
        text = f"{message or phrase} ({explain})" if explain else message or phrase
        body = json.dumps({"error": {"code": code_for(code), "message": text, "field": None}})
        self.log_error("code %d, message %s", code, text)
        self.send_response(code, message)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body.encode())
