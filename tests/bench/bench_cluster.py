"""Cluster benchmark on loopback: submit throughput, queue-to-start latency, cancel latency, and
queue-to-start of a small tenant's jobs while another tenant's backlog drains (fair sharing).

    .venv/bin/python tests/bench/bench_cluster.py [--submits 500] [--clients 8] [--latency-jobs 40]
        [--sse-streams 200]
        [--backlog 1000] [--small-jobs 30]

Starts its own redis-server (free port), writes tiny models, runs one GPU-queue worker (on the
CPU without a GPU) and the gateway as subprocesses with the same commands `heartcluster up`
uses. Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import redis
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from api.client.launcher import (  # noqa: E402 (after the path set-up above)
    child_env,
    free_port,
    gateway_command,
    spawn,
    stop_processes,
    worker_command,
    worker_env,
)
from shared.core.config import Settings  # noqa: E402
from shared.core.queueing import consumed_queues, make_celery  # noqa: E402
from shared.core.tenants import TenantStore  # noqa: E402

TERMINAL = {"succeeded", "failed", "cancelled"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Bench:
    def __init__(self, root: Path, engine_rows: int) -> None:
        self.root = root
        self.redis_port = free_port()
        self.redis_process = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", str(root)],
            stdout=subprocess.DEVNULL,
        )
        self.env = {
            **os.environ,
            "HEARTCLUSTER_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "HEARTCLUSTER_DATA_DIR": str(root / "data"),
            "HEARTCLUSTER_STORAGE_URL": (root / "artifacts").as_uri(),
            "HEARTCLUSTER_ENGINE_MAX_ROWS": str(engine_rows),
        }
        self.settings = Settings.from_env(self.env)
        self.redis = redis.Redis.from_url(self.settings.redis_url)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.redis.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.key = TenantStore(self.redis).create_key("bench")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.key}"

    def start_gateway(self) -> None:
        command = gateway_command("127.0.0.1", self.port)
        self.processes.append(spawn(command, child_env(self.env), self.root / "gateway.log"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError(f"gateway did not start; see {self.root / 'gateway.log'}")

    def start_worker(self, concurrency: int) -> None:
        command = worker_command("gpu", Path(self.env["HEARTCLUSTER_DATA_DIR"]), concurrency)
        log = self.root / "gpu-worker.log"
        self.processes.append(spawn(command, worker_env("gpu", self.env), log))
        celery = make_celery(self.settings)
        deadline = time.monotonic() + 300
        while not consumed_queues(celery, 0.5)["gpu"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {log}")
            time.sleep(0.2)

    def submit(self, params: dict) -> dict:
        reply = self.http.post(
            f"{self.url}/v1/jobs", json={"type": "generate", "params": params}, timeout=30
        )
        reply.raise_for_status()
        return reply.json()

    def job(self, job_id: str) -> dict:
        return self.http.get(f"{self.url}/v1/jobs/{job_id}", timeout=30).json()

    def wait(self, job_id: str, until) -> dict:
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.005)

    def close(self) -> None:
        stop_processes(self.processes)
        stop_processes([self.redis_process])


def open_streams(bench: Bench, count: int) -> None:
    """Open `count` Server-Sent Events streams on queued jobs and keep them open: each holds a
    gateway thread, as a watching client's does. They end when their jobs do (the flushdb after
    the submits removes them; the gateway ends a stream whose job is gone)."""
    opened = threading.Semaphore(0)

    def hold(job_id: str) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {bench.key}"
        url = f"{bench.url}/v1/jobs/{job_id}/events"
        with session.get(url, stream=True, timeout=(30, None)) as reply:
            reply.raise_for_status()
            lines = reply.iter_lines()
            next(lines)  # the first event: the stream is open and holds its gateway thread
            opened.release()
            with suppress(requests.RequestException):  # cut when the gateway stops
                for _ in lines:
                    pass

    for _ in range(count):
        job_id = bench.submit({"tags": "piano", "duration_s": 1.0})["id"]
        threading.Thread(target=hold, args=(job_id,), daemon=True).start()
    for done in range(count):
        if not opened.acquire(timeout=60):
            raise RuntimeError(f"{done} of {count} SSE streams open after 60 s")


def bench_submit(bench: Bench, submits: int, clients: int, streams: int) -> None:
    """Submits with no worker consuming: the gateway's own cost (auth, validate, store, send),
    with `streams` SSE streams open all along.

    The load generator shares the machine's cores with the gateway, so it is lean: plain
    http.client on one kept-alive connection per client thread (requests costs about a
    millisecond of CPU per call, as much as the submit itself)."""
    body = json.dumps({"type": "generate", "params": {"tags": "piano", "duration_s": 1.0}})
    headers = {"Authorization": f"Bearer {bench.key}", "Content-Type": "application/json"}
    host, port = bench.url.removeprefix("http://").split(":")
    local = threading.local()

    def one(_: int) -> float:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection(host, int(port), timeout=30)
        start = time.perf_counter()
        local.connection.request("POST", "/v1/jobs", body, headers)
        reply = local.connection.getresponse()
        answer = reply.read()
        if reply.status != 202:
            raise RuntimeError(f"submit answered {reply.status}: {answer[:200]!r}")
        return time.perf_counter() - start

    for _ in range(20):  # warm-up
        one(0)
    open_streams(bench, streams)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(submits)))
    elapsed = time.perf_counter() - start
    print(
        f"submit throughput: {submits / elapsed:.0f} req/s ({submits} submits, {clients} "
        f"clients, {streams} SSE streams open); request latency p50 "
        f"{percentile(latencies, 50) * 1000:.1f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:.1f} ms"
    )


def bench_queue_to_start(bench: Bench, jobs: int) -> None:
    """One job at a time on an idle worker: started_at - created_at (both stamped by Redis
    clients on this machine)."""
    latencies = []
    # a seed whose frames never hit audio EOS on the tiny model (its jobs must succeed)
    params = {"tags": "piano,happy", "duration_s": 0.16, "cfg_scale": 1.0, "seed": 3}
    for _ in range(jobs):
        job = bench.submit(params)
        done = bench.wait(job["id"], lambda j: j["state"] in TERMINAL)
        assert done["state"] == "succeeded", done
        latencies.append(done["started_at"] - done["created_at"])
    print(
        f"queue-to-start latency (idle worker, {jobs} jobs): p50 "
        f"{percentile(latencies, 50) * 1000:.1f} ms, p99 {percentile(latencies, 99) * 1000:.1f} ms"
    )


def bench_cancel(bench: Bench, runs: int) -> None:
    """Cancel request sent → job record `cancelled` (the worker writes it after the engine
    dropped the request's rows), on a job that is generating."""
    latencies, frame_times = [], []
    for _ in range(runs):
        job = bench.submit({"tags": "rock", "duration_s": 120.0, "cfg_scale": 1.0, "seed": 17})
        first = bench.wait(job["id"], lambda j: (j.get("frames_done") or 0) >= 5)
        later = bench.wait(job["id"], lambda j, f=first: j["frames_done"] >= f["frames_done"] + 10)
        frame_times.append(
            (time.time() - first["started_at"]) / max(1, later["frames_done"])
        )  # rough frame time incl. prefill
        sent = time.time()
        bench.http.post(f"{bench.url}/v1/jobs/{job['id']}/cancel", timeout=30).raise_for_status()
        final = bench.wait(job["id"], lambda j: j["state"] in TERMINAL)
        assert final["state"] == "cancelled", final
        latencies.append(final["finished_at"] - sent)
    print(
        f"cancel latency (request → job cancelled, engine stopped; {runs} runs): p50 "
        f"{percentile(latencies, 50) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms "
        f"(one frame takes ~{statistics.median(frame_times) * 1000:.0f} ms here)"
    )


def bench_fairness(bench: Bench, backlog: int, small_jobs: int) -> None:
    """Tenant "big" queues `backlog` cheap jobs in one batch; while they drain, tenant "small"
    submits `small_jobs` one after another (the next once the last finished, like a user).
    Queue-to-start of both: the small tenant's stays within about one job's run time (the next
    free slot goes to it), the big tenant's is its wait in its own backlog."""
    tenants = TenantStore(bench.redis)
    sessions = {}
    for name in ("big", "small"):
        sessions[name] = requests.Session()
        sessions[name].headers["Authorization"] = f"Bearer {tenants.create_key(name)}"
    cheap = {"tags": "piano", "duration_s": 0.08, "cfg_scale": 1.0, "seed": 3}
    items = [{"type": "generate", "params": cheap} for _ in range(backlog)]
    reply = sessions["big"].post(f"{bench.url}/v1/batches", json={"items": items}, timeout=120)
    reply.raise_for_status()
    batch_url = f"{bench.url}/v1/batches/{reply.json()['id']}"
    while sessions["big"].get(batch_url, timeout=30).json()["counts"]["queued"] < backlog // 2:
        time.sleep(0.05)  # wait until most of it is queued
    small_ids = []
    for _ in range(small_jobs):
        job = sessions["small"].post(
            f"{bench.url}/v1/jobs", json={"type": "generate", "params": cheap}, timeout=30
        )
        job.raise_for_status()
        small_ids.append(job.json()["id"])
        while (
            sessions["small"]
            .get(f"{bench.url}/v1/jobs/{small_ids[-1]}", timeout=30)
            .json()["state"]
            not in TERMINAL
        ):
            time.sleep(0.05)
    while sessions["big"].get(batch_url, timeout=30).json()["state"] != "completed":
        time.sleep(0.5)
    results = sessions["big"].get(f"{batch_url}/results", timeout=120).text.splitlines()
    big_ids = [json.loads(line)["job_id"] for line in results]
    figures = {}
    for name, ids in (("small", small_ids), ("big", big_ids)):
        waits = []
        for job_id in ids:
            job = sessions[name].get(f"{bench.url}/v1/jobs/{job_id}", timeout=30).json()
            assert job["state"] == "succeeded", job
            waits.append(job["started_at"] - job["created_at"])
        figures[name] = waits
    for name, waits in figures.items():
        print(
            f"fair sharing, tenant {name!r} ({len(waits)} jobs, while {backlog} of 'big' "
            f"drain): queue-to-start p50 {percentile(waits, 50) * 1000:.0f} ms, "
            f"p99 {percentile(waits, 99) * 1000:.0f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--latency-jobs", type=int, default=40)
    parser.add_argument("--cancel-runs", type=int, default=10)
    parser.add_argument("--engine-rows", type=int, default=4)
    parser.add_argument("--sse-streams", type=int, default=200, help="held open during submits")
    parser.add_argument(
        "--only-submit", action="store_true", help="skip the worker benchmarks (no models)"
    )
    parser.add_argument("--backlog", type=int, default=1000)
    parser.add_argument("--small-jobs", type=int, default=30)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="hc-bench-"))
    bench = Bench(root, args.engine_rows)
    try:
        bench.start_gateway()
        bench_submit(bench, args.submits, args.clients, args.sse_streams)
        if args.only_submit:
            return 0
        bench.redis.flushdb()  # drop the queued submits (and their broker messages)
        bench.key = TenantStore(bench.redis).create_key("bench")
        bench.http.headers["Authorization"] = f"Bearer {bench.key}"
        bench.start_worker(concurrency=max(1, args.engine_rows // 2))
        bench_queue_to_start(bench, args.latency_jobs)
        bench_cancel(bench, args.cancel_runs)
        bench_fairness(bench, args.backlog, args.small_jobs)
    finally:
        bench.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
