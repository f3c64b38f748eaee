"""`python -m api.gateway`: Werkzeug's threaded development server (debugging only; `heartcluster
up`, Docker and Kubernetes run gunicorn with api/gateway/gunicorn_conf.py).

Settings come from HEARTCLUSTER_* variables.
"""

from __future__ import annotations

import argparse

from werkzeug.serving import run_simple

from api.gateway import create_app
from api.gateway.errors import JsonErrorRequestHandler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m api.gateway", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    run_simple(
        args.host,
        args.port,
        create_app(),
        threaded=True,
        request_handler=JsonErrorRequestHandler,
    )


if __name__ == "__main__":
    main()
