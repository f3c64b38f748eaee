"""gunicorn settings of the gateway, for `heartcluster up`, Docker and Kubernetes alike:

    gunicorn -c python:api.gateway.gunicorn_conf --bind 0.0.0.0:8000 'api.gateway:create_app()'

Threads, not processes, carry the load: a Server-Sent Events stream holds its thread while it
is open, so each worker process gets far more threads than cores (open streams beyond the
thread count would queue every other request behind them). Override any of this with gunicorn's
own flags or GUNICORN_CMD_ARGS, e.g. GUNICORN_CMD_ARGS="--workers 4 --threads 512".

Metrics: prometheus-client's multiprocess mode, so /metrics sums every worker process. Its
directory (PROMETHEUS_MULTIPROC_DIR, a temporary one when unset) must be set before any worker
imports prometheus_client, hence here, and is emptied at start so old counts never add up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

worker_class = "gthread"
workers = 2
threads = 256  # open SSE streams per process before requests wait
timeout = 30  # a gthread worker's heartbeat, not a request limit: streams may run for hours
graceful_timeout = 5  # on stop, open streams get this long; clients reconnect elsewhere
keepalive = 5
control_socket_disable = True  # several gateways per machine (tests, `up` per data dir)

_created_dir = not os.environ.get(MULTIPROC_ENV)
if _created_dir:
    os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="heartcluster-gateway-metrics-")
_metrics_dir = Path(os.environ[MULTIPROC_ENV])


def on_starting(server: Any) -> None:
    """Start from zero: files of an earlier run would add their counts to ours."""
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in _metrics_dir.glob("*.db"):
        stale.unlink()


def child_exit(server: Any, worker: Any) -> None:
    """A worker process that ended: its live gauges no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _created_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
