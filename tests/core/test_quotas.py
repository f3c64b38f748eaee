"""Quotas and usage on a real redis-server: settings, the token bucket, audio reservations given
back, storage counted both ways, admission naming the limit."""

from __future__ import annotations

import pytest

from shared.core.config import Settings
from shared.core.jobs import Job, JobStore, Upload, UploadStore
from shared.core.quotas import QuotaExceeded, Quotas, QuotaStore, audio_seconds, default_quotas


@pytest.fixture
def quotas(redis_client) -> QuotaStore:
    return QuotaStore(redis_client, Quotas(max_queued=100))


def test_defaults_come_from_settings_and_own_quotas_override_them(quotas) -> None:
    settings = Settings.from_env({"HEARTCLUSTER_TENANT_MAX_RUNNING": "4"})
    assert default_quotas(settings).max_running == 4
    assert quotas.get("acme").max_queued == 100
    set_ = quotas.set("acme", {"weight": 2, "max_queued": 5})
    assert (set_.weight, set_.max_queued) == (2, 5) and quotas.own("acme") == {
        "weight": 2.0,
        "max_queued": 5,
    }
    assert quotas.set("acme", {"max_queued": None}).max_queued == 100  # back to the default
    assert quotas.get("other").weight == 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"weight": 0.5}, "weight must be at least 1"),
        ({"max_running": -1}, "max_running must be a number >= 0"),
        ({"max_running": 1.5}, "max_running must be a whole number"),
        ({"speed": 3}, "unknown quota 'speed'"),
    ],
)
def test_bad_quotas_are_refused_naming_them(quotas, values, message) -> None:
    with pytest.raises(ValueError, match=message):
        quotas.set("acme", values)
    assert quotas.own("acme") == {}


def test_the_submit_bucket_refuses_past_its_capacity(quotas) -> None:
    limits = Quotas(submits_per_minute=3)
    for _ in range(3):
        quotas.take_submit("acme", limits)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.take_submit("acme", limits)
    assert refused.value.field == "submits_per_minute"
    assert 0 < refused.value.retry_after_s <= 20  # one token refills in 60 / 3 s
    assert quotas.submits_held("acme", limits) == pytest.approx(3, abs=0.1)
    quotas.take_submit("other", limits)  # buckets are per tenant


def test_audio_seconds_are_reserved_and_given_back_when_a_job_does_not_succeed(
    quotas, redis_client
) -> None:
    jobs = JobStore(redis_client)
    kept, dropped = (jobs.create(Job.new("acme", "generate", {"duration_s": 30})) for _ in "ab")
    transaction = redis_client.pipeline()
    for job in (kept, dropped):
        quotas.reserve_audio("acme", job.id, audio_seconds(job.params), transaction)
    assert quotas.usage("acme")["audio_seconds_today"] == 0  # once the transaction runs
    transaction.execute()
    assert quotas.usage("acme")["audio_seconds_today"] == 60
    jobs.cancel(dropped.id)
    jobs.cancel(dropped.id)  # given back once
    jobs.start(kept.id)
    jobs.succeed(kept.id, [])
    assert quotas.usage("acme")["audio_seconds_today"] == 30
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit(
            Quotas(audio_seconds_per_day=40), quotas.usage("acme"), jobs=1, audio_s=11, train_jobs=0
        )
    assert refused.value.field == "audio_seconds_per_day" and refused.value.retry_after_s > 0
    quotas.admit(
        Quotas(audio_seconds_per_day=40), quotas.usage("acme"), jobs=1, audio_s=10, train_jobs=0
    )


def test_storage_counts_uploads_and_artifacts_until_deleted(quotas, redis_client) -> None:
    jobs, uploads = JobStore(redis_client), UploadStore(redis_client)
    upload = uploads.create(Upload("u1", "acme", "k", "a.wav", "audio", 1000, 1.0))
    job = jobs.create(Job.new("acme", "decode", {}))
    jobs.start(job.id)
    jobs.succeed(job.id, ["audio.flac"], artifact_bytes=500)
    assert quotas.usage("acme")["storage_bytes"] == 1500
    with pytest.raises(QuotaExceeded, match="storage_bytes"):
        quotas.admit_upload("acme", Quotas(storage_bytes=2000), 501)
    with pytest.raises(QuotaExceeded, match="storage_bytes"):
        quotas.admit(
            Quotas(storage_bytes=1500), quotas.usage("acme"), jobs=1, audio_s=0, train_jobs=0
        )
    uploads.delete(upload)
    uploads.delete(upload)  # counted out once
    assert jobs.delete(job.id) is True
    assert quotas.usage("acme")["storage_bytes"] == 0


def test_queued_and_train_limits_name_themselves(quotas, redis_client) -> None:
    jobs = JobStore(redis_client)
    for _ in range(2):
        jobs.create(Job.new("acme", "generate", {}))
    with pytest.raises(QuotaExceeded, match="2 jobs queued and 2 more") as refused:
        quotas.admit(Quotas(max_queued=3), quotas.usage("acme"), jobs=2, audio_s=0, train_jobs=0)
    assert refused.value.field == "max_queued" and refused.value.retry_after_s is None
    quotas.add_gpu_seconds("acme", 50)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit(
            Quotas(finetune_gpu_seconds_per_day=50), quotas.usage("acme"), 1, 0, train_jobs=1
        )
    assert refused.value.field == "finetune_gpu_seconds_per_day"
    quotas.admit(Quotas(finetune_gpu_seconds_per_day=50), quotas.usage("acme"), 1, 0, train_jobs=0)
