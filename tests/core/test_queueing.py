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
    assert conf.task_publish_retry_policy["max_retries"] <= 3
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


def test_enqueue_schedules_the_job_and_wakes_its_queue(settings: Settings, redis_client) -> None:
    app = make_celery(settings)
    jobs, scheduler = JobStore(redis_client), FairScheduler(redis_client, Quotas())
    generate = jobs.create(Job.new("acme", "generate", {}))
    encode = jobs.create(Job.new("acme", "encode", {}))
    enqueue(app, scheduler, generate)
    enqueue(app, scheduler, encode)
    assert redis_client.llen("gpu") == 1 and redis_client.llen("cpu") == 1
    message = json.loads(redis_client.lindex("gpu", 0))
    assert message["headers"]["task"] == TASK_NAME
    assert json.loads(base64.b64decode(message["body"]))[0] == ["gpu"]  # a queue, not a job
    assert scheduler.pending("gpu", "acme")["interactive"] == [generate.id]
    assert scheduler.pending("cpu", "acme")["interactive"] == [encode.id]
    enqueue(app, scheduler, generate)  # already waiting: no second wake-up
    jobs.cancel(encode.id)
    enqueue(app, scheduler, encode)  # no longer queued: nothing
    assert redis_client.llen("gpu") == 1 and redis_client.llen("cpu") == 1


def test_enqueue_rejects_unknown_types(settings: Settings, redis_client) -> None:
    scheduler = FairScheduler(redis_client, Quotas())
    with pytest.raises(ValueError, match="unknown job type"):
        enqueue(make_celery(settings), scheduler, Job.new("acme", "karaoke", {}))
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
