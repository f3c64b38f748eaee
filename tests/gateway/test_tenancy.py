"""Quotas, the submit rate limit, priorities and /v1/usage at the gateway (real Redis, a
recording stand-in for Celery)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from api.gateway import create_app
from shared.core.jobs import JobStore
from shared.core.quotas import Quotas, QuotaStore
from shared.core.scheduler import FairScheduler
from shared.core.storage import LocalStore
from shared.core.tenants import TenantStore
from tests.gateway.test_batches import make_settings
from tests.gateway.test_gateway import generate_body, npy_bytes, upload
from tests.support.fakes import RecordingCelery


@pytest.fixture
def celery(redis_client: redis.Redis) -> RecordingCelery:
    return RecordingCelery(broker=redis_client)


@pytest.fixture
def client(redis_url, redis_client, tmp_path: Path, celery):
    settings = make_settings(redis_url, tmp_path, tenant_max_queued="3")
    store = LocalStore(tmp_path / "artifacts")
    return create_app(
        settings, redis_client=redis_client, store=store, celery_app=celery
    ).test_client()


@pytest.fixture
def acme(redis_client) -> dict[str, str]:
    return {"Authorization": f"Bearer {TenantStore(redis_client).create_key('acme')}"}


@pytest.fixture
def quotas(redis_client) -> QuotaStore:
    return QuotaStore(redis_client, Quotas(max_queued=3))


def test_the_queued_limit_refuses_with_429_naming_it(client, acme, celery) -> None:
    for _ in range(3):
        assert client.post("/v1/jobs", json=generate_body(), headers=acme).status_code == 202
    reply = client.post("/v1/jobs", json=generate_body(), headers=acme)
    assert reply.status_code == 429 and "Retry-After" not in reply.headers
    error = reply.get_json()["error"]
    assert (error["code"], error["field"]) == ("quota_exceeded", "max_queued")
    assert "3 jobs queued" in error["message"] and len(celery.sent) == 3
    batch = client.post("/v1/batches", json={"items": [generate_body()]}, headers=acme)
    assert batch.status_code == 429 and batch.get_json()["error"]["field"] == "max_queued"


def test_the_rate_limit_answers_429_with_retry_after(client, acme, quotas) -> None:
    quotas.set("acme", {"submits_per_minute": 2, "max_queued": 0})
    codes = [client.post("/v1/jobs", json=generate_body(), headers=acme) for _ in range(3)]
    assert [reply.status_code for reply in codes] == [202, 202, 429]
    refused = codes[-1]
    assert refused.get_json()["error"]["field"] == "submits_per_minute"
    assert refused.get_json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 30


def test_daily_audio_answers_429_with_retry_after_until_midnight(client, acme, quotas) -> None:
    quotas.set("acme", {"audio_seconds_per_day": 10})
    ok = client.post("/v1/jobs", json=generate_body(duration_s=8.0), headers=acme)
    assert ok.status_code == 202
    reply = client.post("/v1/jobs", json=generate_body(duration_s=4.0), headers=acme)
    assert reply.status_code == 429
    assert reply.get_json()["error"]["field"] == "audio_seconds_per_day"
    assert 1 <= int(reply.headers["Retry-After"]) <= 24 * 3600
    client.post(f"/v1/jobs/{ok.get_json()['id']}/cancel", headers=acme)  # gives its 8 s back
    again = client.post("/v1/jobs", json=generate_body(duration_s=4.0), headers=acme)
    assert again.status_code == 202


def test_storage_quota_refuses_an_upload_past_it(client, acme, quotas) -> None:
    quotas.set("acme", {"storage_bytes": 100})
    reply = upload(client, acme, npy_bytes(np.zeros((8, 25), np.int32)), "t.npy")
    assert reply.status_code == 429 and reply.get_json()["error"]["field"] == "storage_bytes"


def test_priority_defaults_and_usage(client, acme, redis_client, quotas) -> None:
    quotas.set("acme", {"max_running": 2, "weight": 3})
    single = client.post("/v1/jobs", json=generate_body(), headers=acme).get_json()
    chosen = client.post("/v1/jobs", json={**generate_body(), "priority": "batch"}, headers=acme)
    batch = client.post("/v1/batches", json={"items": [generate_body()]}, headers=acme)
    assert single["priority"] == "interactive" and chosen.get_json()["priority"] == "batch"
    assert batch.status_code == 202
    jobs = JobStore(redis_client)
    (item,) = [
        j for j in jobs.list("acme")[0] if j.id not in (single["id"], chosen.get_json()["id"])
    ]
    assert item.priority == "batch"
    FairScheduler(redis_client, Quotas()).next("gpu", "w1", 30, 3)
    usage = client.get("/v1/usage", headers=acme).get_json()
    assert usage["running"] == {"used": 1, "limit": 2}
    assert usage["queued"] == {"used": 2, "limit": 3} and usage["weight"] == 3
    assert usage["storage_bytes"] == {"used": 0, "limit": None}
    assert client.get("/v1/usage").status_code == 401
