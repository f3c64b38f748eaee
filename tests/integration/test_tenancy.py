"""Fair sharing on a real cluster (redis-server, gateway, GPU-queue workers on tiny models):
a newcomer is not stuck behind a backlog, weights split the slots, interactive jobs go first,
running and queued limits hold, and counts stay exact when a worker is killed mid-job.

Jobs are cheap (0.08 s songs, cfg 1) and every assertion is an ordering bound, never a time.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shared.core.jobs import Job
from shared.core.quotas import Quotas, QuotaStore
from shared.core.scheduler import pending_key
from shared.core.tenants import TenantStore
from tests.support.faults import FaultCluster

CHEAP = {"tags": "piano", "duration_s": 0.08, "cfg_scale": 1.0}
LONGER = {"tags": "piano", "duration_s": 2.0, "cfg_scale": 1.0}
ENGINE_ROWS = 4  # two task threads per worker: two slots
SLOTS = ENGINE_ROWS // 2
TIMEOUT_S = 180
# The first jobs to finish while both tenants are backlogged: 2:1 weights give heavy 20 of them.
SPLIT_OF = 30


@pytest.fixture(scope="module")
def cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultCluster]:
    cluster = FaultCluster(
        tmp_path_factory.mktemp("tenancy"), tiny_model_dir, engine_rows=ENGINE_ROWS
    )
    try:
        cluster.start(workers=())  # each test starts the workers it needs
        yield cluster
    finally:
        cluster.close()


def tenant(cluster: FaultCluster, name: str, **quotas: float) -> str:
    cluster.keys[name] = TenantStore(cluster.client()).create_key(name)
    if quotas:
        QuotaStore(cluster.client(), Quotas()).set(name, dict(quotas))
    return name


def post(cluster: FaultCluster, name: str, path: str, body: dict) -> requests.Response:
    return requests.post(
        f"{cluster.url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {cluster.keys[name]}"},
        timeout=30,
    )


def submit_many(cluster: FaultCluster, name: str, n: int, params: dict = CHEAP) -> list[str]:
    return [cluster.submit(name, "generate", {**params, "seed": i}) for i in range(n)]


def usage(cluster: FaultCluster, name: str) -> dict:
    reply = requests.get(
        f"{cluster.url}/v1/usage",
        headers={"Authorization": f"Bearer {cluster.keys[name]}"},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def cancel_all(cluster: FaultCluster, name: str, ids: list[str]) -> None:
    for job_id in ids:
        cluster.cancel(name, job_id)
    cluster.wait_terminal(ids, TIMEOUT_S)


def started(jobs: list[Job]) -> list[Job]:
    return sorted((job for job in jobs if job.started_at), key=lambda job: job.started_at)


@pytest.fixture
def worker(cluster: FaultCluster) -> Iterator[str]:
    cluster.start_worker("gpu-a")
    yield "gpu-a"
    if cluster.alive("gpu-a"):
        cluster.stop_worker("gpu-a")


def test_a_newcomer_starts_before_a_backlog_drains(cluster: FaultCluster, worker: str) -> None:
    big, small = tenant(cluster, "big"), tenant(cluster, "small")
    reply = post(cluster, big, "/v1/batches", {"items": [{"type": "generate", "params": {
        **CHEAP, "seed": i}} for i in range(200)]})  # fmt: skip
    assert reply.status_code == 202, reply.text
    client = cluster.client()
    waiting = pending_key("gpu", big, "batch")
    deadline = time.monotonic() + TIMEOUT_S
    while client.zcard(waiting) < 150:  # the batch sender is putting the items in
        assert time.monotonic() < deadline, "the batch was not queued"
        time.sleep(0.05)
    (newcomer,) = submit_many(cluster, small, 1)
    cluster.wait_terminal([newcomer], TIMEOUT_S)
    mine = cluster.jobs([newcomer])[newcomer]
    assert mine.state == "succeeded"
    items = [line["job_id"] for line in _results(cluster, big, reply.json()["id"])]
    jobs = list(cluster.jobs(items).values())
    ahead = [job for job in jobs if job.started_at and job.started_at < mine.started_at]
    after_submit = [job for job in ahead if job.started_at > mine.created_at]
    # the newcomer waited for at most one job per slot, and the backlog was far from drained
    assert len(after_submit) <= SLOTS, [j.started_at for j in after_submit]
    assert len(ahead) < 100
    assert post(cluster, big, f"/v1/batches/{reply.json()['id']}/cancel", {}).ok
    cluster.wait_terminal(items, TIMEOUT_S)


def test_weights_split_the_slots(cluster: FaultCluster) -> None:
    heavy, light = tenant(cluster, "heavy", weight=2), tenant(cluster, "light")
    mine = {heavy: submit_many(cluster, heavy, 40), light: submit_many(cluster, light, 40)}
    ids = mine[heavy] + mine[light]  # both backlogged before a worker starts
    cluster.start_worker("gpu-a")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while sum(job.state == "succeeded" for job in cluster.jobs(ids).values()) < SPLIT_OF:
            assert time.monotonic() < deadline, "too slow"
            time.sleep(0.2)
    finally:
        cluster.stop_worker("gpu-a")
    done = sorted(
        (job for job in cluster.jobs(ids).values() if job.state == "succeeded"),
        key=lambda job: job.finished_at,
    )[:SPLIT_OF]
    split = Counter(job.tenant for job in done)
    assert 18 <= split[heavy] <= 22 and split[heavy] + split[light] == SPLIT_OF, split
    for name, jobs in mine.items():
        cancel_all(cluster, name, jobs)


def test_interactive_jobs_start_before_earlier_batch_jobs(
    cluster: FaultCluster, worker: str
) -> None:
    name = tenant(cluster, "mixed", max_running=1)
    reply = post(cluster, name, "/v1/batches", {"items": [{"type": "generate", "params": {
        **CHEAP, "seed": i}} for i in range(8)]})  # fmt: skip
    assert reply.status_code == 202, reply.text
    client = cluster.client()
    deadline = time.monotonic() + TIMEOUT_S
    while client.zcard(pending_key("gpu", name, "batch")) < 5:  # one runs, the rest wait
        assert time.monotonic() < deadline, "the batch was not queued"
        time.sleep(0.02)
    submitted_at = time.time()
    interactive = submit_many(cluster, name, 2)
    batch = [line["job_id"] for line in _results(cluster, name, reply.json()["id"])]
    cluster.wait_terminal(interactive + batch, TIMEOUT_S)
    jobs = cluster.jobs(interactive + batch)
    first_interactive = min(jobs[i].started_at for i in interactive)
    later_batch = [jobs[i] for i in batch if jobs[i].started_at > submitted_at]
    assert len(later_batch) >= 4
    # at most the batch job that was already being picked when they arrived starts between
    assert sum(job.started_at < first_interactive for job in later_batch) <= 1
    last_interactive = max(jobs[i].started_at for i in interactive)
    assert sum(job.started_at < last_interactive for job in later_batch) <= 1


def test_running_and_queued_limits_hold_through_a_killed_worker(cluster: FaultCluster) -> None:
    name = tenant(cluster, "limited", max_running=1, max_queued=3)
    cluster.start_worker("gpu-a", wait=False)  # both load at once, then the jobs come
    cluster.start_worker("gpu-b", wait=False)
    cluster.wait_workers(["gpu-a", "gpu-b"])
    ids = submit_many(cluster, name, 1, LONGER)
    running = _running(cluster, ids)
    refused = None
    while refused is None and len(ids) < 10:
        reply = post(cluster, name, "/v1/jobs", {"type": "generate", "params": LONGER})
        if reply.status_code == 429:
            refused = reply
        else:
            assert reply.status_code == 202, reply.text
            ids.append(reply.json()["id"])
    assert refused is not None, "the queued limit never refused"
    error = refused.json()["error"]
    assert error["field"] == "max_queued" and error["message"].startswith("3 jobs queued")
    assert len(ids) >= 4 and usage(cluster, name)["queued"]["limit"] == 3
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            running = [job for job in cluster.jobs(ids).values() if job.state == "running"]
            samples.append(len(running))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        running = _running(cluster, ids)
        on_a = f":{cluster.workers['gpu-a'].pid}:" in (running.worker or "")
        cluster.kill_worker(
            "gpu-a" if on_a else "gpu-b"
        )  # mid-job: its lease lapses and the job runs again
        cluster.wait_terminal(ids, TIMEOUT_S)
    finally:
        stop.set()
        sampler.join()
        cluster.stop_workers([n for n in ("gpu-a", "gpu-b") if cluster.alive(n)])
    jobs = cluster.jobs(ids)
    assert all(job.state == "succeeded" for job in jobs.values()), jobs
    assert jobs[running.id].attempts == 2  # the killed run counted
    assert max(samples) == 1  # never two at once, also while the killed run's lease lapsed
    spans = sorted((job.started_at, job.finished_at) for job in jobs.values())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
    now = usage(cluster, name)
    assert now["running"]["used"] == 0 and now["queued"]["used"] == 0
    assert now["audio_seconds_today"]["used"] == pytest.approx(2.0 * len(ids))


def _running(cluster: FaultCluster, ids: list[str]) -> Job:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        for job in cluster.jobs(ids).values():
            if job.state == "running" and job.worker:
                return job
        time.sleep(0.05)
    raise AssertionError("no job started")


def _results(cluster: FaultCluster, name: str, batch_id: str) -> list[dict]:
    reply = requests.get(
        f"{cluster.url}/v1/batches/{batch_id}/results",
        headers={"Authorization": f"Bearer {cluster.keys[name]}"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return [json.loads(line) for line in reply.text.splitlines() if line]
