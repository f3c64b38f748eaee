"""The workers' background steps against a real redis-server and a real HTTP receiver on
loopback: events for finished jobs and batches, signed at-least-once delivery with backoff."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shared.core.batches import Batch, BatchStore
from shared.core.config import Settings
from shared.core.jobs import Job, JobStore
from shared.core.webhooks import WebhookStore, verify
from tests.support.receiver import Receiver
from workers.background import deliver_due, emit_events, send_batches


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings.from_env(
        {
            "HEARTCLUSTER_REDIS_URL": redis_url,
            "HEARTCLUSTER_DATA_DIR": str(tmp_path),
            "HEARTCLUSTER_WEBHOOK_ALLOW_PRIVATE": "1",
            "HEARTCLUSTER_WEBHOOK_BACKOFF_S": "0.05",
            "HEARTCLUSTER_WEBHOOK_BACKOFF_MAX_S": "0.1",
            "HEARTCLUSTER_WEBHOOK_TIMEOUT_S": "2",
        }
    )


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


def finished_job(jobs: JobStore, hooks: WebhookStore, url: str, tenant: str = "acme") -> Job:
    job = jobs.create(Job.new(tenant, "generate", {"tags": "piano"}))
    hooks.watch(f"job:{job.id}", url)
    jobs.start(job.id)
    return jobs.succeed(job.id, ["metadata.json"])


def deliver_until(hooks, settings, done, timeout_s: float = 10.0) -> None:
    """Run the delivery step (as the worker thread does) until `done()`."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "deliveries did not finish"
        deliver_due(hooks, settings)
        time.sleep(0.02)


def test_finished_jobs_are_delivered_signed(redis_client, settings, receiver) -> None:
    jobs, hooks = JobStore(redis_client), WebhookStore(redis_client)
    secret = hooks.rotate_secret("acme")
    running = jobs.create(Job.new("acme", "generate", {"tags": "x"}))
    hooks.watch(f"job:{running.id}", receiver.url)
    job = finished_job(jobs, hooks, receiver.url)
    assert emit_events(hooks, jobs, BatchStore(redis_client)) == 1  # the running one waits
    assert emit_events(hooks, jobs, BatchStore(redis_client)) == 0
    deliver_until(hooks, settings, lambda: len(receiver.requests()) == 1)
    (request,) = receiver.requests()
    assert verify(secret, request.headers, request.body)
    assert not verify(secret, request.headers, request.body.replace(b"succeeded", b"failed"))
    assert request.payload["type"] == "job.succeeded"
    assert request.payload["data"]["id"] == job.id and "tenant" not in request.payload["data"]
    (delivery,) = hooks.for_subject(f"job:{job.id}")
    assert delivery.state == "delivered" and delivery.attempts[0]["status"] == 200
    assert delivery.id == request.headers["webhook-id"]


def test_a_failing_receiver_gets_the_event_once_it_recovers(
    redis_client, settings, receiver
) -> None:
    jobs, hooks = JobStore(redis_client), WebhookStore(redis_client)
    secret = hooks.rotate_secret("acme")
    receiver.status = 500
    job = finished_job(jobs, hooks, receiver.url)
    emit_events(hooks, jobs, BatchStore(redis_client))
    deliver_until(hooks, settings, lambda: len(receiver.requests()) >= 3)
    (delivery,) = hooks.for_subject(f"job:{job.id}")
    assert delivery.state == "pending" and delivery.attempts[0]["error"] == "HTTP 500"
    receiver.status = 204
    deliver_until(hooks, settings, lambda: hooks.get(delivery.id).state == "delivered")
    seen = receiver.requests()
    assert {r.headers["webhook-id"] for r in seen} == {delivery.id}  # one id: receivers dedupe
    assert all(verify(secret, r.headers, r.body) for r in seen)
    assert hooks.get(delivery.id).attempt_count == len(seen)


def test_a_receiver_that_is_down_gets_it_when_it_comes_back(redis_client, settings) -> None:
    jobs, hooks = JobStore(redis_client), WebhookStore(redis_client)
    hooks.rotate_secret("acme")
    down = Receiver()
    down.close()  # nothing listens on its port now
    job = finished_job(jobs, hooks, down.url)
    emit_events(hooks, jobs, BatchStore(redis_client))
    (delivery,) = hooks.for_subject(f"job:{job.id}")
    deliver_until(hooks, settings, lambda: hooks.get(delivery.id).attempt_count >= 2)
    assert "ConnectionError" in hooks.get(delivery.id).attempts[0]["error"]
    back = Receiver(port=down.port)
    try:
        deliver_until(hooks, settings, lambda: hooks.get(delivery.id).state == "delivered")
        assert [r.headers["webhook-id"] for r in back.requests()] == [delivery.id]
    finally:
        back.close()


def test_retries_stop_after_the_configured_time(redis_client, settings, receiver) -> None:
    jobs, hooks = JobStore(redis_client), WebhookStore(redis_client)
    hooks.rotate_secret("acme")
    receiver.status = 503
    short = Settings(**{**settings.__dict__, "webhook_retry_for_s": 0.3})
    job = finished_job(jobs, hooks, receiver.url)
    emit_events(hooks, jobs, BatchStore(redis_client))
    (delivery,) = hooks.for_subject(f"job:{job.id}")
    deliver_until(hooks, short, lambda: hooks.get(delivery.id).state == "failed")
    assert hooks.get(delivery.id).attempt_count >= 2


def test_a_batch_completes_with_one_event(redis_client, settings, receiver) -> None:
    jobs, hooks, batches = (
        JobStore(redis_client),
        WebhookStore(redis_client),
        BatchStore(redis_client),
    )
    secret = hooks.rotate_secret("acme")
    items = [jobs.create(Job.new("acme", "generate", {"tags": "x"})) for _ in range(3)]
    batch = batches.create(
        Batch.new("acme", 3, "hash", receiver.url),
        [(f"c{i}", j.id) for i, j in enumerate(items)],
        to_send=[],
    )
    hooks.watch(f"batch:{batch.id}", receiver.url)
    for job in items[:2]:
        jobs.start(job.id)
        jobs.succeed(job.id, [])
    assert emit_events(hooks, jobs, batches) == 0
    jobs.cancel(items[2].id)
    assert emit_events(hooks, jobs, batches) == 1
    deliver_until(hooks, settings, lambda: len(receiver.requests()) == 1)
    (request,) = receiver.requests()
    assert verify(secret, request.headers, request.body)
    assert request.payload["type"] == "batch.completed"
    data = request.payload["data"]
    assert data["id"] == batch.id and data["state"] == "completed"
    assert data["counts"]["succeeded"] == 2 and data["counts"]["cancelled"] == 1


def test_workers_queue_a_batch_in_order_once(redis_client) -> None:
    jobs, batches = JobStore(redis_client), BatchStore(redis_client)
    items = [jobs.create(Job.new("acme", "generate", {"tags": "x"})) for _ in range(5)]
    ids = [job.id for job in items]
    batch = batches.create(Batch.new("acme", 5, "h", None), [(None, i) for i in ids], ids)
    jobs.cancel(ids[3])  # cancelled before its message went out: never sent
    sent: list[str] = []

    def flaky(job: Job) -> None:
        if job.id == ids[2] and ids[2] not in sent:
            sent.append(job.id)  # the message went out, then the sender "died"
            raise ConnectionError("worker lost")
        sent.append(job.id)

    with pytest.raises(ConnectionError):
        send_batches(batches, jobs, flaky, "worker-1")
    assert not batches.lease_sending(batch.id, "worker-2", 60)  # worker-1 holds it...
    redis_client.delete(f"batch-sender:{batch.id}")  # ...until its lease runs out
    assert send_batches(batches, jobs, flaky, "worker-2") == 2
    assert sent == [ids[0], ids[1], ids[2], ids[2], ids[4]]  # at least once, in order
    assert batches.sending() == [] and batches.next_unsent(batch.id) is None
    assert send_batches(batches, jobs, flaky, "worker-2") == 0
