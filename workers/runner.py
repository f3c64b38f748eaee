"""One job through its states: load, start, run its pipeline, write artifacts, finish.

Celery-free (the task in workers.tasks is one line over `JobRunner.run`), so the lifecycle
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
from dataclasses import dataclass

import numpy as np

from shared.audio import SAMPLE_RATE, AudioError, encode_audio, read_audio
from shared.config import Settings
from shared.generation.engine import GenerationRequest, RequestError
from shared.jobs import Job, JobStore, Upload, UploadStore
from shared.pipelines import (
    PipelineAborted,
    PipelineInputError,
    decode_tokens,
    generate_song,
    read_tokens,
    tokenize_audio,
    tokens_bytes,
)
from shared.schemas import DecodeParams, EncodeParams, GenerateParams
from shared.storage import ObjectStore, artifact_key, content_type_for, job_prefix
from workers.models import WorkerModels
from workers.progress import ProgressReporter

log = logging.getLogger(__name__)

METADATA = "metadata.json"
TOKENS = "tokens.npy"
# Progress share of the pipeline; uploading takes the rest.
PIPELINE_SHARE = 95.0


@dataclass
class Output:
    """What a pipeline produced: artifact name → bytes, plus metadata."""

    files: dict[str, bytes]
    metadata: dict[str, object]


def job_seed(job: Job, requested: int | None) -> int:
    """The requested seed, else one derived from the job id (stable across retries)."""
    return requested if requested is not None else int(job.id[:8], 16)


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        jobs: JobStore,
        objects: ObjectStore,
        models: WorkerModels,
        uploads: UploadStore,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.objects = objects
        self.models = models
        self.uploads = uploads
        self._context = {"settings": settings}  # the limits params are validated against
        self._pipelines: dict[str, Callable[[Job, ProgressReporter, Callable[[], bool]], Output]]
        self._pipelines = {
            "generate": self._generate,
            "decode": self._decode,
            "encode": self._encode,
        }

    # ----- lifecycle --------------------------------------------------------------------------

    def run(self, job_id: str) -> None:
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
        self._run_started(started)

    def _run_started(self, job: Job) -> None:
        pipeline = self._pipelines.get(job.type)
        if pipeline is None:
            self.jobs.fail(job.id, "unsupported", f"this worker does not run {job.type!r} jobs")
            return
        deadline = time.monotonic() + self.settings.job_time_limit_s
        timed_out = False

        def should_abort() -> bool:
            """Called by the engine every frame: it must answer fast and never raise."""
            nonlocal timed_out
            if time.monotonic() > deadline:
                timed_out = True
                return True
            try:
                return self.jobs.cancel_requested(job.id)
            except Exception:  # noqa: BLE001 (a Redis hiccup must not abort the whole batch)
                log.exception("job %s: reading the cancel flag failed", job.id)
                return False

        try:
            with ProgressReporter(self.jobs, job.id) as progress:
                output = pipeline(job, progress, should_abort)
                progress.update("uploading", PIPELINE_SHARE)
                if should_abort():
                    raise PipelineAborted
                names = self._write_artifacts(job, output)
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
        except (RequestError, PipelineInputError, AudioError) as error:
            self._end_failed(job, "invalid_params", str(error))
        except Exception as error:  # noqa: BLE001 (any failure ends the job with its reason)
            log.exception("job %s failed", job.id)
            self._end_failed(job, "internal_error", f"{type(error).__name__}: {error}")

    def _end_failed(self, job: Job, code: str, message: str) -> None:
        self._delete_artifacts(job)
        self.jobs.fail(job.id, code, message)

    def _write_artifacts(self, job: Job, output: Output) -> list[str]:
        """Every file, then metadata.json: a job without metadata is incomplete."""
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

    # ----- pipelines --------------------------------------------------------------------------

    def _generate(
        self, job: Job, progress: ProgressReporter, should_abort: Callable[[], bool]
    ) -> Output:
        params = GenerateParams.model_validate(job.params, context=self._context)
        seed = job_seed(job, params.seed)
        request = GenerationRequest(
            tags=params.tags,
            lyrics=params.lyrics,
            duration_s=params.duration_s,
            temperature=params.temperature,
            top_k=params.top_k,
            cfg_scale=params.cfg_scale,
            seed=seed,
        )

        def report(stage: str, fraction: float, done: int | None = None, total: int | None = None):
            progress.update(stage, PIPELINE_SHARE * fraction, done, total)

        song = generate_song(
            self.models.engine(),
            self.models.codec(),
            self.models.codec_lock,
            request,
            report,
            should_abort,
        )
        return Output(
            files={
                TOKENS: tokens_bytes(song.tokens),
                f"audio.{params.format}": encode_audio(song.audio, params.format),
            },
            metadata={
                "params": {**params.model_dump(), "seed": seed},
                "seed": seed,
                "frames": int(song.tokens.shape[1]),
                "finish_reason": song.finish_reason,
                "sample_rate": SAMPLE_RATE,
                "duration_s": song.audio.shape[1] / SAMPLE_RATE,
            },
        )

    def _decode(
        self, job: Job, progress: ProgressReporter, should_abort: Callable[[], bool]
    ) -> Output:
        params = DecodeParams.model_validate(job.params, context=self._context)
        tokens = self._decode_source(job, params)
        seed = job_seed(job, params.seed)
        progress.update("decoding", 0.0, 0, tokens.shape[1])
        audio = decode_tokens(
            self.models.codec(),
            tokens,
            seed=seed,
            steps=params.steps,
            lock=self.models.codec_lock,
            on_fraction=lambda f: progress.update("decoding", PIPELINE_SHARE * f),
            should_abort=should_abort,
        )
        return Output(
            files={f"audio.{params.format}": encode_audio(audio, params.format)},
            metadata={
                "params": {**params.model_dump(), "seed": seed},
                "seed": seed,
                "frames": int(tokens.shape[1]),
                "sample_rate": SAMPLE_RATE,
                "duration_s": audio.shape[1] / SAMPLE_RATE,
            },
        )

    def _decode_source(self, job: Job, params: DecodeParams) -> np.ndarray:
        """The tokens a decode job names: another job's tokens.npy or a .npy upload."""
        if params.source_job_id is not None:
            source = self.jobs.get_for_tenant(job.tenant, params.source_job_id)
            if source is None or TOKENS not in source.artifacts:
                raise PipelineInputError(
                    "source_job_id", f"no job {params.source_job_id} with {TOKENS} for this tenant"
                )
            data = self.objects.get_bytes(artifact_key(job.tenant, source.id, TOKENS))
            return read_tokens(data, "source_job_id")
        upload = self._upload(job, params.tokens_upload_id, "tokens_upload_id", "tokens")
        return read_tokens(self.objects.get_bytes(upload.key), "tokens_upload_id")

    def _encode(
        self, job: Job, progress: ProgressReporter, should_abort: Callable[[], bool]
    ) -> Output:
        params = EncodeParams.model_validate(job.params, context=self._context)
        upload = self._upload(job, params.upload_id, "upload_id", "audio")
        progress.update("encoding", 0.0)
        audio, sample_rate = read_audio(
            self.objects.get_bytes(upload.key), self.settings.max_upload_seconds, "upload_id"
        )
        tokens = tokenize_audio(
            self.models.encoder(),
            audio,
            sample_rate,
            on_fraction=lambda f: progress.update("encoding", PIPELINE_SHARE * f),
            should_abort=should_abort,
        )
        return Output(
            files={TOKENS: tokens_bytes(tokens)},
            metadata={
                "params": params.model_dump(),
                "frames": int(tokens.shape[1]),
                "source_sample_rate": sample_rate,
            },
        )

    def _upload(self, job: Job, upload_id: str | None, field: str, kind: str) -> Upload:
        upload = None if upload_id is None else self.uploads.get_for_tenant(job.tenant, upload_id)
        if upload is None:
            raise PipelineInputError(field, f"no upload {upload_id} for this tenant")
        if upload.kind != kind:
            raise PipelineInputError(field, f"upload {upload_id} holds {upload.kind}, not {kind}")
        return upload
