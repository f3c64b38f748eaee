"""The job-type registry: every job type declared once, with everything the cluster derives
from it.

An entry names the type's params model, its queue, the jobs and uploads its params may refer to
(and what each must hold), the artifacts it writes, and the extra checks the gateway runs at
submit. Request validation, routing, the gateway's input checks, the workers' dispatch
(`workers/handlers.py`, checked against this table at import), the CLI's `submit` subcommands
and the OpenAPI document all read this table, so adding a type is: its params model
(`shared/core/schemas.py`), its entry here, its handler, its tests. No torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from shared.core.config import Settings
from shared.core.constants import CONTEXT_POSITIONS, FRAME_S, frames_for_seconds
from shared.core.dataset_items import item_state
from shared.core.inpaint import plan_gap
from shared.core.inputs import (
    InputSpec,
    Resolved,
    SourceAdapter,
    SourceDataset,
    SourceJob,
    SourceUpload,
)
from shared.core.lora_targets import lora_projections
from shared.core.prompt_text import prompt_counter
from shared.core.schemas import (
    AUDIO_ARTIFACTS,
    DecodeParams,
    EncodeParams,
    ExtendParams,
    FinetuneParams,
    GenerateParams,
    InpaintParams,
    InvalidRequest,
    Params,
    SubmitRequest,
    TranscribeParams,
    invalid_request,
)
from shared.core.storage import METADATA, PREVIEW, TOKENS
from shared.core.tokens import InputError

Queue = Literal["gpu", "cpu", "train"]
QUEUES: tuple[Queue, ...] = ("gpu", "cpu", "train")

AUDIO = "audio.{format}"  # one name per song, in the format its params ask for


@dataclass(frozen=True)
class JobType:
    name: str
    summary: str
    params: type[Params]
    queue: Queue
    # the jobs, uploads, adapters and datasets the params may name (each checked for owner,
    # kind and state)
    inputs: tuple[InputSpec, ...] = ()
    # what a succeeded job holds besides metadata.json; `{format}` is the params' format
    artifacts: tuple[str, ...] = ()
    # checks that need the resolved inputs (song lengths...) and this deployment's settings
    # (the tokenizer that counts the prompt); may fill inherited params
    check: Callable[[Params, Resolved, Settings], None] | None = None

    @property
    def alternative_sources(self) -> tuple[str, ...]:
        """Fields of which exactly one must be given: a source job or an upload."""
        sources = [spec for spec in self.inputs if isinstance(spec, SourceJob | SourceUpload)]
        kinds = {type(spec) for spec in sources}
        return tuple(spec.field for spec in sources) if len(kinds) == 2 else ()

    def artifact_names(self, params: Params) -> tuple[str, ...]:
        """The artifact names a job with these params writes, metadata.json included."""
        fmt = getattr(params, "format", None)
        return (*(name.format(format=fmt) for name in self.artifacts), METADATA)


# ----- checks at submit (and again in the worker) -------------------------------------------


def _inherit_prompt(params: ExtendParams | InpaintParams, resolved: Resolved) -> None:
    """Extend/inpaint: tags and lyrics default to the parent job's."""
    inherited = resolved.parent.params if resolved.parent is not None else {}
    if params.tags is None:
        params.tags = inherited.get("tags")
        if params.tags is None:
            raise InputError("tags", "the source has no tags to reuse; give tags")
    if params.lyrics is None:
        params.lyrics = inherited.get("lyrics", "")


def _check_adapter(params: Params, resolved: Resolved, settings: Settings) -> None:
    """A song's adapter must be one the GPU workers can serve: its rank and targets as its
    fine-tune recorded them, against HEARTCLUSTER_ADAPTER_* (the worker checks the files too)."""
    finetune = resolved.adapters.get("adapter_id")
    if finetune is None:
        return
    if settings.adapter_slots == 0:
        raise InputError("adapter_id", "this cluster serves no adapters (ADAPTER_SLOTS is 0)")
    rank = finetune.params.get("rank")
    if rank is not None and rank > settings.adapter_max_rank:
        raise InputError(
            "adapter_id",
            f"adapter {finetune.id} has rank {rank}; the GPU workers serve ranks up to "
            f"{settings.adapter_max_rank} (HEARTCLUSTER_ADAPTER_MAX_RANK)",
        )
    served = set().union(*(lora_projections(t) for t in settings.adapter_targets))
    unserved = [t for t in finetune.params.get("targets", ()) if lora_projections(t) - served]
    if unserved:
        raise InputError(
            "adapter_id",
            f"adapter {finetune.id} adapts {', '.join(unserved)}; the GPU workers serve "
            f"{', '.join(settings.adapter_targets)} (HEARTCLUSTER_ADAPTER_TARGETS)",
        )


def _check_extend(params: Params, resolved: Resolved, settings: Settings) -> None:
    """Refuse at once what cannot fit the model's context: the prompt (the inherited tags and
    lyrics counted as the worker will), the song so far and the new frames."""
    assert isinstance(params, ExtendParams)
    _check_adapter(params, resolved, settings)
    _inherit_prompt(params, resolved)
    field = "source_job_id" if params.source_job_id is not None else "upload_id"
    song_frames = resolved.frames(field)
    new_frames = frames_for_seconds(params.duration_s)
    prompt_rows = prompt_counter(settings.model_dir).rows(params.tags or "", params.lyrics or "")
    room = max(CONTEXT_POSITIONS - prompt_rows - song_frames, 0)
    if new_frames > room:
        raise InputError(
            "duration_s",
            f"prompt ({prompt_rows} positions) + history ({song_frames} frames) + {new_frames} "
            f"new frames is over the {CONTEXT_POSITIONS}-position context; at most {room} new "
            f"frames ({room * FRAME_S:.2f} s) fit",
        )


def _check_inpaint(params: Params, resolved: Resolved, settings: Settings) -> None:
    assert isinstance(params, InpaintParams)
    _check_adapter(params, resolved, settings)
    plan_gap(params.start_s, params.end_s, resolved.frames("source_job_id"))
    _inherit_prompt(params, resolved)


def _check_finetune(params: Params, resolved: Resolved, settings: Settings) -> None:
    """The dataset must be done encoding and hold at least one ready song."""
    dataset = resolved.datasets["dataset_id"]
    states = [item_state(resolved.tenant, item, resolved.resolver) for item in dataset.items]
    encoding = sum(state.state == "encoding" for state in states)
    if encoding:
        raise InputError(
            "dataset_id", f"{encoding} items of dataset {dataset.id} are still encoding; wait"
        )
    if not any(state.state == "ready" for state in states):
        raise InputError("dataset_id", f"dataset {dataset.id} has no ready item")


# ----- the registry -------------------------------------------------------------------------

_SONG = (TOKENS, AUDIO, PREVIEW)
_ADAPTER = SourceAdapter("adapter_id")  # a song job may use a fine-tune's LoRA adapter
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_SOURCE_TOKENS = SourceJob("source_job_id", needs=((TOKENS,),))
_SOURCE_AUDIO = SourceJob("source_job_id", needs=(AUDIO_ARTIFACTS,))

JOB_TYPES: dict[str, JobType] = {
    job_type.name: job_type
    for job_type in (
        JobType(
            "generate",
            "tags + lyrics → song",
            GenerateParams,
            "gpu",
            inputs=(_ADAPTER,),
            artifacts=_SONG,
            check=_check_adapter,
        ),
        JobType(
            "extend",
            "continue a finished song or an uploaded one",
            ExtendParams,
            "gpu",
            # an uploaded song is encoded by a first `encode` job this one waits for
            inputs=(
                _SOURCE_TOKENS,
                SourceUpload("upload_id", "audio", first_step="encode"),
                _ADAPTER,
            ),
            artifacts=_SONG,
            check=_check_extend,
        ),
        JobType(
            "inpaint",
            "regenerate [start_s, end_s) of a finished song",
            InpaintParams,
            "gpu",
            inputs=(SourceJob("source_job_id", needs=((TOKENS,), AUDIO_ARTIFACTS)), _ADAPTER),
            artifacts=_SONG,
            check=_check_inpaint,
        ),
        JobType(
            "decode",
            "tokens → audio, from a finished job or a .npy upload",
            DecodeParams,
            "gpu",
            inputs=(_SOURCE_TOKENS, SourceUpload("tokens_upload_id", "tokens")),
            artifacts=(AUDIO, PREVIEW),
        ),
        JobType(
            "encode",
            "an uploaded song → tokens",
            EncodeParams,
            "cpu",
            inputs=(SourceUpload("upload_id", "audio"),),
            artifacts=(TOKENS,),
        ),
        JobType(
            "transcribe",
            "lyrics with timings from a finished song or an uploaded one",
            TranscribeParams,
            "cpu",
            inputs=(_SOURCE_AUDIO, SourceUpload("upload_id", "audio")),
            artifacts=("transcript.json", "lyrics.lrc", "lyrics.srt"),
        ),
        JobType(
            "finetune",
            "LoRA fine-tune on a dataset → adapter (PEFT format)",
            FinetuneParams,
            "train",
            inputs=(SourceDataset("dataset_id"),),
            artifacts=(*ADAPTER_FILES, "metrics.jsonl"),
            check=_check_finetune,
        ),
    )
}


def job_type(name: str) -> JobType:
    """The registry entry of `name`, or a ValueError naming the known types."""
    try:
        return JOB_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown job type {name!r}; known: {sorted(JOB_TYPES)}") from None


def parse_params(job_type: JobType, params: dict[str, Any], settings: Settings) -> Params:
    """A job's params validated against its type's model and this deployment's limits."""
    return job_type.params.model_validate(params, context={"settings": settings})


def parse_submit(body: Any, settings: Settings) -> tuple[SubmitRequest, JobType, Params]:
    """Validate a submit body: the envelope, the type, then the params against its model."""
    if not isinstance(body, dict):
        raise InvalidRequest(None, "the body must be a JSON object")
    try:
        request = SubmitRequest.model_validate(body)
    except ValidationError as error:
        raise invalid_request(error) from None
    if request.type not in JOB_TYPES:
        raise InvalidRequest("type", f"must be one of {sorted(JOB_TYPES)}")
    entry = JOB_TYPES[request.type]
    try:
        params = parse_params(entry, request.params, settings)
    except ValidationError as error:
        raise invalid_request(error, ("params",)) from None
    return request, entry, params
