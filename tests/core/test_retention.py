"""Deletion and the retention sweep (real redis-server, local object store), and API keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.core.config import Settings
from shared.core.jobs import Job, JobStore, Upload, UploadStore
from shared.core.retention import DAY_S, Deleter, NotFinished, sweep
from shared.core.storage import LocalStore, artifact_key, upload_key
from shared.core.tenants import TenantStore, hash_key
from shared.core.webhooks import WATCH_KEY, WebhookStore

NOW = 1_800_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "artifacts")


def finished(jobs: JobStore, store: LocalStore, tenant: str, created_at: float) -> Job:
    job = Job.new(tenant, "generate", {"tags": "x"})
    job.created_at = created_at
    jobs.create(job)
    jobs.start(job.id)
    store.put_bytes(artifact_key(tenant, job.id, "metadata.json"), b"{}")
    return jobs.succeed(job.id, ["metadata.json"])


def stored_upload(uploads: UploadStore, store: LocalStore, tenant: str, created_at: float):
    upload = Upload("u" + str(int(created_at)), tenant, "", "a.wav", "audio", 3, 1.0)
    upload.key = upload_key(tenant, upload.id, upload.filename)
    upload.created_at = created_at
    store.put_bytes(upload.key, b"abc")
    return uploads.create(upload)


def test_deleting_a_job_removes_record_artifacts_index_and_webhook(redis_client, store) -> None:
    jobs = JobStore(redis_client)
    job = finished(jobs, store, "acme", NOW)
    WebhookStore(redis_client).watch(f"job:{job.id}", "http://example.com/")
    deleter = Deleter(redis_client, store)
    assert not deleter.delete_job("other", job.id)
    assert deleter.delete_job("acme", job.id)
    assert jobs.get(job.id) is None and jobs.list("acme")[0] == []
    assert not store.exists(artifact_key("acme", job.id, "metadata.json"))
    assert not redis_client.sismember(WATCH_KEY, f"job:{job.id}")
    running = jobs.create(Job.new("acme", "generate", {"tags": "x"}))
    with pytest.raises(NotFinished, match="cancel it first"):
        deleter.delete_job("acme", running.id)
    assert jobs.delete(running.id) is False and jobs.get(running.id) is not None


def test_the_sweep_deletes_by_age_with_per_tenant_retention(redis_client, store, tmp_path) -> None:
    jobs, uploads, tenants = (
        JobStore(redis_client),
        UploadStore(redis_client),
        TenantStore(redis_client),
    )
    old = finished(jobs, store, "acme", NOW - 10 * DAY_S)
    fresh = finished(jobs, store, "acme", NOW - 1 * DAY_S)
    old_running = jobs.create(Job.new("acme", "generate", {"tags": "x"}))
    redis_client.zadd("tenant-jobs:acme", {old_running.id: NOW - 20 * DAY_S})
    kept_longer = finished(jobs, store, "keeper", NOW - 10 * DAY_S)
    old_upload = stored_upload(uploads, store, "acme", NOW - 10 * DAY_S)
    tenants.set_retention_days("keeper", 30)
    settings = Settings(
        redis_url="redis://unused", retention_days=7, retention_sweep_s=60, data_dir=tmp_path
    )
    assert sweep(redis_client, store, settings, now=NOW) == 2
    assert jobs.get(old.id) is None and not store.exists(
        artifact_key("acme", old.id, "metadata.json")
    )
    assert uploads.get(old_upload.id) is None and not store.exists(old_upload.key)
    assert jobs.get(fresh.id) is not None and jobs.get(kept_longer.id) is not None
    assert jobs.get(old_running.id) is not None  # not finished: kept until it is
    assert sweep(redis_client, store, settings, now=NOW) == 0  # one sweep per interval
    redis_client.delete("retention-sweep-lock")
    tenants.set_retention_days("keeper", 5)
    assert sweep(redis_client, store, settings, now=NOW) == 1
    assert jobs.get(kept_longer.id) is None


def test_keys_are_listed_revoked_and_rotated(redis_client) -> None:
    tenants = TenantStore(redis_client)
    first, second = tenants.create_key("acme"), tenants.create_key("acme")
    listed = tenants.list_keys("acme")
    assert len(listed) == 2 and all(len(k["id"]) == 12 and k["created_at"] for k in listed)
    assert first not in str(listed) and second not in str(listed)
    first_id, second_id = hash_key(first)[:12], hash_key(second)[:12]
    assert {k["id"] for k in listed} == {first_id, second_id}
    rotated = tenants.rotate_key("acme", first_id)
    assert tenants.tenant_for_key(first) is None and tenants.tenant_for_key(rotated) == "acme"
    assert {k["id"] for k in tenants.list_keys("acme")} == {second_id, hash_key(rotated)[:12]}
    tenants.revoke_key("acme", second_id)
    assert tenants.tenant_for_key(second) is None
    with pytest.raises(KeyError, match="no key with id"):
        tenants.revoke_key("other", second_id)
    assert len(tenants.list_keys("acme")) == 1
