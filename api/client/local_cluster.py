"""`heartcluster up`: gateway + one GPU-queue worker + one CPU worker + one train worker (for
fine-tunes; leave it out with `--no-train-worker`) on this machine.

Each data directory is its own cluster: without HEARTCLUSTER_REDIS_URL it runs its own
redis-server (append-only file under DATA_DIR/redis), so two local clusters never share jobs;
with it, that Redis (started here when it is on this machine and nothing answers). Keeps
artifacts, Redis data, logs, worker state, the local API key and (without
HEARTCLUSTER_MODEL_DIR) tiny models under the data directory.
No torch here: the workers load the models in their own processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

import redis
import requests

from api.client.launcher import (
    METRICS_DIR_ENV,
    LaunchError,
    child_env,
    default_concurrency,
    free_port,
    gateway_command,
    port_free,
    private_redis,
    redis_answers,
    spawn,
    start_redis,
    stop_processes,
    worker_command,
    worker_env,
)
from api.client.local_config import KEY_FILE, forget_url, save_url
from shared.core.config import PREFIX, Settings
from shared.core.queueing import consumed_queues, make_celery
from shared.core.tenants import TenantStore

LOCAL_TENANT = "local"
QUEUES = ("gpu", "cpu")  # always served; "train" too unless train_worker=False
TINY_BANNER = (
    "\n"
    "  !!! HEARTCLUSTER_MODEL_DIR is not set: using TINY RANDOM-WEIGHT models.         !!!\n"
    "  !!! They exercise the whole cluster but make NOISE, NOT MUSIC. Point            !!!\n"
    "  !!! HEARTCLUSTER_MODEL_DIR at the official checkpoints for real songs.          !!!\n"
)


class LocalCluster:
    """Start with `start()`, stop with `stop()`."""

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = 8000,
        env: Mapping[str, str] | None = None,
        log=print,
        train_worker: bool = True,
    ) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.host = host
        self.port = port
        self.env = dict(os.environ if env is None else env)
        self.log = log
        self.url = f"http://{host}:{port}"
        self.api_key = ""
        self.settings: Settings | None = None  # as the children see them, once started
        self.processes: dict[str, subprocess.Popen[bytes]] = {}  # gateway and workers by name
        self.metrics_ports: dict[str, int] = {}  # worker name → its /metrics port, when known
        self._redis: subprocess.Popen[bytes] | None = None
        self.queues = (*QUEUES, "train") if train_worker else QUEUES

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def start(self, timeout_s: float = 600.0) -> None:
        """Bring everything up and wait until the gateway answers and both queues have a worker."""
        if not port_free(self.host, self.port):
            raise LaunchError(
                f"port {self.port} on {self.host} is in use (another `heartcluster up`?): "
                "stop it or pass --port"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        overrides = {f"{PREFIX}DATA_DIR": str(self.data_dir)}
        if not self.env.get(f"{PREFIX}STORAGE_URL"):
            overrides[f"{PREFIX}STORAGE_URL"] = (self.data_dir / "artifacts").as_uri()
        settings = Settings.from_env({**self.env, **overrides})
        try:
            if not self.env.get(f"{PREFIX}REDIS_URL"):
                url, self._redis = private_redis(self.data_dir)
                started = "started" if self._redis is not None else "sharing"
                self.log(f"{started} redis-server at {url} (data in {self.data_dir / 'redis'})")
                overrides[f"{PREFIX}REDIS_URL"] = url
                settings = Settings.from_env({**self.env, **overrides})
            elif not redis_answers(settings.redis_url):
                url, self._redis = start_redis(settings.redis_url, self.data_dir)
                self.log(f"started redis-server at {url} (data in {self.data_dir / 'redis'})")
                overrides[f"{PREFIX}REDIS_URL"] = url
                settings = Settings.from_env({**self.env, **overrides})
            else:
                self.log(f"using Redis at {settings.redis_url}")
            self.settings = settings
            self.api_key = local_api_key(settings, self.data_dir / KEY_FILE)
            if settings.model_dir is None:
                self.log(TINY_BANNER)
            env = {**self.env, **overrides}
            for kind in self.queues:
                concurrency = default_concurrency(kind, settings.engine_max_rows)
                command = worker_command(kind, self.data_dir, concurrency)
                self._spawn(f"{kind}-worker", command, self._worker_env(kind, env))
            gateway_env = {
                **child_env(env),
                METRICS_DIR_ENV: str(self.data_dir / "gateway-metrics"),
            }
            self._spawn("gateway", gateway_command(self.host, self.port), gateway_env)
            self._wait_ready(settings, time.monotonic() + timeout_s)
            save_url(self.data_dir, self.url)  # client commands find the cluster by it
        except BaseException:
            self.stop()
            raise

    def _worker_env(self, kind: str, env: Mapping[str, str]) -> dict[str, str]:
        """A free metrics port each, unless HEARTCLUSTER_METRICS_PORT says otherwise (then each
        worker takes the first free port from it)."""
        child = worker_env(kind, env)
        if not self.env.get(f"{PREFIX}METRICS_PORT"):
            port = free_port()
            child[f"{PREFIX}METRICS_PORT"] = str(port)
            self.metrics_ports[f"{kind}-worker"] = port
        return child

    def _spawn(self, name: str, command: list[str], env: Mapping[str, str]) -> None:
        self.processes[name] = spawn(command, env, self.log_dir / f"{name}.log")

    def _wait_ready(self, settings: Settings, deadline: float) -> None:
        celery = make_celery(settings)
        gateway_up = False
        waiting: set[str] = set(self.queues)
        while time.monotonic() < deadline:
            self.check_alive()
            if not gateway_up:
                with suppress(requests.RequestException):
                    gateway_up = requests.get(f"{self.url}/healthz", timeout=1).ok
            if waiting:
                consumed = consumed_queues(celery, timeout_s=0.5)
                waiting = {q for q in waiting if not consumed[q]}
            if gateway_up and not waiting:
                return
            time.sleep(0.2)
        raise LaunchError(
            f"the cluster did not come up in time (gateway answering: {gateway_up}; queues "
            f"without a worker: {sorted(waiting)}); logs in {self.log_dir}"
        )

    def check_alive(self) -> None:
        """Raise naming the first child that exited, with the end of its log."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                log_path = self.log_dir / f"{name}.log"
                tail = log_path.read_text(errors="replace").splitlines()[-20:]
                raise LaunchError(
                    f"{name} exited with code {process.returncode}; end of {log_path}:\n"
                    + "\n".join(tail)
                )

    def stop(self) -> None:
        """Gateway first, then workers (warm shutdown: after HEARTCLUSTER_STOP_GRACE_S their
        running jobs go back to the queue), then our Redis."""
        forget_url(self.data_dir, self.url)
        workers = [f"{kind}-worker" for kind in self.queues]
        names = [n for n in ("gateway", *workers) if n in self.processes]
        stop_processes([self.processes.pop(n) for n in names])
        if self._redis is not None:
            stop_processes([self._redis])
            self._redis = None

    def serve_forever(self) -> None:
        """Block until Ctrl-C / SIGTERM or until a child dies."""
        try:
            while True:
                self.check_alive()
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopping...", file=sys.stderr)


def local_api_key(settings: Settings, path: Path) -> str:
    """The local tenant's API key: the one saved in `path` while Redis still knows it, else a
    new one (saved, owner-readable only)."""
    tenants = TenantStore(redis.Redis.from_url(settings.redis_url))
    if path.is_file():
        key = path.read_text().strip()
        if tenants.tenant_for_key(key) == LOCAL_TENANT:
            return key
    key = tenants.create_key(LOCAL_TENANT)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key
