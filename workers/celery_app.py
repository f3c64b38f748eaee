"""The workers' Celery app: `python -m celery -A workers.celery_app worker -Q gpu --pool threads`.

One process serves one or more queues with a thread pool: every task thread of a GPU worker
submits to the same GenerationEngine, so concurrent generate jobs share one batch. Models are
loaded once, at worker start (`worker_init`), for the queues the worker consumes. The prefork
pool is refused: forked children cannot share one engine (nor CUDA).

Stopping is a warm shutdown (SIGTERM or SIGINT): the thread pool cannot kill a running task, so
the runner stops its jobs itself after a grace period and puts them back in the queue.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import redis
from celery import signals

from shared.core.config import Settings
from shared.core.jobs import JobStore, UploadStore
from shared.core.queueing import TASK_NAME, enqueue, make_celery, wake
from shared.core.quotas import default_quotas
from shared.core.scheduler import FairScheduler
from shared.core.storage import store_from_settings
from workers import metrics
from workers.background import Background
from workers.models import WorkerModels
from workers.runner import JobRunner

log = logging.getLogger(__name__)

settings = Settings.from_env()
app = make_celery(settings)
app.conf.worker_pool = "threads"  # the default here; `--pool prefork` is refused below
LEGACY_TASK_NAME = "heartcluster.run_job"  # a job id per message, sent before the scheduler

_runner: JobRunner | None = None
_runner_lock = threading.Lock()


@functools.cache
def _redis_client() -> redis.Redis:
    """This process's Redis client: socket timeouts, so no call hangs while Redis is away."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )


def runner() -> JobRunner:
    """This process's JobRunner (built once; models load on first use if not preloaded)."""
    global _runner
    with _runner_lock:
        if _runner is None:
            client = _redis_client()
            scheduler = FairScheduler(client, default_quotas(settings))
            _runner = JobRunner(
                settings,
                JobStore(client),
                store_from_settings(settings),
                WorkerModels(settings),
                UploadStore(client),
                enqueue=lambda job: enqueue(scheduler, job),
                scheduler=scheduler,
                wake=lambda queue: wake(client, queue),
            )
        return _runner


@signals.worker_init.connect
def _load_models(sender: Any, **_: Any) -> None:
    # Celery leaves the root logger alone (worker_hijack_root_logger=False): ours go to stderr,
    # with the lifecycle lines (leases, hand-backs, outages) at INFO.
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s %(levelname)s %(name)s] %(message)s"
    )
    pool = getattr(sender.pool_cls, "__module__", str(sender.pool_cls))
    if "prefork" in pool:
        # SystemExit: Celery logs and swallows ordinary exceptions raised by signal handlers.
        raise SystemExit(
            "heartcluster workers share one model per process: start them with "
            "`--pool threads` (or `--pool solo`), e.g. `heartcluster worker gpu`"
        )
    queues = set(sender.app.amqp.queues.consume_from or sender.app.amqp.queues)
    log.info("loading models for queues %s", sorted(queues))
    try:
        runner().models.preload(queues)
    except Exception as error:
        # A worker without its models must not take jobs: stop it, saying why.
        log.exception("loading models failed")
        raise SystemExit(f"heartcluster worker: loading models failed: {error}") from error
    runner().leases.start()  # renews this worker's leases and reaps lost workers' jobs, idle or not
    metrics.serve(settings.metrics_port, runner().models)


@signals.worker_shutting_down.connect
def _hand_back_on_stop(**_: Any) -> None:
    """SIGTERM/SIGINT: Celery stops consuming and waits for running tasks (warm shutdown);
    the runner lets them finish for HEARTCLUSTER_STOP_GRACE_S, then hands them back."""
    if _runner is not None:
        _runner.stop(settings.stop_grace_s)


@signals.worker_shutdown.connect
def _stop_engine(**_: Any) -> None:
    if _runner is not None:
        _runner.close()
        _runner.models.close()


@app.task(name=TASK_NAME)
def run_next(queue: str) -> None:
    """A wake-up for `queue` (the gateway sends it by this task's name, never importing it):
    run the fair scheduler's next job."""
    runner().run_next(queue)


@app.task(name=LEGACY_TASK_NAME)
def run_job(job_id: str) -> None:
    """A message of the version before the fair scheduler, still queued after an upgrade."""
    runner().run(job_id)


# ----- batches, webhooks, retention (workers/background.py): beside the jobs, every worker ---

_background: Background | None = None


@signals.worker_ready.connect
def _start_background(**_: Any) -> None:
    """Beside the jobs: shares the runner's Redis client and its outage log (one line each way
    when Redis goes away and comes back, whichever thread notices)."""
    global _background
    jobs = runner()
    scheduler = FairScheduler(_redis_client(), default_quotas(settings))
    _background = Background(
        settings,
        _redis_client(),
        jobs.objects,
        lambda job: enqueue(scheduler, job),
        scheduler,
        lambda queue: wake(scheduler.redis, queue),
        jobs.outage,
    ).start()


@signals.worker_shutdown.connect
def _stop_background(**_: Any) -> None:
    if _background is not None:
        _background.stop()
