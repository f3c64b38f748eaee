"""Deleting jobs, uploads and batches, on request (the gateway) or by age (the retention sweep).

A job's artifacts go before its record: the record is what makes a retried delete find them, so
a failure half-way never leaves files nobody can name. Only finished jobs are deleted (the job
store checks that in the same step that removes the record). No torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from shared.core.batches import BatchStore, tenant_batches_key
from shared.core.config import Settings
from shared.core.jobs import JobStore, UploadStore, tenant_jobs_key, tenant_uploads_key
from shared.core.storage import ObjectStore, job_prefix, upload_key
from shared.core.tenants import TenantStore
from shared.core.webhooks import WebhookStore, batch_subject, job_subject

log = logging.getLogger(__name__)

DAY_S = 24 * 3600
SWEEP_LOCK_KEY = "retention-sweep-lock"


class NotFinished(Exception):
    """The job is queued or running: cancel it first."""


@dataclass
class Deleter:
    redis: redis.Redis
    store: ObjectStore

    def __post_init__(self) -> None:
        self.jobs = JobStore(self.redis)
        self.uploads = UploadStore(self.redis)
        self.batches = BatchStore(self.redis)
        self.webhooks = WebhookStore(self.redis)

    def delete_job(self, tenant: str, job_id: str) -> bool:
        """False when the tenant has no such job; NotFinished when it is still queued/running."""
        job = self.jobs.get_for_tenant(tenant, job_id)
        if job is None:
            return False
        if not job.terminal:
            raise NotFinished(f"job {job_id} is {job.state}; cancel it first")
        self.store.delete_prefix(job_prefix(tenant, job_id))
        if self.jobs.delete(job_id) is False:  # raced with nothing: terminal states never change
            raise NotFinished(f"job {job_id} has not finished; cancel it first")
        self.webhooks.forget(job_subject(job_id))
        return True

    def delete_upload(self, tenant: str, upload_id: str) -> bool:
        upload = self.uploads.get_for_tenant(tenant, upload_id)
        if upload is None:
            return False
        self.store.delete_prefix(upload_key(tenant, upload_id, ""))
        self.uploads.delete(upload)
        return True

    def delete_batch(self, tenant: str, batch_id: str) -> bool:
        """The batch record only; its jobs age out (or are deleted) on their own."""
        batch = self.batches.get_for_tenant(tenant, batch_id)
        if batch is None:
            return False
        self.batches.delete(batch)
        self.webhooks.forget(batch_subject(batch_id))
        return True


def _tenants(client: redis.Redis) -> set[str]:
    prefixes = (tenant_jobs_key(""), tenant_uploads_key(""), tenant_batches_key(""))
    found: set[str] = set()
    for prefix in prefixes:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            found.add((key.decode() if isinstance(key, bytes) else key)[len(prefix) :])
    return found


def sweep(
    client: redis.Redis, store: ObjectStore, settings: Settings, now: float | None = None
) -> int:
    """Delete every tenant's finished jobs, uploads and batches older than its retention
    (its own days, else HEARTCLUSTER_RETENTION_DAYS; 0 keeps everything). Returns how many.

    Idempotent, so any worker may run it; a cluster-wide lock keeps it to one sweep per
    HEARTCLUSTER_RETENTION_SWEEP_S.
    """
    if not client.set(SWEEP_LOCK_KEY, "1", nx=True, px=int(settings.retention_sweep_s * 1000)):
        return 0
    now = time.time() if now is None else now
    tenants = TenantStore(client)
    deleter = Deleter(client, store)
    deleted = 0
    for tenant in sorted(_tenants(client)):
        days = tenants.retention_days(tenant)
        days = settings.retention_days if days is None else days
        if days <= 0:
            continue
        cutoff = repr(now - days * DAY_S)
        for key, delete in (
            (tenant_jobs_key(tenant), deleter.delete_job),
            (tenant_uploads_key(tenant), deleter.delete_upload),
            (tenant_batches_key(tenant), deleter.delete_batch),
        ):
            for member in client.zrangebyscore(key, "-inf", cutoff):
                item_id = member.decode() if isinstance(member, bytes) else member
                try:
                    deleted += delete(tenant, item_id)
                except NotFinished:  # an old job still running: its turn comes later
                    continue
    if deleted:
        log.info("retention sweep deleted %d jobs, uploads and batches", deleted)
    return deleted
