"""One job through its states: load, start, run its type's handler, write artifacts, finish.

Celery-free (the task in workers.celery_app is one line over `JobRunner.run`), so the lifecycle
rules live in one place: a cancelled or terminal job never runs, a job redelivered too often
fails with `too_many_attempts`, artifacts are written only after the pipeline succeeded
(metadata.json last, as the completeness marker) and under the job's own keys (a retry
overwrites them with the same content), and a cancelled or failed job leaves none behind.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from pydantic import ValidationError

from shared.core.audio import AudioError
from shared.core.config import Settings
from shared.core.inputs import InputResolver
from shared.core.jobs import Job, JobStore, UploadStore
from shared.core.jobtypes import JOB_TYPES, parse_params
from shared.core.schemas import invalid_request
from shared.core.storage import METADATA, ObjectStore, artifact_key, content_type_for, job_prefix
from shared.core.tokens import InputError
from shared.ml.generation.engine import RequestError
from shared.ml.pipelines import NothingGenerated, PipelineAborted
from workers.handlers import HANDLERS, PIPELINE_SHARE, JobContext, Output
from workers.models import WorkerModels
from workers.progress import ProgressReporter

log = logging.getLogger(__name__)

# How often a running job asks Redis whether it was cancelled (the engine asks every frame).
CANCEL_POLL_S = 0.1


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        jobs: JobStore,
        objects: ObjectStore,
        models: WorkerModels,
        uploads: UploadStore,
        enqueue: Callable[[Job], None],
    ) -> None:
        self.settings = settings
        self.enqueue = enqueue  # sends a job waiting on a finished one
        self.jobs = jobs
        self.objects = objects
        self.models = models
        self.uploads = uploads
        self.inputs = InputResolver(jobs, uploads, objects)

    # ----- lifecycle --------------------------------------------------------------------------

    def run(self, job_id: str) -> None:
        try:
            self._run(job_id)
        finally:
            self._release_dependents(job_id)

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
        job = self.jobs.get(job_id)
        if job is None:
            log.warning("job %s: no record; message dropped", job_id)
            return
        if job.terminal:
            log.info("job %s is already %s; not running it", job_id, job.state)
            return
        if job.attempts >= self.settings.max_attempts:
            self._delete_artifacts(job)
            self.jobs.fail(
                job_id,
                "too_many_attempts",
                f"gave up after {job.attempts} attempts (HEARTCLUSTER_MAX_ATTEMPTS="
                f"{self.settings.max_attempts}); the worker running it was lost each time",
            )
            return
        started = self.jobs.start(job_id)
        if started is None:
            return
        if started.cancel_requested:  # redelivered after a cancel reached its lost worker
            self.jobs.mark_cancelled(job_id)
            return
        self._run_started(started)

    def _run_started(self, job: Job) -> None:
        if job.type not in HANDLERS:
            self.jobs.fail(job.id, "unsupported", f"this worker does not run {job.type!r} jobs")
            return
        deadline = time.monotonic() + self.settings.job_time_limit_s
        timed_out = cancelled = False
        last_poll = -CANCEL_POLL_S

        def should_abort() -> bool:
            """Called by the engine every frame for every job: it must answer fast and never
            raise, so Redis is asked at most every CANCEL_POLL_S."""
            nonlocal timed_out, cancelled, last_poll
            now = time.monotonic()
            if now > deadline:
                timed_out = True
                return True
            if not cancelled and now - last_poll >= CANCEL_POLL_S:
                last_poll = now
                try:
                    cancelled = self.jobs.cancel_requested(job.id)
                except Exception:  # noqa: BLE001 (a Redis hiccup must not abort the batch)
                    log.exception("job %s: reading the cancel flag failed", job.id)
            return cancelled

        try:
            with ProgressReporter(self.jobs, job.id) as progress:
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
                    progress,
                    should_abort,
                )
                output = HANDLERS[job.type](context)
                progress.update("uploading", PIPELINE_SHARE)
                if should_abort():
                    raise PipelineAborted
                names = self._write_artifacts(job, entry.artifact_names(params), output)
                progress.update("uploading", 100.0)
            if should_abort():
                raise PipelineAborted
            self.jobs.succeed(job.id, names)
        except PipelineAborted:
            if timed_out:
                limit = self.settings.job_time_limit_s
                self._end_failed(
                    job, "time_limit", f"ran past HEARTCLUSTER_JOB_TIME_LIMIT_S={limit}"
                )
            else:
                self._delete_artifacts(job)
                self.jobs.mark_cancelled(job.id)
        except ValidationError as error:  # "field: message", as the gateway names it
            self._end_failed(job, "invalid_params", str(invalid_request(error)))
        except (RequestError, InputError, AudioError) as error:
            self._end_failed(job, "invalid_params", str(error))
        except NothingGenerated as error:
            self._end_failed(job, "nothing_generated", str(error))
        except Exception as error:  # noqa: BLE001 (any failure ends the job with its reason)
            log.exception("job %s failed", job.id)
            self._end_failed(job, "internal_error", f"{type(error).__name__}: {error}")

    def _end_failed(self, job: Job, code: str, message: str) -> None:
        self._delete_artifacts(job)
        self.jobs.fail(job.id, code, message)

    def _write_artifacts(self, job: Job, declared: tuple[str, ...], output: Output) -> list[str]:
        """Every file, then metadata.json: a job without metadata is incomplete. The files must
        be the ones its registry entry declares (clients and downloads rely on those names)."""
        if [*output.files, METADATA] != list(declared):
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
        return [*output.files, METADATA]

    def _delete_artifacts(self, job: Job) -> None:
        try:
            self.objects.delete_prefix(job_prefix(job.tenant, job.id))
        except Exception:  # noqa: BLE001 (cleanup must not hide the job's real outcome)
            log.exception("job %s: deleting partial artifacts failed", job.id)
