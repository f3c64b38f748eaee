"""What every worker process does beside its jobs: queue the jobs of new batches, turn
finished jobs and batches into webhook events, deliver due webhooks, run the retention sweep,
wake queues whose wake-ups were lost.

Each step is coordinated through Redis (shared/core/batches.py, webhooks.py, retention.py) and
safe to run in any number of processes at once, so there is no separate kind of worker to
deploy: four daemon threads per worker process, so that a slow receiver delays only
deliveries and a 10,000-item batch only other batches; the fourth is the fair scheduler's
safety net (a queue with startable jobs and no wake-up gets one). Celery-free:
`workers.celery_app` starts them with its `enqueue` and `wake`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis
import requests

from shared.core.batches import BatchStore, batch_out
from shared.core.config import Settings
from shared.core.jobs import TERMINAL_STATES, Job, JobStore
from shared.core.jobtypes import QUEUES
from shared.core.outage import REDIS_ERRORS, Outage
from shared.core.retention import sweep
from shared.core.scheduler import FairScheduler
from shared.core.schemas import job_out
from shared.core.storage import ObjectStore
from shared.core.webhooks import (
    Delivery,
    TargetRefused,
    WebhookStore,
    backoff_s,
    check_target,
    signed_headers,
)

log = logging.getLogger(__name__)

LEASE_MARGIN_S = 30.0  # a claimed delivery's lease: the request timeout plus this
CHUNK = 1000
SEND_LEASE_S = 60.0  # one worker sends a batch's messages while it holds this lease
SEND_RENEW_EVERY = 100  # messages between lease renewals


def send_batches(
    batches: BatchStore, jobs: JobStore, send: Callable[[Job], None], worker: str
) -> int:
    """Queue the jobs of every batch whose messages are not all sent (one sender per batch,
    under a lease), skipping those no longer queued (cancelled meanwhile); returns how many
    were sent. A send that fails raises, and the rest waits for the next round."""
    sent = handled = 0
    for batch_id in batches.sending():
        if not batches.lease_sending(batch_id, worker, SEND_LEASE_S):
            continue
        while (job_id := batches.next_unsent(batch_id)) is not None:
            job = jobs.get(job_id)
            if job is not None and job.state == "queued":
                send(job)
                sent += 1
            batches.sent(batch_id)
            handled += 1
            renew = handled % SEND_RENEW_EVERY == 0
            if renew and not batches.lease_sending(batch_id, worker, SEND_LEASE_S):
                break  # lost the lease (a long stall): another worker carries on
        else:
            batches.done_sending(batch_id)
    return sent


def emit_events(hooks: WebhookStore, jobs: JobStore, batches: BatchStore) -> int:
    """Create the event of every watched job or batch that has ended; returns how many."""
    emitted = 0
    job_ids: list[str] = []
    for subject in hooks.watched():
        kind, _, subject_id = subject.partition(":")
        if kind == "job":
            job_ids.append(subject_id)
        elif kind == "batch":
            batch = batches.get(subject_id)
            if batch is None:
                hooks.unwatch(subject)
            elif batches.finished(batch.id):
                payload = batch_out(batch, batches.status(batch.id))
                emitted += hooks.emit(batch.tenant, subject, "batch.completed", payload) is not None
    for start in range(0, len(job_ids), CHUNK):
        chunk = job_ids[start : start + CHUNK]
        for job_id, state in zip(chunk, jobs.states(chunk), strict=True):
            job = jobs.get(job_id) if state in TERMINAL_STATES else None
            if state is None:
                hooks.unwatch(f"job:{job_id}")
            elif job is not None:
                event = f"job.{job.state}"
                emitted += hooks.emit(job.tenant, f"job:{job_id}", event, job_out(job)) is not None
    return emitted


def deliver(hooks: WebhookStore, settings: Settings, delivery: Delivery, token: str) -> str:
    """One signed attempt; records it and returns the delivery's state after it."""
    now = time.time()
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    final = False
    signing = hooks.signing_secrets(delivery.tenant, now)
    try:
        if not signing:
            raise TargetRefused("the tenant has no signing secret (POST /v1/webhooks/secret)")
        check_target(delivery.url, settings.webhook_allow_private)
        body = delivery.body.encode()
        with requests.post(
            delivery.url,
            data=body,
            headers=signed_headers(signing, delivery.id, body, now),
            timeout=settings.webhook_timeout_s,
            allow_redirects=False,
            stream=True,  # the receiver's answer is not read: only its status counts
        ) as reply:
            status = reply.status_code
    except TargetRefused as refused:
        error, final = str(refused), True
    except requests.RequestException as failure:
        error = f"{type(failure).__name__}: {failure}"
    attempt = {
        "at": now,
        "status": status,
        "error": error,
        "duration_s": round(time.monotonic() - started, 3),
    }
    if status is not None and 200 <= status < 300:
        state, next_at = "delivered", None
    else:
        if error is None:
            attempt["error"] = f"HTTP {status}"
        delay = backoff_s(
            delivery.attempt_count + 1, settings.webhook_backoff_s, settings.webhook_backoff_max_s
        )
        next_at = time.time() + delay
        if final or next_at - delivery.created_at > settings.webhook_retry_for_s:
            state, next_at = "failed", None
        else:
            state = "pending"
    hooks.settle(delivery, token, attempt, state, next_at)
    return state


def deliver_due(hooks: WebhookStore, settings: Settings) -> int:
    """Deliver every delivery that is due now; returns how many attempts were made."""
    attempts = 0
    lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
    while (claimed := hooks.claim(lease_s)) is not None:
        deliver(hooks, settings, *claimed)
        attempts += 1
    return attempts


def wake_idle_queues(
    scheduler: FairScheduler, client: redis.Redis, wake: Callable[[str], None]
) -> int:
    """The fair scheduler's safety net: a queue with a job that may start now and no wake-up
    waiting in its Celery list gets one (a wake-up lost with a worker, or a parked one whose
    re-send was lost). Every worker does it; at most one extra wake-up per queue and round
    each. Returns how many were sent."""
    sent = 0
    for queue in QUEUES:
        if client.llen(queue) == 0 and scheduler.startable(queue):
            wake(queue)
            sent += 1
    return sent


def push_adrift(scheduler: FairScheduler, jobs: JobStore, send: Callable[[Job], None]) -> int:
    """Queued jobs in no pending set (their requeue or hand-back died before the push) go back
    into the scheduler; pushing is idempotent, so racing the normal path is harmless."""
    pushed = 0
    for job_id in scheduler.adrift():
        job = jobs.get(job_id)
        if job is not None and job.state == "queued":
            send(job)
            pushed += 1
    return pushed


class Background:
    """The daemon threads of one worker process; `stop()` ends them. `send` queues a job,
    `wake` sends a wake-up to a queue."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        store: ObjectStore,
        send: Callable[[Job], None],
        scheduler: FairScheduler,
        wake: Callable[[str], None],
        outage: Outage,
    ) -> None:
        self.settings = settings
        self.outage = outage
        self.client = client
        self.store = store
        self.send = send
        self.scheduler = scheduler
        self.wake = wake
        self._next_adrift_sweep = 0.0
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.hooks = WebhookStore(client)
        self.jobs = JobStore(client)
        self.batches = BatchStore(client)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(step,), name=name, daemon=True)
            for name, step in (
                ("webhook-delivery", self._deliver),
                ("batch-sender", self._send_batches),
                ("wake-ups", self._wake_idle_queues),
                ("sweeps", self._sweep),
            )
        ]

    def start(self) -> Background:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)

    def _deliver(self) -> None:
        deliver_due(self.hooks, self.settings)

    def _send_batches(self) -> None:
        send_batches(self.batches, self.jobs, self.send, self.name)

    def _wake_idle_queues(self) -> None:
        wake_idle_queues(self.scheduler, self.client, self.wake)
        if time.monotonic() >= self._next_adrift_sweep:  # a full scan: once a lease period
            self._next_adrift_sweep = time.monotonic() + self.settings.lease_s
            push_adrift(self.scheduler, self.jobs, self.send)

    def _sweep(self) -> None:
        emit_events(self.hooks, self.jobs, self.batches)
        sweep(self.client, self.store, self.settings)  # at most once per RETENTION_SWEEP_S

    def _loop(self, step: Callable[[], None]) -> None:
        while not self._stop.is_set():
            try:
                step()
                self.outage.ok()
            except REDIS_ERRORS as error:  # Redis away: said once, tried again next round
                self.outage.failed(error)
            except Exception:  # noqa: BLE001 (a receiver or store hiccup: try again next round)
                log.exception("background step %s failed", step.__name__)
            self._stop.wait(self.settings.background_poll_s)
