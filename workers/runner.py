"""One job through its states: load, start, run its type's handler, write artifacts, finish.

Celery-free (the tasks in workers.celery_app are one line over `JobRunner.run_next`), so the
lifecycle rules live in one place: which queued job a freed slot runs is the fair scheduler's
choice, made and started in one step; a job runs only under a lease (a cancelled or terminal
job, or one another worker holds, never runs; one whose worker was lost too often fails with
`too_many_attempts`); artifacts are written only after the pipeline succeeded, right after
renewing the lease (metadata.json last, as the completeness marker) and under the job's own keys
(a rerun overwrites them with the same content); every final state change is fenced by the lease
and retried while Redis is away; a cancelled or failed job leaves no artifacts behind, and a
succeeded one never loses them to a Redis error. A stopping worker hands its jobs back.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from shared.core.audio import AudioError
from shared.core.config import Settings
from shared.core.inputs import InputResolver
from shared.core.jobs import Job, JobStore, Lease, UploadStore, new_id
from shared.core.jobtypes import JOB_TYPES, parse_params
from shared.core.outage import REDIS_ERRORS, Outage
from shared.core.progress import Aborted, share_of
from shared.core.quotas import QuotaStore
from shared.core.scheduler import FairScheduler, Picked
from shared.core.schemas import AUDIO_ARTIFACTS, invalid_request
from shared.core.storage import METADATA, ObjectStore, artifact_key, content_type_for, job_prefix
from shared.core.tokens import InputError
from shared.ml.generation.engine import RequestError
from shared.ml.pipelines import NothingGenerated
from workers import metrics
from workers.handlers import HANDLERS, JobContext, Output
from workers.lease import LeaseKeeper
from workers.models import WorkerModels
from workers.progress import ProgressReporter

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Progress share of the handler; uploading the artifacts takes the rest.
PIPELINE_SHARE = 0.95
# How often a running job asks Redis whether it was cancelled (the engine asks every frame).
CANCEL_POLL_S = 0.1


class _QuietProgress:
    """The job store as the progress reporter sees it: a progress write while Redis is away is
    dropped (the next one carries the news) and logged once, not as a traceback per write."""

    def __init__(self, jobs: JobStore, outage: Outage) -> None:
        self._jobs = jobs
        self._outage = outage

    def progress(self, job_id: str, *args: Any, **kwargs: Any) -> None:
        try:
            self._jobs.progress(job_id, *args, **kwargs)
        except REDIS_ERRORS as error:
            self._outage.failed(error)
            return
        self._outage.ok()


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        jobs: JobStore,
        objects: ObjectStore,
        models: WorkerModels,
        uploads: UploadStore,
        enqueue: Callable[[Job], None],
        scheduler: FairScheduler,
        wake: Callable[[str], None],
        worker: str | None = None,
    ) -> None:
        self.settings = settings
        self.enqueue = enqueue  # a queued job into the scheduler (waiting, requeued, handed back)
        self.scheduler = scheduler
        self.wake = wake  # sends one wake-up to a queue
        self.usage = QuotaStore(scheduler.redis, scheduler.defaults)
        self.jobs = jobs
        self.objects = objects
        self.models = models
        self.uploads = uploads
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{new_id()[:6]}"
        self.outage = Outage(log)
        self.leases = LeaseKeeper(jobs, settings, self.worker, self._on_reaped, self.outage)
        self._stopping = threading.Event()  # take no new job
        self._handing_back = threading.Event()  # abort running jobs and requeue them
        self.inputs = InputResolver(jobs, uploads, objects)

    # ----- lifecycle --------------------------------------------------------------------------

    def run(self, job_id: str) -> None:
        """Run one named job (a message sent before the fair scheduler, or a test)."""
        try:
            self._run(job_id)
        finally:
            self._store(lambda: self._release_dependents(job_id))

    def run_next(self, queue: str) -> None:
        """A wake-up for `queue`: run the job the fair scheduler picks for this free slot."""
        if self._stopping.is_set():  # leave it to another worker
            self._send_wake(queue)
            return
        picked: Picked = self._store(
            lambda: self.scheduler.next(
                queue, self.worker, self.settings.lease_s, self.settings.max_attempts
            )
        )
        for ended in picked.ended:  # cancelled or out of attempts instead of running
            if ended.state == "failed":
                self._delete_artifacts(ended)
            self._store(lambda ended=ended: self._release_dependents(ended.id))
        if picked.job is None or picked.lease is None:
            return
        job, lease = picked.job, picked.lease
        lost = self.leases.hold(lease)
        metrics.job_started(job)
        try:
            self._run_started(job, lease, lost)
        finally:
            self.leases.release(lease)
            self._store(lambda: self._release_dependents(job.id))
            self._slot_freed(job)

    def _slot_freed(self, job: Job) -> None:
        """A run ended: a train-queue job's time counts as fine-tune GPU-seconds, and wake-ups
        parked while its tenant (or any) was at its running limit go out again."""
        try:
            if JOB_TYPES[job.type].queue == "train":
                ended = self.jobs.get(job.id)
                if ended is not None and ended.started_at and ended.finished_at:
                    self.usage.add_gpu_seconds(job.tenant, ended.finished_at - ended.started_at)
            for queue in self.scheduler.unpark():
                self.wake(queue)
        except REDIS_ERRORS as error:  # Redis away: said once; the safety net wakes queues later
            self.outage.failed(error)
        except Exception:  # noqa: BLE001 (each worker's safety net sends missing wake-ups)
            log.exception("job %s: after-run bookkeeping failed", job.id)

    def _send_wake(self, queue: str) -> None:
        try:
            self._store(lambda: self.wake(queue))
        except Exception:  # noqa: BLE001 (each worker's safety net sends missing wake-ups)
            log.exception("could not pass a wake-up for queue %s on", queue)

    def stop(self, grace_s: float) -> None:
        """Take no new job; after `grace_s`, running jobs stop and go back to the queue."""
        self._stopping.set()
        timer = threading.Timer(grace_s, self._handing_back.set)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        self.leases.close()

    def _release_dependents(self, job_id: str) -> None:
        """Jobs waiting on this one (an extend after its encode step) go on once it ended:
        queued when it succeeded, cancelled with it, failed naming it otherwise."""
        job = self.jobs.get(job_id)
        if job is None or not job.terminal:
            return
        for dependent_id in self.jobs.take_dependents(job_id):
            dependent = self.jobs.get(dependent_id)
            if dependent is None or dependent.terminal:
                continue
            if job.state == "succeeded":
                try:
                    self.enqueue(dependent)
                except Exception as error:  # noqa: BLE001 (it must not stay waiting forever)
                    self.jobs.fail(dependent_id, "enqueue_failed", f"could not queue it: {error}")
            elif job.state == "cancelled":
                self.jobs.cancel(dependent_id)
            else:
                reason = job.error["message"] if job.error else job.state
                self.jobs.fail(
                    dependent_id,
                    "dependency_failed",
                    f"its {job.type} step {job.id} ended {job.state}: {reason}",
                )

    def _run(self, job_id: str) -> None:
        if self._stopping.is_set():  # delivered while this worker stops: leave it to another
            job = self._store(lambda: self.jobs.get(job_id))
            if job is not None and job.state == "queued":
                self._send(job)
            return
        outcome, job, lease = self._store(
            lambda: self.jobs.acquire(
                job_id, self.worker, self.settings.lease_s, self.settings.max_attempts
            )
        )
        if job is None:
            log.warning("job %s: no record; message dropped", job_id)
            return
        if outcome == "too_many_attempts":
            self._delete_artifacts(job)
        if lease is None:
            log.info("job %s: %s (%s); not running it", job_id, outcome, job.state)
            return
        lost = self.leases.hold(lease)
        metrics.job_started(job)
        try:
            self._run_started(job, lease, lost)
        finally:
            self.leases.release(lease)

    def _run_started(self, job: Job, lease: Lease, lost: threading.Event) -> None:
        if job.type not in HANDLERS:
            self._end_failed(
                job, lease, "unsupported", f"this worker does not run {job.type!r} jobs"
            )
            return
        deadline = time.monotonic() + self._time_limit(job)
        reason: str | None = None  # why the run stops early: see _aborted
        last_poll = -CANCEL_POLL_S

        def should_abort() -> bool:
            """Called by the engine every frame for every job: it must answer fast and never
            raise, so Redis is asked at most every CANCEL_POLL_S."""
            nonlocal reason, last_poll
            now = time.monotonic()
            if reason is not None:
                pass
            elif now > deadline:
                reason = "time_limit"
            elif lost.is_set():
                reason = "lease_lost"
            elif self._handing_back.is_set():
                reason = "stopping"
            elif now - last_poll >= CANCEL_POLL_S:
                last_poll = now
                try:
                    if self.jobs.cancel_requested(job.id):
                        reason = "cancelled"
                    self.outage.ok()
                except REDIS_ERRORS as error:  # Redis away: keep running, say so once
                    self.outage.failed(error)
            return reason is not None

        try:
            with ProgressReporter(_QuietProgress(self.jobs, self.outage), job.id) as progress:
                entry = JOB_TYPES[job.type]
                params = parse_params(entry, job.params, self.settings)
                inputs = self.inputs.resolve(job.tenant, entry.inputs, params)
                if entry.check is not None:
                    entry.check(params, inputs, self.settings)
                context = JobContext(
                    job,
                    params,
                    inputs,
                    self.models,
                    self.inputs,
                    self.settings,
                    share_of(metrics.counting_frames(progress), 0.0, PIPELINE_SHARE),
                    should_abort,
                )
                output = HANDLERS[job.type](context)
                progress("uploading", PIPELINE_SHARE)
                # Fencing of the artifacts: write only right after renewing the lease (a write
                # takes far less than a lease period); the succeed below is fenced in Redis.
                if should_abort() or self._store(
                    lambda: self.jobs.renew([lease], self.settings.lease_s)
                ):
                    reason = reason or "lease_lost"
                    raise Aborted("aborted before uploading")
                names, size = self._write_artifacts(job, entry.artifact_names(params), output)
                progress("uploading", 1.0)
        except Aborted:
            self._aborted(job, lease, reason)
            return
        except REDIS_ERRORS as error:  # inputs unreadable while Redis is away: run it later
            log.warning("job %s: Redis away while running (%s); handing it back", job.id, error)
            self._hand_back(job, lease)
            return
        except ValidationError as error:  # "field: message", as the gateway names it
            self._end_failed(job, lease, "invalid_params", str(invalid_request(error)))
            return
        except (RequestError, InputError, AudioError) as error:
            self._end_failed(job, lease, "invalid_params", str(error))
            return
        except NothingGenerated as error:
            self._end_failed(job, lease, "nothing_generated", str(error))
            return
        except Exception as error:  # noqa: BLE001 (any failure ends the job with its reason)
            log.exception("job %s failed", job.id)
            self._end_failed(job, lease, "internal_error", f"{type(error).__name__}: {error}")
            return
        log.info(
            "job %s: pipeline finished (attempt %d, worker %s)", job.id, job.attempts, self.worker
        )
        # Never deletes the artifacts: a succeed that cannot reach Redis is retried, and past
        # that the lease expires and the job runs again, overwriting them.
        done = self._settle(
            job, lease, "succeeded", lambda: self.jobs.succeed(job.id, names, lease.lease_id, size)
        )
        if done:
            if any(name in AUDIO_ARTIFACTS for name in output.files):
                metrics.audio_decoded(float(output.metadata.get("duration_s", 0.0)))
            log.info("job %s succeeded (worker %s)", job.id, self.worker)

    def _time_limit(self, job: Job) -> int:
        """A fine-tune (train queue) runs for hours; every other job within the job limit."""
        if JOB_TYPES[job.type].queue == "train":
            return self.settings.train_time_limit_s
        return self.settings.job_time_limit_s

    def _aborted(self, job: Job, lease: Lease, reason: str | None) -> None:
        if reason == "time_limit":
            name = "TRAIN" if JOB_TYPES[job.type].queue == "train" else "JOB"
            self._end_failed(
                job,
                lease,
                "time_limit",
                f"ran past HEARTCLUSTER_{name}_TIME_LIMIT_S={self._time_limit(job)}",
            )
        elif reason == "lease_lost":
            log.warning("job %s: lease lost; this run's outcome is dropped", job.id)
        elif reason == "stopping":
            self._hand_back(job, lease)
        elif self._settle(
            job, lease, "cancelled", lambda: self.jobs.mark_cancelled(job.id, lease.lease_id)
        ):
            self._delete_artifacts(job)

    def _hand_back(self, job: Job, lease: Lease) -> None:
        """Back to the queue at once (a stopping worker, or Redis away mid-run)."""
        queued = self._store(lambda: self.jobs.hand_back(lease))
        if queued is not None:
            log.info("job %s: handed back to the queue", job.id)
            self._send(queued)

    def _end_failed(self, job: Job, lease: Lease, code: str, message: str) -> None:
        """Fenced: a worker that lost the job neither fails it nor deletes the artifacts."""
        if self._settle(
            job, lease, "failed", lambda: self.jobs.fail(job.id, code, message, lease.lease_id)
        ):
            self._delete_artifacts(job)

    def _settle(self, job: Job, lease: Lease, state: str, change: Callable[[], Job | None]) -> bool:
        """Apply a fenced final change, retried while Redis is away. True when the job ended in
        `state` under this lease (also when a retry finds the first try had landed)."""
        settled = self._settled(lease, state, change)
        if settled:
            metrics.job_ended(job, state)
        return settled

    def _settled(self, lease: Lease, state: str, change: Callable[[], Job | None]) -> bool:
        try:
            if self._store(change) is not None:
                return True
            job = self._store(lambda: self.jobs.get(lease.job_id))
        except REDIS_ERRORS:
            log.error(
                "job %s: Redis away past HEARTCLUSTER_REDIS_RETRY_S; its lease will expire and "
                "it will run again",
                lease.job_id,
            )
            return False
        if job is not None and job.state == state and job.lease_id == lease.lease_id:
            return True
        log.warning("job %s: lease lost; not marking it %s", lease.job_id, state)
        return False

    def _store(self, call: Callable[[], _T]) -> _T:
        """A job-store call, retried while Redis is away (logged once), up to REDIS_RETRY_S."""
        deadline = time.monotonic() + self.settings.redis_retry_s
        while True:
            try:
                result = call()
            except REDIS_ERRORS as error:
                self.outage.failed(error)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(1.0, self.settings.heartbeat_s))
                continue
            self.outage.ok()
            return result

    def _send(self, job: Job) -> None:
        try:
            self._store(lambda: self.enqueue(job))
        except Exception:  # noqa: BLE001 (every worker's sweep pushes jobs left adrift)
            log.exception("job %s: could not put it back in the scheduler", job.id)

    def _on_reaped(self, outcome: str, job: Job) -> None:
        """A lost worker's job: requeued (back into the scheduler) or ended (clean up); either
        way its tenant's slot is free."""
        if outcome == "requeued":
            try:  # no long retry here: this runs on the heartbeat thread, which must keep beating
                self.enqueue(job)
            except Exception:  # noqa: BLE001 (every worker's sweep pushes jobs left adrift)
                log.exception("job %s: could not put it back in the scheduler", job.id)
        else:
            self._delete_artifacts(job)
            self._release_dependents(job.id)
        self._slot_freed(job)

    def _write_artifacts(
        self, job: Job, declared: tuple[str, ...], output: Output
    ) -> tuple[list[str], int]:
        """Every file, then metadata.json: a job without metadata is incomplete. The files must
        be the ones its registry entry declares (clients and downloads rely on those names).
        Returns their names and total bytes (the tenant's storage)."""
        if {*output.files, METADATA} != set(declared):
            raise RuntimeError(f"{job.type} wrote {sorted(output.files)}, declared {declared}")
        for name, data in output.files.items():
            key = artifact_key(job.tenant, job.id, name)
            self.objects.put_bytes(key, data, content_type_for(name))
        metadata = {
            "job_id": job.id,
            "type": job.type,
            "model_version": self.models.model_version,
            "tiny_model": self.models.tiny,
            **output.metadata,
        }
        payload = json.dumps(metadata, indent=2, sort_keys=True).encode()
        self.objects.put_bytes(
            artifact_key(job.tenant, job.id, METADATA), payload, content_type_for(METADATA)
        )
        size = len(payload) + sum(len(data) for data in output.files.values())
        return [*output.files, METADATA], size

    def _delete_artifacts(self, job: Job) -> None:
        try:
            self.objects.delete_prefix(job_prefix(job.tenant, job.id))
        except Exception:  # noqa: BLE001 (cleanup must not hide the job's real outcome)
            log.exception("job %s: deleting partial artifacts failed", job.id)
