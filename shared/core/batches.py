"""Batches: many jobs under one id, with per-item results (after the OpenAI Batch API).

A batch record holds what the submit said (item count, webhook, cancel flag); the items are
ordinary jobs, listed in submit order with their `custom_id`s. Counts, progress and the batch's
state are read from the jobs themselves, so they can never drift from the job store. No torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import redis

from shared.core.jobs import IDEMPOTENCY_TTL_S, STATES, Job, JobStore, new_id

CHUNK = 1000  # jobs read per Redis round trip
BATCH_STATES = ("in_progress", "cancelling", "completed", "cancelled")


def batch_key(batch_id: str) -> str:
    return f"batch:{batch_id}"


def batch_items_key(batch_id: str) -> str:
    return f"batch-items:{batch_id}"


def batch_unsent_key(batch_id: str) -> str:
    return f"batch-unsent:{batch_id}"


def batch_sender_key(batch_id: str) -> str:
    return f"batch-sender:{batch_id}"


SENDING_KEY = "batches-sending"  # batches whose items' Celery messages are not all sent


def tenant_batches_key(tenant: str) -> str:
    return f"tenant-batches:{tenant}"


def batch_idempotency_key(tenant: str, key: str) -> str:
    return f"idem-batch:{tenant}:{key}"


@dataclass
class Batch:
    id: str
    tenant: str
    total: int
    request_hash: str  # of the items as submitted: a replayed idempotency key must match it
    webhook_url: str | None = None
    cancel_requested: bool = False
    created_at: float = field(default_factory=time.time)

    @classmethod
    def new(cls, tenant: str, total: int, request_hash: str, webhook_url: str | None) -> Batch:
        return cls(new_id(), tenant, total, request_hash, webhook_url)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Batch:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Item:
    index: int
    custom_id: str | None
    job_id: str
    job: Job | None  # None once the job was deleted


@dataclass(frozen=True)
class Status:
    counts: dict[str, int]  # per job state, plus `deleted`
    progress: float  # 0-100 over all items
    completed_at: float | None  # when the last item ended, once all have

    @property
    def done(self) -> bool:
        return self.counts["queued"] + self.counts["running"] == 0


class BatchStore:
    def __init__(self, redis_client: redis.Redis) -> None:
        self._redis = redis_client
        self._jobs = JobStore(redis_client)

    def claim_idempotency_key(self, tenant: str, key: str, batch_id: str) -> str | None:
        """Reserve `key` for `batch_id` (None), or the id of the batch that already has it."""
        idem = batch_idempotency_key(tenant, key)
        if self._redis.set(idem, batch_id, nx=True, ex=IDEMPOTENCY_TTL_S):
            return None
        return _text(self._redis.get(idem) or b"")

    def create(
        self, batch: Batch, items: list[tuple[str | None, str]], to_send: list[str]
    ) -> Batch:
        """Record the batch, its (custom_id, job_id) items in submit order, and the ids of the
        jobs the workers are to queue (the items, or a first step they wait for)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(batch_key(batch.id), json.dumps(asdict(batch)))
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            pipe.rpush(
                batch_items_key(batch.id),
                *(json.dumps({"custom_id": c, "job_id": j}) for c, j in chunk),
            )
        for start in range(0, len(to_send), CHUNK):
            pipe.rpush(batch_unsent_key(batch.id), *to_send[start : start + CHUNK])
        pipe.sadd(SENDING_KEY, batch.id)
        pipe.zadd(tenant_batches_key(batch.tenant), {batch.id: batch.created_at})
        pipe.execute()
        return batch

    # -- sending: any worker may, one at a time per batch (a lease), in submit order ---------

    def sending(self) -> list[str]:
        return sorted(_text(member) for member in self._redis.smembers(SENDING_KEY))

    def lease_sending(self, batch_id: str, worker: str, lease_s: float) -> bool:
        """Take (or renew) the right to send this batch's messages for lease_s."""
        key = batch_sender_key(batch_id)
        if self._redis.set(key, worker, nx=True, px=int(lease_s * 1000)):
            return True
        if _text(self._redis.get(key) or b"") == worker:
            return bool(self._redis.set(key, worker, xx=True, px=int(lease_s * 1000)))
        return False

    def next_unsent(self, batch_id: str) -> str | None:
        """The next job to queue; removed by `sent` only once its message went out, so a
        sender that dies in between makes the next one send it again (at least once)."""
        job_id = self._redis.lindex(batch_unsent_key(batch_id), 0)
        return None if job_id is None else _text(job_id)

    def sent(self, batch_id: str) -> None:
        self._redis.lpop(batch_unsent_key(batch_id))

    def done_sending(self, batch_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.srem(SENDING_KEY, batch_id)
        pipe.delete(batch_sender_key(batch_id), batch_unsent_key(batch_id))
        pipe.execute()

    def get(self, batch_id: str) -> Batch | None:
        raw = self._redis.get(batch_key(batch_id)) if batch_id else None
        return Batch.from_dict(json.loads(raw)) if raw else None

    def get_for_tenant(self, tenant: str, batch_id: str) -> Batch | None:
        batch = self.get(batch_id)
        return batch if batch is not None and batch.tenant == tenant else None

    def list(self, tenant: str, limit: int, before: float | None = None) -> list[Batch]:
        """Newest first; `before` (a created_at) pages on."""
        top = "+inf" if before is None else f"({before!r}"
        ids = self._redis.zrevrangebyscore(
            tenant_batches_key(tenant), top, "-inf", start=0, num=limit
        )
        return [b for b in (self.get(_text(i)) for i in ids) if b is not None]

    def request_cancel(self, batch: Batch) -> Batch:
        batch.cancel_requested = True
        self._redis.set(batch_key(batch.id), json.dumps(asdict(batch)), xx=True)
        return batch

    def items(self, batch_id: str) -> Iterator[Item]:
        """Every item in submit order with its job as it is now."""
        length = self._redis.llen(batch_items_key(batch_id))
        for start in range(0, length, CHUNK):
            raw = self._redis.lrange(batch_items_key(batch_id), start, start + CHUNK - 1)
            entries = [json.loads(r) for r in raw]
            jobs = self._jobs.get_many([entry["job_id"] for entry in entries])
            for offset, (entry, job) in enumerate(zip(entries, jobs, strict=True)):
                yield Item(start + offset, entry["custom_id"], entry["job_id"], job)

    def job_ids(self, batch_id: str) -> list[str]:
        raw = self._redis.lrange(batch_items_key(batch_id), 0, -1)
        return [json.loads(entry)["job_id"] for entry in raw]

    def finished(self, batch_id: str) -> bool:
        """Whether every item has ended (or was deleted), reading only the jobs' states."""
        job_ids = self.job_ids(batch_id)
        for start in range(0, len(job_ids), CHUNK):
            states = self._jobs.states(job_ids[start : start + CHUNK])
            if any(state in ("queued", "running") for state in states):
                return False
        return True

    def status(self, batch_id: str) -> Status:
        counts = dict.fromkeys((*STATES, "deleted"), 0)
        progress = 0.0
        last_finish: float | None = None
        for item in self.items(batch_id):
            if item.job is None:
                counts["deleted"] += 1
                progress += 100.0
                continue
            counts[item.job.state] += 1
            progress += 100.0 if item.job.terminal else item.job.progress
            if item.job.finished_at is not None:
                last_finish = max(last_finish or 0.0, item.job.finished_at)
        total = sum(counts.values())
        done = counts["queued"] + counts["running"] == 0
        return Status(
            counts=counts,
            progress=round(progress / total, 2) if total else 100.0,
            completed_at=last_finish if done else None,
        )

    def delete(self, batch: Batch) -> None:
        """The batch record and its item list (its jobs are deleted on their own)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(batch_key(batch.id), batch_items_key(batch.id), batch_unsent_key(batch.id))
        pipe.zrem(tenant_batches_key(batch.tenant), batch.id)
        pipe.srem(SENDING_KEY, batch.id)
        pipe.execute()


def batch_state(batch: Batch, status: Status) -> str:
    if status.done:
        return "cancelled" if batch.cancel_requested else "completed"
    return "cancelling" if batch.cancel_requested else "in_progress"


def batch_out(batch: Batch, status: Status) -> dict[str, Any]:
    """A batch as clients (and its batch.completed webhook) see it."""
    return {
        "id": batch.id,
        "state": batch_state(batch, status),
        "total": batch.total,
        "counts": status.counts,
        "progress": status.progress,
        "webhook_url": batch.webhook_url,
        "cancel_requested": batch.cancel_requested,
        "created_at": batch.created_at,
        "completed_at": status.completed_at,
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
