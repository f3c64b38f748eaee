"""Starting cluster processes on this machine: workers, a local redis-server, the gateway.

Everything is started by module name in a subprocess (`python -m celery -A workers.celery_app`,
`python -m api.gateway`), so the CLI never imports workers or torch.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlparse

import redis

WORKER_KINDS = ("gpu", "cpu", "train")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
REDIS_PORT_FILE = "port"  # under DATA_DIR/redis: the port of the data directory's Redis


class LaunchError(RuntimeError):
    """A process could not be started or did not come up; the message says what to do."""


def worker_command(
    kind: str,
    data_dir: Path,
    concurrency: int,
    name: str | None = None,
    loglevel: str = "INFO",
) -> list[str]:
    """The celery command line of one worker: its queue, a thread pool, a persistent statedb.

    The statedb keeps revoked job ids across restarts; its name follows the worker's name and
    host, so a restarted worker finds its own.
    """
    if kind not in WORKER_KINDS:
        raise LaunchError(f"unknown worker kind {kind!r}; choose one of {', '.join(WORKER_KINDS)}")
    name = name or kind
    state_dir = data_dir / "worker-state"
    state_dir.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "--queues",
        kind,
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{name}@{socket.gethostname()}",
        "--statedb",
        str(state_dir / f"{name}@{socket.gethostname()}"),
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


def worker_env(kind: str, base: Mapping[str, str]) -> dict[str, str]:
    """A worker's environment: the CPU queue always runs on the CPU. SIGTERM keeps Celery's
    warm shutdown (the runner hands unfinished jobs back after its grace period): no remap to a
    cold shutdown, which the thread pool cannot carry out."""
    env = child_env(base)
    env.pop("REMAP_SIGTERM", None)
    env.pop(METRICS_DIR_ENV, None)  # one process: its own registry, on its own port
    if kind == "cpu":
        env["HEARTCLUSTER_DEVICE"] = "cpu"
    return env


def default_concurrency(kind: str, engine_max_rows: int) -> int:
    """GPU: as many jobs as the engine batch holds with guidance (two rows each)."""
    return max(1, engine_max_rows // 2) if kind == "gpu" else 1


GATEWAY_CONFIG = "python:api.gateway.gunicorn_conf"
GATEWAY_APP = "api.gateway:create_app()"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # the gateway's multiprocess metrics files


def gateway_command(host: str, port: int) -> list[str]:
    """The gateway under gunicorn with its production settings, as Docker and Kubernetes run
    it (api/gateway/gunicorn_conf.py)."""
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return [sys.executable, "-m", "gunicorn", "--config", GATEWAY_CONFIG, "--bind", bind] + [
        GATEWAY_APP
    ]


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    finally:
        client.close()


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def private_redis(data_dir: Path) -> tuple[str, subprocess.Popen[bytes] | None]:
    """The data directory's own redis-server: the one already serving it (another `up` or
    `demo` on the same directory: same cluster), else a new one on a free port. A cluster per
    data directory, so two local clusters never take each other's jobs."""
    workdir = data_dir.resolve() / "redis"
    port_file = workdir / REDIS_PORT_FILE
    if port_file.is_file():
        url = f"redis://127.0.0.1:{port_file.read_text().strip()}/0"
        if redis_answers(url, 0.5) and _redis_dir(url) == str(workdir):
            return url, None
    url, process = start_redis(f"redis://127.0.0.1:{free_port()}/0", data_dir)
    port_file.write_text(f"{urlparse(url).port}\n")
    return url, process


def _redis_dir(url: str) -> str | None:
    """The data directory of the Redis at `url` (a stale port file may name another's)."""
    client = redis.Redis.from_url(url, socket_timeout=1.0, decode_responses=True)
    try:
        return client.config_get("dir").get("dir")
    except redis.RedisError:
        return None
    finally:
        client.close()


def start_redis(url: str, data_dir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """A redis-server for a loopback URL that nobody answers: on its port if free, else any.

    Data persists under DATA_DIR/redis in an append-only file (fsync every second), so jobs
    and keys survive a restart of Redis.
    """
    parsed = urlparse(url)
    host = parsed.hostname or "127.0.0.1"
    if host not in LOOPBACK:
        raise LaunchError(f"no Redis answers at {url}, and it is not on this machine")
    binary = shutil.which("redis-server")
    if binary is None:
        raise LaunchError(
            f"no Redis answers at {url} and redis-server is not installed: install it "
            "(apt-get install redis-server) or set HEARTCLUSTER_REDIS_URL to a running Redis"
        )
    port = parsed.port or 6379
    if not port_free("127.0.0.1", port):
        port = free_port()
    workdir = data_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = open(workdir / "redis.log", "ab")  # noqa: SIM115 (owned by the child process)
    process = subprocess.Popen(
        redis_server_command(binary, port, workdir), stdout=log_file, stderr=subprocess.STDOUT
    )
    db = parsed.path.strip("/") or "0"
    local_url = f"redis://127.0.0.1:{port}/{db}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(f"redis-server exited at start; see {workdir / 'redis.log'}")
        if redis_answers(local_url, 0.2):
            return local_url, process
        time.sleep(0.1)
    stop_processes([process])
    raise LaunchError(f"redis-server did not answer on port {port}; see {workdir / 'redis.log'}")


def redis_server_command(binary: str, port: int, workdir: Path) -> list[str]:
    """Loopback only, data in `workdir`, every write in the append-only file."""
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)] + [
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
    ]


def spawn(command: list[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a child with its output in a log file (its own process group: Ctrl-C is ours)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "ab")  # noqa: SIM115 (owned by the child process)
    return subprocess.Popen(
        command,
        env=dict(env),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_processes(processes: list[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    """SIGTERM all (Celery: warm shutdown, unfinished jobs go back to the queue), then wait."""
    for process in processes:
        if process.poll() is None:
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def child_env(base: Mapping[str, str]) -> dict[str, str]:
    """An environment with this checkout on the Python path, so children import this code."""
    env = dict(base)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
