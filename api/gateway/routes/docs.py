"""/docs: the interactive API page (Swagger UI) over /openapi.json, every file served from here.

Swagger UI's files come from the `swagger-ui-bundle` package, so the page works on machines
without internet access; the page itself (docs.html, docs.js) lives in api/gateway/static.
"""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from flask import Blueprint, Response, send_from_directory
from flask.typing import ResponseReturnValue

from api.gateway.apidoc import Reply, documented
from api.gateway.routes.web import STATIC_DIR

SWAGGER_DIR = Path(swagger_ui_bundle.swagger_ui_path)
# Swagger UI sets inline styles and draws icons from data: URLs; scripts only from here.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_TEXT = {"schema": {"type": "string"}}
_ASSET_TYPES = ("text/javascript", "text/css", "image/png", "text/html", "application/json")

bp = Blueprint("docs", __name__)


@bp.after_request
def _policy(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/docs")
@documented({200: Reply("The API page", content={"text/html": _TEXT})})
def docs_page() -> ResponseReturnValue:
    """Interactive API documentation: every route of /openapi.json, with "Try it out"."""
    return send_from_directory(STATIC_DIR, "docs.html", max_age=0)


@bp.get("/docs/assets/<name>")
@documented(
    {
        200: Reply("The file", content={kind: _TEXT for kind in _ASSET_TYPES}),
        404: "No such file",
    }
)
def docs_asset(name: str) -> ResponseReturnValue:
    """Swagger UI's files (from the swagger-ui-bundle package) and the page's start script."""
    if name == "docs.js":
        return send_from_directory(STATIC_DIR, name, max_age=0)
    return send_from_directory(SWAGGER_DIR, name, max_age=3600)
