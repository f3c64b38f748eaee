"""Celery wiring shared by the gateway (which sends) and the workers (which consume).

A message carries no job: it is a wake-up for a queue ("a job may be ready"), put on the broker
by the same Redis script that puts a job in the fair scheduler (shared/core/scheduler.py), so a
pending job never lacks its wake-up; the worker thread that takes one asks the scheduler which
job to run. The gateway never imports workers/: the message names the task. Job state lives in
the job store, not in Celery results. No torch.
"""

from __future__ import annotations

import redis
from celery import Celery
from kombu import Exchange, Queue

from shared.core.broker import TRANSPORT, stored_message
from shared.core.config import Settings
from shared.core.jobs import Job, new_id
from shared.core.jobtypes import QUEUES, job_type
from shared.core.scheduler import FairScheduler

TASK_NAME = "heartcluster.run_next"
# Redis redelivers a message that was delivered but not acknowledged after the visibility
# timeout. Leases make a redelivery harmless (the runner drops a message of a job that another
# worker holds or that has ended), so the timeout can be short: it only brings back messages
# that a worker took and died with before starting them. Every live worker sweeps for them.
REDELIVERY_LEASES = 2  # visibility timeout, in lease periods


def visibility_timeout_s(settings: Settings) -> int:
    return max(1, round(REDELIVERY_LEASES * settings.lease_s))


def make_celery(settings: Settings, main: str = "heartcluster") -> Celery:
    """A Celery app on HEARTCLUSTER_REDIS_URL with the reliability settings of DESIGN.md.

    Workers additionally pass `--statedb` so revoked ids survive a restart.
    """
    app = Celery(main, broker=settings.redis_url, backend=settings.redis_url)
    app.conf.broker_transport = TRANSPORT  # Redis, without the restore that crashes on outages
    transport = {
        "visibility_timeout": visibility_timeout_s(settings),
        "unacked_restore_interval": max(1, round(settings.heartbeat_s)),
        "unacked_restore_throttle": 1,
        # no call may hang while Redis is away
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
    }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # each queue on its own direct exchange, routed by its own name
        task_queues=[Queue(name, Exchange(name), routing_key=name) for name in QUEUES],
        task_default_queue="gpu",
        # a message is acknowledged only when its task ends; a worker that dies mid-task puts
        # it back instead of losing it (the attempt cap in the worker stops poison jobs)
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # a Redis restart must not stop running jobs: their leases (renewed once Redis is back)
        # say who runs them, and a duplicate delivery is dropped by the runner
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # stop = warm shutdown; the runner hands running jobs back (the thread pool cannot
        # kill a task, so a soft/cold shutdown would crash)
        worker_soft_shutdown_timeout=0.0,
        broker_connection_timeout=settings.redis_timeout_s,
        # a wake-up has no result: job state lives in the job store, so workers store none
        task_ignore_result=True,
        task_time_limit=settings.job_time_limit_s,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        result_expires=24 * 3600,
        worker_hijack_root_logger=False,
    )
    return app


def wake_message(queue: str) -> tuple[str, str]:
    """A wake-up for `queue`: (the broker list it goes on, the message as stored there)."""
    return queue, stored_message(queue, TASK_NAME, new_id(), [queue])


def wake(redis_client: redis.Redis, queue: str) -> None:
    """Send one wake-up to `queue`: a worker slot that takes it runs the scheduler's choice."""
    redis_client.lpush(*wake_message(queue))


def enqueue(
    scheduler: FairScheduler, job: Job, transaction: redis.client.Pipeline | None = None
) -> bool | None:
    """Put a queued job in the fair scheduler and its queue's wake-up on the broker, in one
    atomic step: whether it went in (not when the job is no longer queued, e.g. cancelled
    before a batch sender got to it). With `transaction` it joins the caller's (None)."""
    return scheduler.push(job, wake_message(job_type(job.type).queue), transaction)


def consumed_queues(celery_app: Celery, timeout_s: float = 1.0) -> dict[str, bool]:
    """For each queue, whether any live worker consumes it (asks workers over the broker).

    Waits up to `timeout_s` for replies, so callers should keep it short.
    """
    replies = celery_app.control.inspect(timeout=timeout_s).active_queues() or {}
    consumed = {q["name"] for queues in replies.values() for q in queues}
    return {name: name in consumed for name in QUEUES}
