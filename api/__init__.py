"""The HTTP side of heartcluster: the Flask gateway, its client and the CLI.

`create_app` is imported lazily so that `heartcluster` CLI commands that never serve HTTP do not
pay for importing Flask and Celery.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from api.app import create_app

        return create_app
    raise AttributeError(f"module 'api' has no attribute {name!r}")
