"""Fine-tune datasets, a tenant's resource: named lists of songs with their prompts.

An item is a finished song job (its tokens.npy), a tokens upload, or an audio upload that an
`encode` job on the cpu queue tokenizes once. The record keeps what each item is; its state
(ready / encoding / failed with the reason) is read from the jobs and uploads it names
(shared/core/dataset_items.py), so it can never disagree with them. No torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import redis

from shared.core.jobs import _decode_cursor, _encode_cursor, new_id

ItemStateName = Literal["ready", "encoding", "failed"]


@dataclass
class DatasetItem:
    tags: str
    lyrics: str = ""
    upload_id: str | None = None
    source_job_id: str | None = None
    encode_job_id: str | None = None  # the encode job of an audio upload
    frames: int = 0  # song length (an audio upload's is its duration, rounded up)


@dataclass
class Dataset:
    id: str
    tenant: str
    name: str
    items: list[DatasetItem]
    created_at: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Dataset:
        items = [DatasetItem(**item) for item in data.pop("items")]
        return cls(items=items, **data)


def dataset_key(dataset_id: str) -> str:
    return f"dataset:{dataset_id}"


def tenant_datasets_key(tenant: str) -> str:
    return f"tenant:{tenant}:datasets"


class DatasetStore:
    """Dataset records (`dataset:{id}`, one JSON value each) and a per-tenant index."""

    def __init__(self, redis_client: redis.Redis) -> None:
        self._redis = redis_client

    def create(self, dataset: Dataset) -> Dataset:
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(dataset_key(dataset.id), json.dumps(asdict(dataset)))
        pipe.zadd(tenant_datasets_key(dataset.tenant), {dataset.id: dataset.created_at})
        pipe.execute()
        return dataset

    def get_for_tenant(self, tenant: str, dataset_id: str) -> Dataset | None:
        """The dataset, or None when it does not exist or is another tenant's."""
        raw = self._redis.get(dataset_key(dataset_id))
        if not raw:
            return None
        dataset = Dataset.from_dict(json.loads(raw))
        return dataset if dataset.tenant == tenant else None

    def list(
        self, tenant: str, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[Dataset], str | None]:
        """A page of the tenant's datasets, newest first (ValueError for a bad cursor)."""
        max_score, after = "+inf", None
        if cursor is not None:
            after = _decode_cursor(cursor)
            max_score = repr(after[0])
        members = self._redis.zrevrangebyscore(
            tenant_datasets_key(tenant), max_score, "-inf", withscores=True
        )
        page: list[Dataset] = []
        for member, score in members:
            dataset_id = member.decode() if isinstance(member, bytes) else member
            if after is not None and score == after[0] and dataset_id >= after[1]:
                continue
            dataset = self.get_for_tenant(tenant, dataset_id)
            if dataset is None:
                continue
            if len(page) == limit:
                last = page[-1]
                return page, _encode_cursor(last.created_at, last.id)
            page.append(dataset)
        return page, None

    def delete(self, tenant: str, dataset_id: str) -> bool:
        if self.get_for_tenant(tenant, dataset_id) is None:
            return False
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(dataset_key(dataset_id))
        pipe.zrem(tenant_datasets_key(tenant), dataset_id)
        pipe.execute()
        return True


def new_dataset(tenant: str, name: str, items: list[DatasetItem]) -> Dataset:
    return Dataset(id=new_id(), tenant=tenant, name=name, items=items)
