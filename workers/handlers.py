"""What each job type does in a worker: one handler per type of the registry.

A handler turns a started job's checked params and resolved inputs into artifact bytes and
metadata, calling the plain pipeline functions of `shared.ml`; it knows nothing of Celery or
of job states (the runner owns the lifecycle). Importing this module fails if a registered job
type has no handler, so a type cannot be declared and then never run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from shared.core.audio import encode_audio, read_audio
from shared.core.config import Settings
from shared.core.constants import FRAMES_PER_SECOND, SAMPLE_RATE
from shared.core.dataset_items import item_state, item_tokens
from shared.core.inpaint import plan_gap
from shared.core.inputs import InputResolver, Resolved, SourceJob
from shared.core.jobs import Job
from shared.core.jobtypes import JOB_TYPES
from shared.core.lyrics import to_lrc, to_srt
from shared.core.preview import render_preview
from shared.core.progress import AbortCheck, Progress
from shared.core.schemas import (
    AUDIO_ARTIFACTS,
    DecodeParams,
    EncodeParams,
    ExtendParams,
    FinetuneParams,
    GenerateParams,
    InpaintParams,
    Params,
    TranscribeParams,
)
from shared.core.storage import PREVIEW, TOKENS, ObjectStore, artifact_key
from shared.core.tokens import InputError, read_tokens, tokens_bytes
from shared.ml.generation.engine import GenerationRequest
from shared.ml.pipelines import (
    Song,
    decode_tokens,
    generate_song,
    inpaint_song,
    tokenize_audio,
)
from shared.ml.training.data import SongItem, cut_examples, split_examples
from shared.ml.training.trainer import TrainConfig, Trainer
from workers.models import WorkerModels


@dataclass
class Output:
    """What a handler produced: artifact name → bytes, plus metadata."""

    files: dict[str, bytes]
    metadata: dict[str, object]


@dataclass
class JobContext:
    """Everything a handler may use for one job."""

    job: Job
    params: Params
    inputs: Resolved
    models: WorkerModels
    resolver: InputResolver
    settings: Settings
    progress: Progress  # this handler's share of the job's progress, 0-1
    should_abort: AbortCheck

    @property
    def seed(self) -> int:
        return job_seed(self.job, getattr(self.params, "seed", None))


Handler = Callable[[JobContext], Output]
HANDLERS: dict[str, Handler] = {}


def handles(name: str) -> Callable[[Handler], Handler]:
    """Register the handler of the job type `name` (which must be in the registry)."""

    def register(handler: Handler) -> Handler:
        if name not in JOB_TYPES or name in HANDLERS:
            raise RuntimeError(f"handler for {name!r}: not a registered type, or registered twice")
        HANDLERS[name] = handler
        return handler

    return register


def job_seed(job: Job, requested: int | None) -> int:
    """The requested seed, else one derived from the job id (stable across retries)."""
    return requested if requested is not None else int(job.id[:8], 16)


# ----- songs --------------------------------------------------------------------------------

_SongParams = GenerateParams | ExtendParams | InpaintParams
_PARENT_TOKENS = SourceJob("source_job_id", needs=((TOKENS,),))


def _request(ctx: JobContext, history: np.ndarray | None = None) -> GenerationRequest:
    """The engine request of a song job (extend/inpaint carry their parent's tags and lyrics,
    filled in by the registry's check), with its LoRA adapter if it names one."""
    params = ctx.params
    assert isinstance(params, _SongParams)
    adapter = ctx.inputs.adapters.get("adapter_id")
    if params.tags is None:
        raise InputError("tags", "no tags given and none inherited")
    return GenerationRequest(
        tags=params.tags,
        lyrics=params.lyrics or "",
        duration_s=getattr(params, "duration_s", 0.0),  # inpaint_song sets it from the gap
        temperature=params.temperature,
        top_k=params.top_k,
        cfg_scale=params.cfg_scale,
        seed=ctx.seed,
        history=history,
        adapter=None if adapter is None else ctx.models.adapter(adapter, ctx.resolver),
    )


def _song_output(ctx: JobContext, song: Song, **extra: object) -> Output:
    params = ctx.params
    assert isinstance(params, _SongParams)
    return Output(
        files={
            TOKENS: tokens_bytes(song.tokens),
            f"audio.{params.format}": encode_audio(song.audio, params.format),
            PREVIEW: render_preview(song.audio, SAMPLE_RATE),
        },
        metadata={
            "params": {**params.model_dump(), "seed": ctx.seed},
            "seed": ctx.seed,
            "frames": int(song.tokens.shape[1]),
            "finish_reason": song.finish_reason,
            "sample_rate": SAMPLE_RATE,
            "duration_s": song.audio.shape[1] / SAMPLE_RATE,
            "adapter_id": getattr(params, "adapter_id", None),
            **extra,
        },
    )


@handles("generate")
def generate(ctx: JobContext) -> Output:
    params = ctx.params
    assert isinstance(params, GenerateParams)
    models = ctx.models
    song = generate_song(
        models.engine(),
        models.codec_batcher(),
        _request(ctx),
        ctx.progress,
        ctx.should_abort,
    )
    return _song_output(ctx, song)


@handles("extend")
def extend(ctx: JobContext) -> Output:
    """Parent tokens + new frames, decoded whole. An uploaded song was encoded first by the
    parent encode job this one waited for."""
    params = ctx.params
    assert isinstance(params, ExtendParams)
    if params.source_job_id is not None:
        field, parent = "source_job_id", ctx.inputs.jobs["source_job_id"]
    else:
        field = "upload_id"
        parent = ctx.resolver.job(ctx.job.tenant, ctx.job.parent_job_id or "", _PARENT_TOKENS)
    history = ctx.resolver.tokens(parent, field)
    models = ctx.models
    song = generate_song(
        models.engine(),
        models.codec_batcher(),
        _request(ctx, history=history),
        ctx.progress,
        ctx.should_abort,
    )
    return _song_output(ctx, song, parent_job_id=parent.id, parent_frames=int(history.shape[1]))


@handles("inpaint")
def inpaint(ctx: JobContext) -> Output:
    params = ctx.params
    assert isinstance(params, InpaintParams)
    parent = ctx.inputs.jobs["source_job_id"]
    tokens = ctx.resolver.tokens(parent, "source_job_id")
    audio = _song_audio(ctx, parent)
    gap = plan_gap(params.start_s, params.end_s, tokens.shape[1])
    models = ctx.models
    song = inpaint_song(
        models.engine(),
        models.codec_batcher(),
        tokens,
        audio,
        gap,
        _request(ctx),
        ctx.progress,
        ctx.should_abort,
    )
    return _song_output(ctx, song, parent_job_id=parent.id, gap_frames=[gap.start, gap.stop])


def _song_audio(ctx: JobContext, source: Job) -> np.ndarray:
    """A finished job's audio at 48 kHz stereo, [2, samples] float32."""
    name, data = ctx.resolver.artifact(source, AUDIO_ARTIFACTS)
    audio, rate = read_audio(data, name="source_job_id")
    if rate != SAMPLE_RATE or audio.shape[0] != 2:
        raise InputError("source_job_id", f"{name} is not {SAMPLE_RATE} Hz stereo")
    return audio


# ----- codec --------------------------------------------------------------------------------


@handles("decode")
def decode(ctx: JobContext) -> Output:
    """Tokens → audio, from another job's tokens.npy or a .npy upload."""
    params = ctx.params
    assert isinstance(params, DecodeParams)
    if params.source_job_id is not None:
        tokens = ctx.resolver.tokens(ctx.inputs.jobs["source_job_id"], "source_job_id")
    else:
        upload = ctx.inputs.uploads["tokens_upload_id"]
        tokens = read_tokens(ctx.resolver.upload_bytes(upload), "tokens_upload_id")
    ctx.progress("decoding", 0.0, 0, tokens.shape[1])
    audio = decode_tokens(
        ctx.models.codec_batcher(),
        tokens,
        seed=ctx.seed,
        steps=params.steps,
        progress=ctx.progress,
        should_abort=ctx.should_abort,
    )
    return Output(
        files={
            f"audio.{params.format}": encode_audio(audio, params.format),
            PREVIEW: render_preview(audio, SAMPLE_RATE),
        },
        metadata={
            "params": {**params.model_dump(), "seed": ctx.seed},
            "seed": ctx.seed,
            "frames": int(tokens.shape[1]),
            "sample_rate": SAMPLE_RATE,
            "duration_s": audio.shape[1] / SAMPLE_RATE,
        },
    )


@handles("encode")
def encode(ctx: JobContext) -> Output:
    params = ctx.params
    assert isinstance(params, EncodeParams)
    upload = ctx.inputs.uploads["upload_id"]
    ctx.progress("encoding", 0.0)
    audio, sample_rate = read_audio(
        ctx.resolver.upload_bytes(upload), ctx.settings.max_upload_seconds, "upload_id"
    )
    tokens = tokenize_audio(
        ctx.models.encoder(),
        audio,
        sample_rate,
        progress=ctx.progress,
        should_abort=ctx.should_abort,
    )
    return Output(
        files={TOKENS: tokens_bytes(tokens)},
        metadata={
            "params": params.model_dump(),
            "frames": int(tokens.shape[1]),
            "source_sample_rate": sample_rate,
        },
    )


# ----- lyrics -------------------------------------------------------------------------------


@handles("transcribe")
def transcribe(ctx: JobContext) -> Output:
    """transcript.json (text, timed segments, words where the model gives them) plus
    lyrics.lrc and lyrics.srt for karaoke display."""
    params = ctx.params
    assert isinstance(params, TranscribeParams)
    if params.upload_id is not None:
        field = "upload_id"
        data = ctx.resolver.upload_bytes(ctx.inputs.uploads[field])
    else:
        field = "source_job_id"
        _, data = ctx.resolver.artifact(ctx.inputs.jobs[field], AUDIO_ARTIFACTS)
    audio, rate = read_audio(data, ctx.settings.max_upload_seconds, field)
    ctx.progress("transcribing", 0.0)
    transcript = ctx.models.transcriber().transcribe(
        audio,
        rate,
        language=params.language,
        on_progress=ctx.progress,
        should_abort=ctx.should_abort,
    )
    return Output(
        files={
            "transcript.json": json.dumps(transcript.to_json(), indent=2).encode(),
            "lyrics.lrc": to_lrc(transcript).encode(),
            "lyrics.srt": to_srt(transcript).encode(),
        },
        metadata={"params": params.model_dump(), "source_sample_rate": rate},
    )


# ----- fine-tuning --------------------------------------------------------------------------

CHECKPOINT = "checkpoint.pt"  # under the job's keys: deleted with them on cancel/failure


@dataclass
class JobCheckpoints:
    """A fine-tune's latest checkpoint in the object store under the job's own keys, so a
    redelivered job (its worker died) resumes from it."""

    objects: ObjectStore
    key: str

    def load(self) -> bytes | None:
        return self.objects.get_bytes(self.key) if self.objects.exists(self.key) else None

    def save(self, data: bytes) -> None:
        self.objects.put_bytes(self.key, data)


def _dataset_songs(ctx: JobContext) -> tuple[list[SongItem], list[dict[str, object]]]:
    """The dataset's ready songs, and the items left out (failed ones) with the reason."""
    dataset = ctx.inputs.datasets["dataset_id"]
    tenant = ctx.job.tenant
    songs, skipped = [], []
    for index, item in enumerate(dataset.items):
        state = item_state(tenant, item, ctx.resolver)
        if state.state != "ready":
            skipped.append({"item": index, "state": state.state, "reason": state.reason})
            continue
        tokens = item_tokens(tenant, item, state, ctx.resolver)
        songs.append(SongItem(item.tags, item.lyrics, tokens))
    return songs, skipped


@handles("finetune")
def finetune(ctx: JobContext) -> Output:
    """LoRA on the worker's base model; checkpoints every `checkpoint_every` steps under the
    job's keys, resumed from when the job is delivered again."""
    params = ctx.params
    assert isinstance(params, FinetuneParams)
    ctx.progress("preparing", 0.0)
    songs, skipped = _dataset_songs(ctx)
    models = ctx.models
    prompts = models.prompts()
    with models.train_lock:
        model = models.trainable()
        examples = cut_examples(songs, prompts, model.config.backbone.max_seq_len)
        train, validation = split_examples(examples, params.validation_fraction, ctx.seed)
        config = TrainConfig(
            rank=params.rank,
            alpha=params.alpha,
            dropout=params.dropout,
            targets=tuple(params.targets),
            learning_rate=params.learning_rate,
            steps=params.steps,
            batch_size=params.batch_size,
            grad_accumulation=params.grad_accumulation,
            warmup_steps=params.warmup_steps,
            uncond_prob=params.uncond_prob,
            checkpoint_every=params.checkpoint_every,
            seed=ctx.seed,
        )
        checkpoints = JobCheckpoints(
            ctx.resolver.objects, artifact_key(ctx.job.tenant, ctx.job.id, CHECKPOINT)
        )
        trainer = Trainer(model, prompts, train, validation, config, checkpoints)
        try:
            result = trainer.run(ctx.progress, ctx.should_abort)
        finally:
            trainer.close()
    final = {key: value for key, value in result.metrics[-1].items() if "loss" in key}
    first_eval = next((line for line in result.metrics if "val_loss" in line), {})
    dataset = ctx.inputs.datasets["dataset_id"]
    return Output(
        files={
            **result.files,
            "metrics.jsonl": "".join(json.dumps(line) + "\n" for line in result.metrics).encode(),
        },
        metadata={
            "params": {**params.model_dump(), "seed": ctx.seed},
            "seed": ctx.seed,
            "dataset": {
                "id": dataset.id,
                "name": dataset.name,
                "songs": len(songs),
                "skipped_items": skipped,
                "seconds": sum(s.tokens.shape[1] for s in songs) / FRAMES_PER_SECOND,
            },
            "examples": {"train": len(train), "validation": len(validation)},
            "train_config": asdict(config),
            "resumed_from_step": result.resumed_from,
            "base_val_loss": first_eval.get("val_loss"),
            "final": final,
        },
    )


_missing = set(JOB_TYPES) - set(HANDLERS)
if _missing:
    raise RuntimeError(f"job types without a worker handler: {sorted(_missing)}")
