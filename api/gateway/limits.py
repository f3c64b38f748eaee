"""Request bodies bounded before they are parsed: size per route and JSON nesting depth.

Only uploads may send large bodies; every other route takes at most one small JSON document.
A deeply nested document would exhaust the parser's recursion (a 500), so its depth is
measured first, in linear time and without recursion.
"""

from __future__ import annotations

import re
from itertools import accumulate

from flask import request

from api.gateway.app import services

UPLOAD_ENDPOINT = "uploads.create_upload"  # bounded by MAX_CONTENT_LENGTH (the upload limit)

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
    if request.endpoint != UPLOAD_ENDPOINT:
        request.max_content_length = services().settings.max_json_bytes
