"""The gateway served over real HTTP on loopback, by the same Werkzeug server and request handler
as `python -m api.gateway`, so tests see what that server answers before Flask does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask
from werkzeug.serving import make_server

from api.gateway.errors import JsonErrorRequestHandler


@contextmanager
def serving(app: Flask) -> Iterator[str]:
    """Serve `app` on a free loopback port; yields its base URL, stops the server after."""
    server = make_server(
        "127.0.0.1", 0, app, threaded=True, request_handler=JsonErrorRequestHandler
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
