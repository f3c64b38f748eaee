"""A cluster of separate processes that tests can break: its own append-only redis-server (which
they restart), a gateway and named workers (which they kill, stop and restart), with leases and
heartbeats in seconds so recovery fits in a test.

Figures come from the job store and the workers' logs: a worker logs "job X: pipeline finished"
each time a run completes and "job X succeeded" each time its fenced succeed lands, so a job
completed twice shows up as two lines whichever worker wrote them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests

from api.client.launcher import (
    child_env,
    gateway_command,
    redis_answers,
    redis_server_command,
    spawn,
    stop_processes,
    worker_command,
    worker_env,
)
from shared.core.config import Settings
from shared.core.jobs import TERMINAL_STATES, Job, JobStore
from shared.core.queueing import make_celery
from shared.core.tenants import TenantStore
from tests.support.net import free_port

LEASE_S = 3.0
HEARTBEAT_S = 1.0
STOP_GRACE_S = 1.0
FINISHED = re.compile(r"job (\w+): pipeline finished")
SUCCEEDED = re.compile(r"job (\w+) succeeded")


@dataclass
class Figures:
    """One row of the fault suite."""

    scenario: str
    submitted: int
    succeeded: int
    lost: int
    duplicated: int
    reruns: int  # runs whose work was thrown away (a lost lease, a handed-back job): not errors
    recovery_s: float

    def line(self) -> str:
        return (
            f"{self.scenario}: submitted={self.submitted} succeeded={self.succeeded} "
            f"lost={self.lost} duplicated={self.duplicated} reruns={self.reruns} "
            f"recovery_s={self.recovery_s:.1f}"
        )


@dataclass
class FaultCluster:
    root: Path
    model_dir: Path
    engine_rows: int = 10
    redis_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    gateway: subprocess.Popen[bytes] | None = None
    redis_process: subprocess.Popen[bytes] | None = None
    keys: dict[str, str] = field(default_factory=dict)

    # ----- processes ----------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HEARTCLUSTER_REDIS_URL": self.redis_url,
            "HEARTCLUSTER_DATA_DIR": str(self.root),
            "HEARTCLUSTER_STORAGE_URL": (self.root / "artifacts").as_uri(),
            "HEARTCLUSTER_MODEL_DIR": str(self.model_dir),
            "HEARTCLUSTER_DEVICE": "cpu",
            "HEARTCLUSTER_ENGINE_MAX_ROWS": str(self.engine_rows),
            "HEARTCLUSTER_LEASE_S": str(LEASE_S),
            "HEARTCLUSTER_HEARTBEAT_S": str(HEARTBEAT_S),
            "HEARTCLUSTER_STOP_GRACE_S": str(STOP_GRACE_S),
            "HEARTCLUSTER_REDIS_TIMEOUT_S": "2",
        }

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env())

    def start_redis(self) -> None:
        workdir = self.root / "redis"
        workdir.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed"
        self.redis_process = spawn(
            redis_server_command(binary, self.redis_port, workdir), {}, workdir / "redis.log"
        )
        _wait(lambda: redis_answers(self.redis_url, 0.2), 15, "redis-server to answer")

    def stop_redis(self) -> None:
        """SIGTERM: Redis writes its append-only file out and exits, as in a restart."""
        assert self.redis_process is not None
        stop_processes([self.redis_process])

    def start(self, workers: Iterable[str] = ("gpu-a", "gpu-b")) -> None:
        self.start_redis()
        tenants = TenantStore(self.client())
        self.keys = {tenant: tenants.create_key(tenant) for tenant in ("alice", "bob")}
        self.gateway = spawn(
            gateway_command("127.0.0.1", self.gateway_port),
            child_env(self.env()),
            self.log_dir / "gateway.log",
        )
        for name in workers:
            self.start_worker(name, wait=False)
        self.wait_workers(list(workers))
        _wait(self._gateway_up, 60, "the gateway to answer")

    def _gateway_up(self) -> bool:
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).ok
        except requests.RequestException:
            return False

    def start_worker(self, name: str, wait: bool = True) -> None:
        concurrency = max(1, self.engine_rows // 2)
        command = worker_command("gpu", self.root, concurrency, name=name)
        self.workers[name] = spawn(command, worker_env("gpu", self.env()), self.log_path(name))
        if wait:
            self.wait_workers([name])

    def wait_workers(self, names: list[str], timeout_s: float = 120) -> None:
        """Until each named worker answers that it consumes (asked by name, so the answer
        comes as soon as they all reply, not after the inspect timeout)."""
        celery = make_celery(self.settings)
        hosts = [f"{name}@{socket.gethostname()}" for name in names]

        def consuming() -> bool:
            for name in names:
                if self.workers[name].poll() is not None:
                    raise AssertionError(f"worker {name} exited; see {self.log_path(name)}")
            inspect = celery.control.inspect(timeout=0.5, destination=hosts, limit=len(hosts))
            try:
                replies = inspect.active_queues() or {}
            except Exception:  # noqa: BLE001 (Redis may be restarting)
                return False
            return all(host in replies for host in hosts)

        _wait(consuming, timeout_s, f"workers {names} to consume")

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def kill_worker(self, name: str) -> None:
        process = self.workers[name]
        process.kill()
        process.wait()

    def stop_worker(self, name: str, timeout_s: float = 60) -> float:
        """SIGTERM and wait; returns the seconds it took to exit."""
        process = self.workers[name]
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=timeout_s)
        return time.monotonic() - started

    def stop_workers(self, names: list[str], timeout_s: float = 60) -> None:
        """SIGTERM them all, then wait for each: they stop side by side, not in turn."""
        for name in names:
            self.workers[name].send_signal(signal.SIGTERM)
        for name in names:
            self.workers[name].wait(timeout=timeout_s)

    def alive(self, name: str) -> bool:
        return self.workers[name].poll() is None

    def close(self) -> None:
        stop_processes([p for p in (self.gateway, *self.workers.values()) if p is not None], 20)
        if self.redis_process is not None:
            stop_processes([self.redis_process])

    # ----- jobs ---------------------------------------------------------------------------

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)

    def store(self) -> JobStore:
        return JobStore(self.client())

    def submit(self, tenant: str, type: str, params: dict[str, Any]) -> str:
        reply = requests.post(
            f"{self.url}/v1/jobs",
            json={"type": type, "params": params},
            headers={"Authorization": f"Bearer {self.keys[tenant]}"},
            timeout=10,
        )
        assert reply.status_code == 202, reply.text
        return reply.json()["id"]

    def cancel(self, tenant: str, job_id: str) -> requests.Response:
        return requests.post(
            f"{self.url}/v1/jobs/{job_id}/cancel",
            headers={"Authorization": f"Bearer {self.keys[tenant]}"},
            timeout=10,
        )

    def jobs(self, ids: Iterable[str]) -> dict[str, Job]:
        store = self.store()
        return {job_id: job for job_id in ids if (job := _get(store, job_id)) is not None}

    def wait_until(self, ids: list[str], done: Callable[[Job], bool], timeout_s: float) -> float:
        """Seconds until every job satisfies `done` (AssertionError with the stragglers)."""
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            jobs = self.jobs(ids)
            if len(jobs) == len(ids) and all(done(job) for job in jobs.values()):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                left = {i: (j.state, j.stage, j.worker) for i, j in jobs.items() if not done(j)}
                raise AssertionError(f"not done in {timeout_s} s: {left}; logs {self.log_dir}")
            time.sleep(0.1)

    def wait_terminal(self, ids: list[str], timeout_s: float) -> float:
        return self.wait_until(ids, lambda job: job.state in TERMINAL_STATES, timeout_s)

    def log_counts(self, pattern: re.Pattern[str]) -> Counter[str]:
        counts: Counter[str] = Counter()
        for path in self.log_dir.glob("gpu-*.log"):
            counts.update(pattern.findall(path.read_text(errors="replace")))
        return counts

    def figures(self, scenario: str, ids: list[str], recovery_s: float) -> Figures:
        jobs = self.jobs(ids)
        finished, succeeded = self.log_counts(FINISHED), self.log_counts(SUCCEEDED)
        figures = Figures(
            scenario=scenario,
            submitted=len(ids),
            succeeded=sum(job.state == "succeeded" for job in jobs.values()),
            lost=sum(job_id not in jobs or not jobs[job_id].terminal for job_id in ids),
            duplicated=sum(max(0, succeeded[job_id] - 1) for job_id in ids),
            reruns=sum(max(0, finished[job_id] - 1) for job_id in ids),
            recovery_s=recovery_s,
        )
        print(figures.line(), flush=True)
        return figures


def _get(store: JobStore, job_id: str) -> Job | None:
    try:
        return store.get(job_id)
    except (redis.ConnectionError, redis.TimeoutError):
        return None


def _wait(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
