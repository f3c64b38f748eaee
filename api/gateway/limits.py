"""Request bodies bounded before they are parsed: size per route and JSON nesting depth.

Only uploads may send large bodies; every other route takes at most one small JSON document.
A deeply nested document would exhaust the parser's recursion (a 500), so its depth is
measured first, in linear time and without recursion.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from flask import request

from api.gateway.app import services
from api.gateway.errors import ApiError

UPLOAD_ENDPOINT = "uploads.create_upload"  # bounded by MAX_CONTENT_LENGTH (the upload limit)
BATCH_ENDPOINT = "batches.create_batch"  # bounded by HEARTCLUSTER_MAX_BATCH_BYTES

_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')  # a JSON string, escapes included
_NOT_BRACKET = re.compile(rb"[^\[\]{}]++")


def json_depth(data: bytes) -> int:
    """How deep arrays and objects nest in a JSON text (brackets inside strings ignored)."""
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data))
    steps = (1 if byte in b"[{" else -1 for byte in brackets)
    return max(accumulate(steps), default=0)


def limit_body() -> None:
    """Before every request: a body over HEARTCLUSTER_MAX_JSON_BYTES is a 413 on any route but
    uploads (werkzeug refuses it from Content-Length, or while reading a chunked body)."""
    settings = services().settings
    if request.endpoint == BATCH_ENDPOINT:
        request.max_content_length = settings.max_batch_bytes
    elif request.endpoint != UPLOAD_ENDPOINT:
        request.max_content_length = settings.max_json_bytes


def json_body() -> Any:
    """The request's JSON (whatever its Content-Type claims): 413 over
    HEARTCLUSTER_MAX_JSON_BYTES, 400 when it nests deeper than HEARTCLUSTER_MAX_JSON_DEPTH or
    does not parse."""
    settings = services().settings
    data = request.get_data(cache=False)
    # werkzeug ends a body without Content-Length (chunked) at the limit silently: one that
    # reaches it may have been cut short
    if request.content_length is None and len(data) >= settings.max_json_bytes:
        raise ApiError(
            413,
            "too_large",
            f"the body is {settings.max_json_bytes} bytes or more; less allowed "
            "(HEARTCLUSTER_MAX_JSON_BYTES)",
        )
    depth = json_depth(data)
    if depth > settings.max_json_depth:
        raise ApiError(
            400,
            "malformed_json",
            f"the body nests {depth} levels deep; at most {settings.max_json_depth} allowed "
            "(HEARTCLUSTER_MAX_JSON_DEPTH)",
        )
    try:
        return json.loads(data or b"null")
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {error}") from None
