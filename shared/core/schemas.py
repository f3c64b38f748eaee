"""Request and response schemas (pydantic v2): one definition validates requests and generates
the OpenAPI document, so the two cannot drift apart.

Limits that depend on the deployment (tag count and bytes, lyrics length, duration) come from
Settings through the validation context. Every text field is checked by shared.core.text (valid
Unicode, no control characters), and prompt + frames must fit the model's context, counted with
the model's tokenizer when Settings names a model directory (shared.core.prompt_text), so what
passes here does not fail in the worker. No torch: the gateway imports this.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from shared.core.config import Settings
from shared.core.constants import (
    AUDIO_VOCAB,
    CONTEXT_POSITIONS,
    FRAME_MS,
    FRAME_S,
    frames_for_seconds,
)
from shared.core.jobs import Job, Upload
from shared.core.languages import ACCEPTED as LANGUAGE_NAMES
from shared.core.languages import language_code
from shared.core.lora_targets import LORA_PROJECTIONS, LORA_TARGETS
from shared.core.prompt_text import prompt_counter
from shared.core.text import clean_text

AudioFormat = Literal["flac", "wav", "mp3"]
AUDIO_ARTIFACTS = tuple(f"audio.{fmt}" for fmt in get_args(AudioFormat))  # a song's audio file
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]  # jobs.STATES
SEED_MAX = 2**32 - 1
ID_MAX_CHARS = 64  # job and upload ids are 32 hex digits
SONG_MAX_S = CONTEXT_POSITIONS * FRAME_S  # no song is longer than the context


class Params(BaseModel):
    """Base of every job type's params model (see shared/core/jobtypes.py)."""

    # strict: "30" is not a number (but 7.0 is the integer 7, as JSON Schema says); forbid: a
    # misspelt field is an error, not a silently ignored option
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    # text fields that may hold newlines and tabs; every other string is one line
    multiline_fields: ClassVar[frozenset[str]] = frozenset()
    # integer fields (`int` or `int | None`), found once per model
    int_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.int_fields = frozenset(
            name
            for name, info in cls.model_fields.items()
            if info.annotation is int or int in get_args(info.annotation)
        )

    @field_validator("*", mode="before")
    @classmethod
    def _whole_number(cls, value: Any, info: ValidationInfo) -> Any:
        """7.0 → 7 for an integer field: JSON has one number type, and JSON Schema (so the
        OpenAPI document) counts 7.0 as an integer. Strings and booleans stay refused."""
        if isinstance(value, float) and value.is_integer() and info.field_name in cls.int_fields:
            return int(value)
        return value

    @field_validator("*")
    @classmethod
    def _text(cls, value: Any, info: ValidationInfo) -> Any:
        """Every string: valid Unicode without control characters, in NFC."""
        if not isinstance(value, str):
            return value
        return clean_text(value, multiline=info.field_name in cls.multiline_fields)


def _limits(info: ValidationInfo) -> Settings:
    context = info.context or {}
    return context.get("settings") or Settings()


def _prompt_rows(info: ValidationInfo, lyrics: str) -> int:
    """Context positions of the prompt (the tags validated so far, `lyrics`); the parent's
    tags and lyrics, when inherited later, are counted by the worker."""
    return prompt_counter(_limits(info).model_dir).rows(info.data.get("tags") or "", lyrics)


def _counted(info: ValidationInfo) -> str:
    if prompt_counter(_limits(info).model_dir).exact:
        return "tokens"
    return "positions at most (counted in UTF-8 bytes: no tokenizer, HEARTCLUSTER_MODEL_DIR)"


class _PromptParams(Params):
    """Tag, lyrics and prompt-length limits for every job type that takes a prompt."""

    multiline_fields = frozenset({"lyrics"})

    @field_validator("tags", check_fields=False)
    @classmethod
    def _tags(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:  # extend/inpaint: the parent job's tags
            return None
        tags = [tag.strip() for tag in value.split(",") if tag.strip()]
        if not tags:
            raise ValueError("give at least one tag")
        limits = _limits(info)
        if len(tags) > limits.max_tags:
            raise ValueError(f"{len(tags)} tags given; at most {limits.max_tags} allowed")
        for tag in tags:
            if len(tag.encode()) > limits.max_tag_bytes:
                raise ValueError(
                    f"tag {tag[:20]!r}... is {len(tag.encode())} bytes (UTF-8); "
                    f"at most {limits.max_tag_bytes} allowed per tag"
                )
        joined = ",".join(tags)
        if len(joined.encode()) > limits.max_tags_bytes:
            raise ValueError(
                f"tags are {len(joined.encode())} bytes (UTF-8); "
                f"at most {limits.max_tags_bytes} allowed in all"
            )
        return joined

    @field_validator("lyrics", check_fields=False)
    @classmethod
    def _lyrics(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:  # extend/inpaint: the parent job's lyrics
            return None
        limit = _limits(info).max_lyrics_chars
        if len(value) > limit:
            raise ValueError(f"lyrics are {len(value)} characters; at most {limit} allowed")
        rows = _prompt_rows(info, value)
        if rows >= CONTEXT_POSITIONS:  # not even one frame would fit
            raise ValueError(
                f"the prompt takes {rows} {_counted(info)}; with a song it must fit the "
                f"{CONTEXT_POSITIONS}-position context"
            )
        return value


class GenerateParams(_PromptParams):
    tags: str = Field(
        min_length=1,
        description="Comma-separated style tags, e.g. 'piano,happy' "
        "(at most HEARTCLUSTER_MAX_TAGS tags).",
        examples=["piano,happy"],
    )
    lyrics: str = Field(
        "", description="Lyrics text (at most HEARTCLUSTER_MAX_LYRICS_CHARS characters)."
    )
    duration_s: float = Field(
        30.0,
        gt=0,
        json_schema_extra={"minimum": FRAME_S},
        description="Seconds of audio, at least one 80 ms frame (0.08 s) and at most "
        "HEARTCLUSTER_MAX_DURATION_S; the song has the whole frames in it (rounded down to the "
        f"80 ms grid). Prompt + frames must fit the {CONTEXT_POSITIONS}-position context.",
    )
    temperature: float = Field(1.0, gt=0, le=2)
    top_k: int = Field(50, ge=1, le=AUDIO_VOCAB)
    cfg_scale: float = Field(1.5, ge=1.0, le=10.0, description="Classifier-free guidance.")
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="Omit to let the worker pick one (recorded)."
    )
    format: AudioFormat = "flac"
    adapter_id: str | None = Field(
        None,
        min_length=1,
        max_length=ID_MAX_CHARS,
        description="A succeeded finetune job of yours: generate with its LoRA adapter.",
    )

    @field_validator("duration_s")
    @classmethod
    def _duration(cls, value: float, info: ValidationInfo) -> float:
        limit = _limits(info).max_duration_s
        if value > limit:
            raise ValueError(f"duration {value:g} s is over the limit of {limit:g} s")
        frames = frames_for_seconds(value)
        if value < FRAME_S:
            raise ValueError(
                f"duration {value:g} s is under one {FRAME_MS} ms frame; at least {FRAME_S:g} s"
            )
        rows = _prompt_rows(info, info.data.get("lyrics") or "")
        if rows + frames > CONTEXT_POSITIONS:
            room = max(CONTEXT_POSITIONS - rows, 0)
            raise ValueError(
                f"the prompt ({rows} {_counted(info)}) + {frames} frames is over the "
                f"{CONTEXT_POSITIONS}-position context; at most {room} frames "
                f"({room * FRAME_S:.2f} s) fit"
            )
        return value


def _second_source(value: str | None, info: ValidationInfo, first: str) -> str | None:
    """Validator of the second of two alternative sources: exactly one must be given."""
    if (value is None) == (info.data.get(first) is None):
        raise ValueError(f"give exactly one of {first} or {info.field_name}")
    return value


class DecodeParams(Params):
    """Tokens → audio, from a finished job's tokens.npy or an uploaded .npy ([8, T] codes)."""

    source_job_id: str | None = Field(None, min_length=1, max_length=ID_MAX_CHARS)
    tokens_upload_id: str | None = Field(
        None, min_length=1, max_length=ID_MAX_CHARS, validate_default=True
    )
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    steps: int = Field(10, ge=1, le=200, description="Flow-matching solver steps.")
    format: AudioFormat = "flac"

    @field_validator("tokens_upload_id")
    @classmethod
    def _one_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _second_source(value, info, "source_job_id")


class EncodeParams(Params):
    """Audio → tokens, from an uploaded audio file."""

    upload_id: str = Field(min_length=1, max_length=ID_MAX_CHARS)


class ExtendParams(GenerateParams):
    """Continue a song: a finished job's tokens, or an audio upload (encoded first on the cpu
    queue, as a separate encode job this job waits for). Tags and lyrics default to the
    parent job's; `duration_s` is the added length."""

    tags: str | None = Field(None, min_length=1, description="Default: the parent job's tags.")
    lyrics: str | None = Field(None, description="Default: the parent job's lyrics.")
    source_job_id: str | None = Field(None, min_length=1, max_length=ID_MAX_CHARS)
    upload_id: str | None = Field(
        None, min_length=1, max_length=ID_MAX_CHARS, validate_default=True
    )

    @field_validator("upload_id")
    @classmethod
    def _one_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _second_source(value, info, "source_job_id")


class InpaintParams(_PromptParams):
    """Regenerate [start_s, end_s) of a finished song; everything else stays as it was."""

    source_job_id: str = Field(min_length=1, max_length=ID_MAX_CHARS)
    start_s: float = Field(ge=0, le=SONG_MAX_S)
    end_s: float = Field(gt=0, le=SONG_MAX_S)
    tags: str | None = Field(None, min_length=1, description="Default: the parent job's tags.")
    lyrics: str | None = Field(None, description="Default: the parent job's lyrics.")
    temperature: float = Field(0.2, gt=0, le=2)
    top_k: int = Field(30, ge=1, le=AUDIO_VOCAB)
    cfg_scale: float = Field(1.0, ge=1.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    format: AudioFormat = "flac"
    adapter_id: str | None = Field(
        None,
        min_length=1,
        max_length=ID_MAX_CHARS,
        description="A succeeded finetune job of yours: regenerate with its LoRA adapter.",
    )

    @field_validator("end_s")
    @classmethod
    def _after_start(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("start_s")
        if start is not None and value <= start:
            raise ValueError("end_s must be greater than start_s")
        return value


class TranscribeParams(Params):
    """Lyrics from audio: an audio upload or a finished job's audio."""

    source_job_id: str | None = Field(None, min_length=1, max_length=ID_MAX_CHARS)
    upload_id: str | None = Field(
        None, min_length=1, max_length=ID_MAX_CHARS, validate_default=True
    )
    language: str | None = Field(
        None,
        min_length=2,
        max_length=32,
        description="A Whisper language code or name ('en', 'english'); omit to detect it.",
        examples=["en"],
        json_schema_extra={"enum": [*LANGUAGE_NAMES, None]},
    )

    @field_validator("language")
    @classmethod
    def _language(cls, value: str | None) -> str | None:
        return None if value is None else language_code(value)

    @field_validator("upload_id")
    @classmethod
    def _one_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _second_source(value, info, "source_job_id")


class FinetuneParams(Params):
    """LoRA fine-tune of the base model on a dataset (runs on the train queue, resumable)."""

    dataset_id: str = Field(min_length=1, max_length=ID_MAX_CHARS)
    rank: int = Field(16, ge=1, le=256)
    alpha: int = Field(32, ge=1, le=4096)
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    targets: list[str] = Field(
        default_factory=lambda: list(LORA_PROJECTIONS),
        min_length=1,
        max_length=len(LORA_TARGETS),
        description="Projections to adapt: q_proj, k_proj, v_proj, output_proj, w1, w2, w3 "
        "(both transformers) or backbone.NAME / decoder.NAME (one).",
        json_schema_extra={"items": {"enum": list(LORA_TARGETS)}, "uniqueItems": True},
    )
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    steps: int = Field(1000, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(1, ge=1, le=64, description="Examples per micro-batch.")
    grad_accumulation: int = Field(1, ge=1, le=256, description="Micro-batches per step.")
    warmup_steps: int = Field(0, ge=0, le=1_000_000)
    uncond_prob: float = Field(
        0.1, ge=0.0, le=1.0, description="Share of examples trained unconditional (for CFG)."
    )
    validation_fraction: float = Field(0.1, ge=0.0, le=0.5)
    checkpoint_every: int = Field(100, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"unknown targets {unknown}; choose from {list(LORA_TARGETS)}")
        if len(set(value)) != len(value):
            raise ValueError("a target is named twice")
        return value

    @field_validator("warmup_steps")
    @classmethod
    def _warmup(cls, value: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")
        if steps is not None and value >= steps:
            raise ValueError(f"warmup_steps must be under steps ({steps})")
        return value


# -- datasets -------------------------------------------------------------------------------


class DatasetItemIn(_PromptParams):
    """One song of a dataset: a finished song job or an upload, with its tags and lyrics."""

    upload_id: str | None = Field(
        None, min_length=1, max_length=ID_MAX_CHARS, description="An audio or tokens upload."
    )
    source_job_id: str | None = Field(
        None,
        min_length=1,
        max_length=ID_MAX_CHARS,
        validate_default=True,
        description="A succeeded job holding tokens.npy.",
    )
    tags: str = Field(min_length=1, examples=["samba,guitar"])
    lyrics: str = ""

    @field_validator("source_job_id")
    @classmethod
    def _one_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _second_source(value, info, "upload_id")


class DatasetCreate(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    items: list[DatasetItemIn] = Field(
        min_length=1, description="At most HEARTCLUSTER_MAX_DATASET_ITEMS items."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return clean_text(value)

    @field_validator("items")
    @classmethod
    def _count(cls, value: list[DatasetItemIn], info: ValidationInfo) -> list[DatasetItemIn]:
        limit = _limits(info).max_dataset_items
        if len(value) > limit:
            raise ValueError(f"{len(value)} items; at most {limit} allowed")
        return value


def dataset_field(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as clients name it: items[3].tags."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def parse_dataset(body: Any, settings: Settings) -> DatasetCreate:
    if not isinstance(body, dict):
        raise InvalidRequest(None, "the body must be a JSON object")
    try:
        return DatasetCreate.model_validate(body, context={"settings": settings})
    except ValidationError as error:
        details = [
            {"field": dataset_field(tuple(e["loc"])), "message": e["msg"]}
            for e in error.errors(include_url=False)
        ]
        raise InvalidRequest(details[0]["field"], details[0]["message"], details) from None


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(
        max_length=64, description="A job type of shared/core/jobtypes.py (generate, extend, ...)."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The params schema of `type` (GenerateParams, ExtendParams, ...).",
    )
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Resubmitting with the same key returns the first job instead of a new one "
        "(the Idempotency-Key header does the same).",
    )
    priority: Literal["interactive", "batch"] | None = Field(
        None,
        description="Within the tenant, interactive jobs start before batch jobs. Default: "
        "`interactive` for a single submit, `batch` for a batch item.",
    )
    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description="Called (signed, Standard Webhooks) with job.succeeded, job.failed or "
        "job.cancelled when the job ends; default: the tenant's endpoint.",
    )

    @field_validator("idempotency_key")
    @classmethod
    def _key_text(cls, value: str | None) -> str | None:
        return None if value is None else clean_text(value)


class InvalidRequest(ValueError):
    """A request failed validation: `field` is the dotted path of the first bad field."""

    def __init__(
        self, field: str | None, message: str, details: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        self.details = details or ([{"field": field, "message": message}] if field else [])


def invalid_request(error: ValidationError, prefix: tuple[str, ...] = ()) -> InvalidRequest:
    details = [
        {"field": ".".join(str(part) for part in (*prefix, *e["loc"])), "message": e["msg"]}
        for e in error.errors(include_url=False)
    ]
    return InvalidRequest(details[0]["field"], details[0]["message"], details)


# -- responses ------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    """A job as clients see it."""

    id: str
    type: str
    state: JobState
    params: dict[str, Any]
    progress: float = Field(description="0 to 100")
    stage: str
    message: str
    frames_done: int | None
    frames_total: int | None
    attempts: int
    error: JobError | None
    artifacts: list[str] = Field(description="Names for GET /v1/jobs/{id}/artifacts/{name}.")
    parent_job_id: str | None
    priority: Literal["interactive", "batch"]
    cancel_requested: bool
    created_at: float = Field(description="Unix seconds")
    started_at: float | None
    finished_at: float | None


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page.")


class UploadOut(BaseModel):
    id: str
    filename: str
    kind: Literal["audio", "tokens"]
    bytes: int
    duration_s: float
    sample_rate: int | None
    channels: int | None
    created_at: float


class UploadList(BaseModel):
    uploads: list[UploadOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page.")


class DatasetItemOut(BaseModel):
    upload_id: str | None
    source_job_id: str | None
    encode_job_id: str | None = Field(description="The encode job of an audio upload.")
    tags: str
    lyrics: str
    state: Literal["ready", "encoding", "failed"]
    reason: str | None = Field(description="Why the item failed.")
    frames: int
    seconds: float


class DatasetTotals(BaseModel):
    items: int
    ready: int
    encoding: int
    failed: int
    seconds: float = Field(description="Audio seconds of every item.")
    frames: int


class DatasetOut(BaseModel):
    id: str
    name: str
    items: list[DatasetItemOut]
    totals: DatasetTotals
    created_at: float


class DatasetSummary(BaseModel):
    id: str
    name: str
    items: int
    created_at: float


class DatasetList(BaseModel):
    datasets: list[DatasetSummary]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page.")


def job_out(job: Job | dict[str, Any]) -> dict[str, Any]:
    """A job record as the JSON clients get (internal fields such as the tenant left out)."""
    data = job.to_dict() if isinstance(job, Job) else job
    return {name: data.get(name) for name in JobOut.model_fields}


def upload_out(upload: Upload) -> dict[str, Any]:
    data = upload.to_dict()
    return {name: data.get(name) for name in UploadOut.model_fields}


class Usage(BaseModel):
    """One quota: what the tenant uses now against its limit (null: unlimited)."""

    used: float
    limit: float | None


class UsageOut(BaseModel):
    """GET /v1/usage: the tenant's usage against its quotas (days are UTC days)."""

    weight: float = Field(description="Its share of a contended queue, relative to others'")
    running: Usage
    queued: Usage
    audio_seconds_today: Usage
    finetune_gpu_seconds_today: Usage
    storage_bytes: Usage
    submits_per_minute: Usage = Field(
        description="`used`: submits the token bucket holds back now (0 when it is full)"
    )
