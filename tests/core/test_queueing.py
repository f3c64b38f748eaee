"""Celery wiring against a real redis-server: routing by type, settings, consumer detection."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.core.config import Settings
from shared.core.jobs import Job, JobStore
from shared.core.queueing import (
    TASK_NAME,
    consumed_queues,
    enqueue,
    make_celery,
    visibility_timeout_s,
    wake_message,
)
from shared.core.quotas import Quotas
from shared.core.scheduler import FairScheduler

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings.from_env(
        {"HEARTCLUSTER_REDIS_URL": redis_url, "HEARTCLUSTER_JOB_TIME_LIMIT_S": "120"}
    )


def test_reliability_settings(settings: Settings) -> None:
    conf = make_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    # a Redis restart must not cancel running jobs (their leases say who runs them), and a stop
    # is a warm shutdown (the thread pool cannot kill a task in a soft/cold one)
    assert not conf.worker_cancel_long_running_tasks_on_connection_loss
    assert conf.worker_soft_shutdown_timeout == 0
    transport = conf.broker_transport_options
    assert transport["socket_timeout"] == transport["socket_connect_timeout"] > 0
    assert conf.task_ignore_result  # job state lives in the job store, not in results
    # leases make redelivery harmless, so a message a dead worker took comes back within
    # seconds (swept every heartbeat), not after the longest job
    assert visibility_timeout_s(settings) == 2 * settings.lease_s < settings.job_time_limit_s
    assert conf.broker_transport_options["visibility_timeout"] == visibility_timeout_s(settings)
    assert conf.broker_transport_options["unacked_restore_interval"] == settings.heartbeat_s
    assert conf.result_backend_transport_options["visibility_timeout"] == visibility_timeout_s(
        settings
    )
    assert conf.broker_url == settings.redis_url
    routes = {(q.name, q.exchange.name, q.routing_key) for q in conf.task_queues}
    assert routes == {("gpu", "gpu", "gpu"), ("cpu", "cpu", "cpu"), ("train", "train", "train")}


def test_enqueue_schedules_the_job_and_wakes_its_queue(redis_client) -> None:
    jobs, scheduler = JobStore(redis_client), FairScheduler(redis_client, Quotas())
    generate = jobs.create(Job.new("acme", "generate", {}))
    encode = jobs.create(Job.new("acme", "encode", {}))
    assert enqueue(scheduler, generate) and enqueue(scheduler, encode)
    assert redis_client.llen("gpu") == 1 and redis_client.llen("cpu") == 1
    message = json.loads(redis_client.lindex("gpu", 0))
    assert message["headers"]["task"] == TASK_NAME
    assert json.loads(base64.b64decode(message["body"]))[0] == ["gpu"]  # a queue, not a job
    assert scheduler.pending("gpu", "acme")["interactive"] == [generate.id]
    assert scheduler.pending("cpu", "acme")["interactive"] == [encode.id]
    assert not enqueue(scheduler, generate)  # already waiting: no second wake-up
    jobs.cancel(encode.id)
    assert not enqueue(scheduler, encode)  # no longer queued: nothing
    assert redis_client.llen("gpu") == 1 and redis_client.llen("cpu") == 1


def test_enqueue_in_a_transaction_happens_with_it_or_not_at_all(redis_client) -> None:
    jobs, scheduler = JobStore(redis_client), FairScheduler(redis_client, Quotas())
    job = Job.new("acme", "generate", {})
    transaction = redis_client.pipeline()
    jobs.create(job, transaction)
    assert enqueue(scheduler, job, transaction) is None
    assert jobs.get(job.id) is None and redis_client.llen("gpu") == 0  # nothing before it runs
    transaction.reset()  # dropped: still nothing
    assert jobs.get(job.id) is None and redis_client.llen("gpu") == 0
    transaction = redis_client.pipeline()
    jobs.create(job, transaction)
    enqueue(scheduler, job, transaction)
    transaction.execute()
    assert scheduler.pending("gpu", "acme")["interactive"] == [job.id]
    assert redis_client.llen("gpu") == 1


def test_a_wake_up_is_stored_as_celery_itself_sends_it(settings: Settings, redis_client) -> None:
    """The wake-up the scheduler's script puts on the broker is the list entry Celery's own
    send_task writes, but for its ids: a worker cannot tell them apart."""
    make_celery(settings).send_task(TASK_NAME, args=["gpu"], queue="gpu", ignore_result=True)
    theirs = json.loads(redis_client.rpop("gpu"))
    queue, stored = wake_message("gpu")
    ours = json.loads(stored)
    assert queue == "gpu"
    ids = {"id", "root_id", "origin"}  # the task's own, and the sending host and process
    assert {k: v for k, v in ours["headers"].items() if k not in ids} == {
        k: v for k, v in theirs["headers"].items() if k not in ids
    }
    assert (
        ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
    )
    own = {"correlation_id", "delivery_tag", "reply_to"}
    assert {k: v for k, v in ours["properties"].items() if k not in own} == {
        k: v for k, v in theirs["properties"].items() if k not in own
    }
    assert base64.b64decode(ours["body"]) == base64.b64decode(theirs["body"])
    assert {k: v for k, v in ours.items() if k not in ("headers", "properties")} == {
        k: v for k, v in theirs.items() if k not in ("headers", "properties")
    }
    assert wake_message("gpu")[1] != stored  # each wake-up its own task id and delivery tag


def test_enqueue_rejects_unknown_types(settings: Settings, redis_client) -> None:
    scheduler = FairScheduler(redis_client, Quotas())
    with pytest.raises(ValueError, match="unknown job type"):
        enqueue(scheduler, Job.new("acme", "karaoke", {}))
    assert redis_client.llen("gpu") == 0


def test_consumed_queues_sees_a_live_worker(settings: Settings, redis_client) -> None:
    app = make_celery(settings)
    assert consumed_queues(app, timeout_s=0.2) == {"gpu": False, "cpu": False, "train": False}
    env = {**os.environ, "HEARTCLUSTER_REDIS_URL": settings.redis_url, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.support.probe_celery_app",
            "worker",
            "-Q",
            "cpu",
            "--pool",
            "solo",
            "--concurrency",
            "1",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        seen = consumed_queues(app, timeout_s=0.5)
        while not seen["cpu"] and time.monotonic() < deadline and worker.poll() is None:
            seen = consumed_queues(app, timeout_s=0.5)
        assert seen == {"gpu": False, "cpu": True, "train": False}
    finally:
        worker.terminate()
        worker.wait(timeout=30)
