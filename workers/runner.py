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

from shared.core.audio import SAMPLE_RATE, AudioError, encode_audio, read_audio
from shared.core.config import Settings
from shared.core.inpaint import GapError, plan_gap
from shared.core.jobs import Job, JobStore, Upload, UploadStore
from shared.core.lyrics import to_lrc, to_srt
from shared.core.progress import AbortCheck, Aborted, Progress, share_of
from shared.core.schemas import (
    AUDIO_ARTIFACTS,
    DecodeParams,
    EncodeParams,
    ExtendParams,
    GenerateParams,
    InpaintParams,
    TranscribeParams,
)
from shared.core.storage import ObjectStore, artifact_key, content_type_for, job_prefix
from shared.core.tokens import InputError, read_tokens, tokens_bytes
from shared.ml.generation.engine import GenerationRequest, RequestError
from shared.ml.pipelines import (
    NothingGenerated,
    Song,
    decode_tokens,
    generate_song,
    inpaint_song,
    tokenize_audio,
)
from workers.models import WorkerModels
from workers.progress import ProgressReporter

log = logging.getLogger(__name__)

METADATA = "metadata.json"
TOKENS = "tokens.npy"
TRANSCRIPT = "transcript.json"
# How often a running job asks Redis whether it was cancelled (the engine asks every frame).
CANCEL_POLL_S = 0.1
# Progress share of the pipeline; uploading takes the rest.
PIPELINE_SHARE = 0.95


@dataclass
class Output:
    """What a pipeline produced: artifact name → bytes, plus metadata."""

    files: dict[str, bytes]
    metadata: dict[str, object]


_SongParams = GenerateParams | ExtendParams | InpaintParams


def _request(
    params: _SongParams, seed: int, history: np.ndarray | None = None
) -> GenerationRequest:
    """The engine request of a song job (extend/inpaint carry their parent's tags and lyrics,
    filled in by the gateway)."""
    if params.tags is None:
        raise InputError("tags", "no tags given and none inherited")
    return GenerationRequest(
        tags=params.tags,
        lyrics=params.lyrics or "",
        duration_s=getattr(params, "duration_s", 0.0),  # inpaint_song sets it from the gap
        temperature=params.temperature,
        top_k=params.top_k,
        cfg_scale=params.cfg_scale,
        seed=seed,
        history=history,
    )


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
        enqueue: Callable[[Job], None],
    ) -> None:
        self.settings = settings
        self.enqueue = enqueue  # sends a job waiting on a finished one
        self.jobs = jobs
        self.objects = objects
        self.models = models
        self.uploads = uploads
        self._context = {"settings": settings}  # the limits params are validated against
        self._pipelines: dict[str, Callable[[Job, Progress, AbortCheck], Output]]
        self._pipelines = {
            "generate": self._generate,
            "decode": self._decode,
            "encode": self._encode,
            "extend": self._extend,
            "inpaint": self._inpaint,
            "transcribe": self._transcribe,
        }

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
        pipeline = self._pipelines.get(job.type)
        if pipeline is None:
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
                output = pipeline(job, share_of(progress, 0.0, PIPELINE_SHARE), should_abort)
                progress("uploading", PIPELINE_SHARE)
                if should_abort():
                    raise Aborted("aborted before uploading")
                names = self._write_artifacts(job, output)
                progress("uploading", 1.0)
            if should_abort():
                raise Aborted("aborted after uploading")
            self.jobs.succeed(job.id, names)
        except Aborted:
            if timed_out:
                limit = self.settings.job_time_limit_s
                self._end_failed(
                    job, "time_limit", f"ran past HEARTCLUSTER_JOB_TIME_LIMIT_S={limit}"
                )
            else:
                self._delete_artifacts(job)
                self.jobs.mark_cancelled(job.id)
        except (RequestError, InputError, AudioError, GapError) as error:
            self._end_failed(job, "invalid_params", str(error))
        except NothingGenerated as error:
            self._end_failed(job, "nothing_generated", str(error))
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

    def _song_output(self, params: _SongParams, seed: int, song: Song, **extra: object) -> Output:
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
                **extra,
            },
        )

    def _generate(self, job: Job, progress: Progress, should_abort: AbortCheck) -> Output:
        params = GenerateParams.model_validate(job.params, context=self._context)
        seed = job_seed(job, params.seed)
        song = generate_song(
            self.models.engine(),
            self.models.codec(),
            self.models.codec_lock,
            _request(params, seed),
            progress,
            should_abort,
        )
        return self._song_output(params, seed, song)

    def _extend(self, job: Job, progress: Progress, should_abort: AbortCheck) -> Output:
        """Parent tokens + new frames, decoded whole. An uploaded song was encoded first by
        the parent encode job this one waited for."""
        params = ExtendParams.model_validate(job.params, context=self._context)
        field = "source_job_id" if params.source_job_id else "upload_id"
        parent_id = params.source_job_id or job.parent_job_id
        parent = self._job_tokens(job, parent_id, field)
        seed = job_seed(job, params.seed)
        song = generate_song(
            self.models.engine(),
            self.models.codec(),
            self.models.codec_lock,
            _request(params, seed, history=parent),
            progress,
            should_abort,
        )
        return self._song_output(
            params, seed, song, parent_job_id=parent_id, parent_frames=int(parent.shape[1])
        )

    def _inpaint(self, job: Job, progress: Progress, should_abort: AbortCheck) -> Output:
        params = InpaintParams.model_validate(job.params, context=self._context)
        tokens = self._job_tokens(job, params.source_job_id, "source_job_id")
        audio = self._job_audio(job, params.source_job_id)
        gap = plan_gap(params.start_s, params.end_s, tokens.shape[1])
        seed = job_seed(job, params.seed)
        song = inpaint_song(
            self.models.engine(),
            self.models.codec(),
            self.models.codec_lock,
            tokens,
            audio,
            gap,
            _request(params, seed),
            progress,
            should_abort,
        )
        return self._song_output(
            params,
            seed,
            song,
            parent_job_id=params.source_job_id,
            gap_frames=[gap.start, gap.stop],
        )

    def _decode(self, job: Job, progress: Progress, should_abort: AbortCheck) -> Output:
        params = DecodeParams.model_validate(job.params, context=self._context)
        tokens = self._decode_source(job, params)
        seed = job_seed(job, params.seed)
        progress("decoding", 0.0, 0, tokens.shape[1])
        audio = decode_tokens(
            self.models.codec(),
            tokens,
            seed=seed,
            steps=params.steps,
            lock=self.models.codec_lock,
            progress=progress,
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
            return self._job_tokens(job, params.source_job_id, "source_job_id")
        upload = self._upload(job, params.tokens_upload_id, "tokens_upload_id", "tokens")
        return read_tokens(self.objects.get_bytes(upload.key), "tokens_upload_id")

    def _source_job(
        self, job: Job, source_id: str | None, field: str, names: tuple[str, ...]
    ) -> tuple[Job, str]:
        """A finished job of the same tenant and the first of `names` among its artifacts."""
        source = None if source_id is None else self.jobs.get_for_tenant(job.tenant, source_id)
        found = [n for n in names if source is not None and n in source.artifacts]
        if source is None or not found:
            wanted = " or ".join(names)
            raise InputError(field, f"no job {source_id} with {wanted} for this tenant")
        return source, found[0]

    def _job_tokens(self, job: Job, source_id: str | None, field: str) -> np.ndarray:
        source, name = self._source_job(job, source_id, field, (TOKENS,))
        return read_tokens(self.objects.get_bytes(artifact_key(job.tenant, source.id, name)), field)

    def _job_audio(self, job: Job, source_id: str | None) -> np.ndarray:
        """A finished job's audio at 48 kHz stereo, [2, samples] float32."""
        source, name = self._source_job(job, source_id, "source_job_id", AUDIO_ARTIFACTS)
        data = self.objects.get_bytes(artifact_key(job.tenant, source.id, name))
        audio, rate = read_audio(data, name="source_job_id")
        if rate != SAMPLE_RATE or audio.shape[0] != 2:
            raise InputError("source_job_id", f"{name} is not {SAMPLE_RATE} Hz stereo")
        return audio

    def _encode(self, job: Job, progress: Progress, should_abort: AbortCheck) -> Output:
        params = EncodeParams.model_validate(job.params, context=self._context)
        upload = self._upload(job, params.upload_id, "upload_id", "audio")
        progress("encoding", 0.0)
        audio, sample_rate = read_audio(
            self.objects.get_bytes(upload.key), self.settings.max_upload_seconds, "upload_id"
        )
        tokens = tokenize_audio(
            self.models.encoder(),
            audio,
            sample_rate,
            progress=progress,
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

    def _transcribe(self, job: Job, progress: Progress, should_abort: AbortCheck) -> Output:
        """transcript.json (text, timed segments, words where the model gives them) plus
        lyrics.lrc and lyrics.srt for karaoke display."""
        params = TranscribeParams.model_validate(job.params, context=self._context)
        if params.upload_id is not None:
            key = self._upload(job, params.upload_id, "upload_id", "audio").key
            field = "upload_id"
        else:
            source, name = self._source_job(
                job, params.source_job_id, "source_job_id", AUDIO_ARTIFACTS
            )
            key, field = artifact_key(job.tenant, source.id, name), "source_job_id"
        audio, rate = read_audio(
            self.objects.get_bytes(key), self.settings.max_upload_seconds, field
        )
        progress("transcribing", 0.0)
        transcript = self.models.transcriber().transcribe(
            audio, rate, language=params.language, on_progress=progress, should_abort=should_abort
        )
        return Output(
            files={
                TRANSCRIPT: json.dumps(transcript.to_json(), indent=2).encode(),
                "lyrics.lrc": to_lrc(transcript).encode(),
                "lyrics.srt": to_srt(transcript).encode(),
            },
            metadata={"params": params.model_dump(), "source_sample_rate": rate},
        )

    def _upload(self, job: Job, upload_id: str | None, field: str, kind: str) -> Upload:
        upload = None if upload_id is None else self.uploads.get_for_tenant(job.tenant, upload_id)
        if upload is None:
            raise InputError(field, f"no upload {upload_id} for this tenant")
        if upload.kind != kind:
            raise InputError(field, f"upload {upload_id} holds {upload.kind}, not {kind}")
        return upload
