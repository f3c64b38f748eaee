"""The web page: static files from api/gateway/static, no authentication (the page asks for the
API key and calls the public /v1 API with it, like any other client)."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory
from flask.typing import ResponseReturnValue

from api.gateway.apidoc import Reply, documented

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# The page loads only its own files: no CDN, and no script from anywhere else.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob:; media-src 'self' blob:; "
    "connect-src 'self' http: https:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

bp = Blueprint("web", __name__)


@bp.after_request
def _policy(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


_TEXT = {"schema": {"type": "string"}}
_ASSET_TYPES = ("text/javascript", "text/css", "image/svg+xml", "text/html")


@bp.get("/")
@documented({200: Reply("The web page", content={"text/html": _TEXT})})
def index() -> ResponseReturnValue:
    """The web page: make, hear and fix songs in a browser (a client of the /v1 API)."""
    return send_from_directory(STATIC_DIR, "index.html", max_age=0)


@bp.get("/web/<name>")
@documented(
    {
        200: Reply("The file", content={kind: _TEXT for kind in _ASSET_TYPES}),
        404: "No such file",
    }
)
def asset(name: str) -> ResponseReturnValue:
    """The web page's static files (ES modules, CSS)."""
    return send_from_directory(STATIC_DIR, name, max_age=0)
