"""Every refusal is JSON {"error": {code, message, field}}: Werkzeug's HTTP errors inside Flask,
and the ones the development server (`python -m api.gateway`) answers before Flask sees the
request: oversized or too many headers (431) and an oversized request line (414)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from werkzeug.exceptions import RequestHeaderFieldsTooLarge, UnavailableForLegalReasons

from api.gateway.errors import register_error_handlers
from tests.support.live import serving


@pytest.fixture
def app() -> Flask:
    app = Flask("errors")
    register_error_handlers(app)

    @app.get("/")
    def index() -> str:
        return "ok"

    @app.get("/headers")
    def headers() -> str:
        raise RequestHeaderFieldsTooLarge()

    @app.get("/legal")
    def legal() -> str:
        raise UnavailableForLegalReasons()

    return app


def test_werkzeug_errors_in_flask_are_json(app: Flask) -> None:
    client = app.test_client()
    for path, status, code in [
        ("/headers", 431, "headers_too_large"),
        ("/legal", 451, "unavailable_for_legal_reasons"),  # no code of its own: from the status
    ]:
        reply = client.get(path)
        assert reply.status_code == status and reply.is_json
        assert reply.get_json()["error"]["code"] == code
        assert reply.get_json()["error"]["message"]


@pytest.fixture
def port(app: Flask) -> Iterator[int]:
    with serving(app) as url:
        yield int(url.rsplit(":", 1)[1])


def _long_header(conn: http.client.HTTPConnection) -> None:
    conn.putrequest("GET", "/")
    conn.putheader("X-Long", "a" * 70_000)


def _many_headers(conn: http.client.HTTPConnection) -> None:
    conn.putrequest("GET", "/")
    for number in range(101):
        conn.putheader(f"X-Header-{number}", "v")


def _long_request_line(conn: http.client.HTTPConnection) -> None:
    conn.putrequest("GET", "/" + "a" * 70_000)


@pytest.mark.parametrize(
    ("send", "status", "code", "message"),
    [
        (_long_header, 431, "headers_too_large", "Line too long"),
        (_many_headers, 431, "headers_too_large", "Too many headers"),
        (_long_request_line, 414, "request_uri_too_long", "Request-URI Too Long"),
    ],
)
def test_the_dev_servers_own_refusals_are_json(
    port: int,
    send: Callable[[http.client.HTTPConnection], None],
    status: int,
    code: str,
    message: str,
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        send(conn)
        conn.endheaders()
        reply = conn.getresponse()
        assert reply.status == status
        assert reply.getheader("Content-Type") == "application/json"
        error = json.loads(reply.read())["error"]
        assert (error["code"], error["field"]) == (code, None)
        assert error["message"].startswith(message)
    finally:
        conn.close()
    ok = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    ok.request("GET", "/")
    assert ok.getresponse().read() == b"ok"  # the server goes on serving
    ok.close()
