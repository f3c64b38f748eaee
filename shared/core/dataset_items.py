"""The rules of dataset items, shared by the gateway (create, show) and the fine-tune worker
(read the ready songs): which jobs and uploads an item may name, and where it stands now."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.core.config import Settings
from shared.core.constants import FRAMES_PER_SECOND
from shared.core.datasets import DatasetItem, ItemStateName
from shared.core.inputs import InputNotFound, InputResolver, SourceJob, SourceUpload
from shared.core.jobs import Job
from shared.core.schemas import DatasetItemIn
from shared.core.storage import TOKENS
from shared.core.tokens import InputError, read_tokens


@dataclass(frozen=True)
class ItemState:
    state: ItemStateName
    reason: str | None = None
    tokens_job: Job | None = None  # the job whose tokens.npy the item is, once ready


_SOURCE = SourceJob("source_job_id", needs=((TOKENS,),))


def check_items(
    tenant: str, items: list[DatasetItemIn], resolver: InputResolver, settings: Settings
) -> list[DatasetItem]:
    """Validated items → records; InputNotFound (404) or
    InputError (422) naming `items[i].field` when an item names another tenant's or an
    unusable job or upload, is too long, or the dataset is over its total size."""
    checked = []
    total_s = 0.0
    for i, item in enumerate(items):
        where = f"items[{i}]"
        try:
            if item.source_job_id is not None:
                job = resolver.job(tenant, item.source_job_id, _SOURCE)
                frames = int(resolver.tokens(job, "source_job_id").shape[1])
                record = DatasetItem(item.tags, item.lyrics, source_job_id=job.id, frames=frames)
                field_name = "source_job_id"
            else:
                upload = resolver.upload_store.get_for_tenant(tenant, item.upload_id)
                if upload is None:
                    raise InputNotFound("upload_id", f"no upload {item.upload_id}")
                frames = int(upload.duration_s * FRAMES_PER_SECOND) + (upload.kind == "audio")
                record = DatasetItem(item.tags, item.lyrics, upload_id=upload.id, frames=frames)
                field_name = "upload_id"
        except InputError as error:
            raise type(error)(f"{where}.{error.field}", error.message) from None
        seconds = record.frames / FRAMES_PER_SECOND
        if seconds > settings.max_dataset_item_seconds:
            raise InputError(
                f"{where}.{field_name}",
                f"the song is {seconds:.1f} s; at most {settings.max_dataset_item_seconds:g} s "
                "per item (HEARTCLUSTER_MAX_DATASET_ITEM_SECONDS)",
            )
        total_s += seconds
        if total_s > settings.max_dataset_seconds:
            raise InputError(
                f"{where}.{field_name}",
                f"the dataset would hold over {settings.max_dataset_seconds:g} s of audio "
                "(HEARTCLUSTER_MAX_DATASET_SECONDS)",
            )
        checked.append(record)
    return checked


def needs_encoding(item: DatasetItem, resolver: InputResolver) -> bool:
    """An audio upload not yet given an encode job."""
    if item.upload_id is None or item.encode_job_id is not None:
        return False
    upload = resolver.upload_store.get(item.upload_id)
    return upload is not None and upload.kind == "audio"


def item_state(tenant: str, item: DatasetItem, resolver: InputResolver) -> ItemState:
    """Where an item stands now, read from the job or upload it names."""
    job_id = item.source_job_id or item.encode_job_id
    if job_id is not None:
        job = resolver.job_store.get_for_tenant(tenant, job_id)
        if job is None:
            return ItemState("failed", f"job {job_id} no longer exists")
        if job.state == "succeeded" and TOKENS in job.artifacts:
            return ItemState("ready", tokens_job=job)
        if job.state in ("queued", "running"):
            return ItemState("encoding")
        reason = job.error["message"] if job.error else f"job {job.id} ended {job.state}"
        return ItemState("failed", reason)
    if resolver.upload_store.get_for_tenant(tenant, item.upload_id or "") is None:
        return ItemState("failed", f"upload {item.upload_id} no longer exists")
    return ItemState("ready")


def item_tokens(
    tenant: str, item: DatasetItem, state: ItemState, resolver: InputResolver
) -> np.ndarray:
    """A ready item's codes [8, T]."""
    if state.tokens_job is not None:
        return resolver.tokens(state.tokens_job, "dataset_id")
    upload = resolver.upload(tenant, item.upload_id or "", SourceUpload("dataset_id", "tokens"))
    return read_tokens(resolver.upload_bytes(upload), "dataset_id")
