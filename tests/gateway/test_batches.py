"""Batches, deletion, uploads listing and webhook settings on the real gateway app and a real
redis-server, with a recording stand-in for Celery (no workers: jobs are finished by hand)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from api.gateway import create_app
from shared.core.config import Settings
from shared.core.jobs import JobStore
from shared.core.queueing import enqueue
from shared.core.quotas import Quotas
from shared.core.scheduler import FairScheduler
from shared.core.storage import LocalStore, artifact_key
from shared.core.tenants import TenantStore
from shared.core.webhooks import WATCH_KEY
from tests.gateway.test_gateway import finish, npy_bytes, upload, wav_bytes
from tests.support.fakes import RecordingCelery

TOKENS = npy_bytes(np.zeros((8, 25), np.int32))  # 2 s of codec frames


def make_settings(redis_url: str, tmp_path: Path, **extra: str) -> Settings:
    return Settings.from_env(
        {
            "HEARTCLUSTER_REDIS_URL": redis_url,
            "HEARTCLUSTER_DATA_DIR": str(tmp_path),
            "HEARTCLUSTER_MAX_UPLOAD_SECONDS": "5",
            "HEARTCLUSTER_MAX_BATCH_ITEMS": "200",
            **{f"HEARTCLUSTER_{k.upper()}": v for k, v in extra.items()},
        }
    )


@pytest.fixture
def celery(redis_client: redis.Redis) -> RecordingCelery:
    return RecordingCelery(broker=redis_client)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "artifacts")


@pytest.fixture
def client(redis_url, redis_client, tmp_path, store, celery):
    settings = make_settings(redis_url, tmp_path, webhook_allow_private="1")
    app = create_app(settings, redis_client=redis_client, store=store, celery_app=celery)
    return app.test_client()


@pytest.fixture
def keys(redis_client) -> dict[str, dict[str, str]]:
    tenants = TenantStore(redis_client)
    return {n: {"Authorization": f"Bearer {tenants.create_key(n)}"} for n in ("acme", "other")}


@pytest.fixture
def jobs(redis_client) -> JobStore:
    return JobStore(redis_client)


def song(i: int, **params: Any) -> dict[str, Any]:
    return {
        "custom_id": f"song-{i}",
        "type": "generate",
        "params": {"tags": "piano", "duration_s": 1.0, "seed": i, **params},
    }


def post_batch(client, headers, body: Any, **kwargs: Any):
    return client.post("/v1/batches", json=body, headers=headers, **kwargs)


def results(client, headers, batch_id: str) -> list[dict[str, Any]]:
    reply = client.get(f"/v1/batches/{batch_id}/results", headers=headers)
    assert reply.status_code == 200 and reply.mimetype == "application/jsonl"
    return [json.loads(line) for line in reply.get_data(as_text=True).splitlines()]


# -- batches ---------------------------------------------------------------------------------


def test_a_batch_with_three_invalid_items_is_refused_whole(
    client, keys, celery, redis_client
) -> None:
    items = [song(i) for i in range(100)]
    items[7]["params"]["duration_s"] = -1
    items[42]["params"]["top_k"] = "many"
    items[99]["type"] = "sing"
    reply = post_batch(client, keys["acme"], {"items": items})
    assert reply.status_code == 422, reply.get_json()
    error = reply.get_json()["error"]
    assert error["code"] == "invalid_items" and "3 of 100" in error["message"]
    assert error["invalid_items"] == [7, 42, 99]
    fields = [detail["field"] for detail in error["details"]]
    assert fields == ["items[7].params.duration_s", "items[42].params.top_k", "items[99].type"]
    assert celery.sent == []
    assert list(redis_client.scan_iter("job:*")) == [] and not redis_client.keys("batch:*")


def test_item_problems_of_the_batch_itself_are_named(client, keys) -> None:
    items = [song(0), song(0), {**song(2), "idempotency_key": "x"}, "not an object"]
    error = post_batch(client, keys["acme"], {"items": items}).get_json()["error"]
    assert [d["field"] for d in error["details"]] == [
        "items[1].custom_id",
        "items[2].idempotency_key",
        "items[3]",
    ]
    for body, field in (({"items": []}, "items"), ({"items": [], "extra": 1}, "extra")):
        reply = post_batch(client, keys["acme"], body)
        assert (reply.status_code, reply.get_json()["error"]["field"]) == (422, field)
    too_many = post_batch(client, keys["acme"], {"items": [song(i) for i in range(201)]})
    assert too_many.status_code == 422 and "at most 200" in too_many.get_json()["error"]["message"]


def test_another_tenants_input_refuses_the_batch(client, keys, celery) -> None:
    theirs = upload(client, keys["other"], TOKENS, "t.npy")
    item = {"type": "decode", "params": {"tokens_upload_id": theirs.get_json()["id"]}}
    error = post_batch(client, keys["acme"], {"items": [song(0), item]}).get_json()["error"]
    assert error["details"][0]["field"] == "items[1].params.tokens_upload_id"
    assert celery.sent == []


def test_batch_runs_its_items_and_reports_per_item_results(
    client, keys, celery, jobs, store, redis_client
):
    tokens = upload(client, keys["acme"], TOKENS, "t.npy")
    params = {"tokens_upload_id": tokens.get_json()["id"]}
    decode = {"custom_id": "dec", "type": "decode", "params": params}
    reply = post_batch(client, keys["acme"], {"items": [song(0), song(1), decode]})
    assert reply.status_code == 202, reply.get_json()
    batch = reply.get_json()
    assert batch["total"] == 3 and batch["counts"]["queued"] == 3
    assert batch["state"] == "in_progress" and reply.headers["Location"].endswith(batch["id"])
    lines = results(client, keys["acme"], batch["id"])
    # the workers send the messages, in submit order (tests/workers/test_background.py)
    assert celery.sent == []
    unsent = [i.decode() for i in redis_client.lrange(f"batch-unsent:{batch['id']}", 0, -1)]
    assert unsent == [line["job_id"] for line in lines]
    assert [line["custom_id"] for line in lines] == ["song-0", "song-1", "dec"]
    first, second, third = (line["job_id"] for line in lines)
    finish(jobs, store, "acme", first, {"audio.flac": b"a", "metadata.json": b"{}"})
    jobs.start(second)
    jobs.fail(second, "internal_error", "boom")
    during = client.get(f"/v1/batches/{batch['id']}", headers=keys["acme"]).get_json()
    assert during["counts"]["succeeded"] == during["counts"]["failed"] == 1
    assert during["progress"] == pytest.approx(200 / 3, abs=0.01)
    jobs.start(third)
    jobs.mark_cancelled(third)
    done = client.get(f"/v1/batches/{batch['id']}", headers=keys["acme"]).get_json()
    assert done["state"] == "completed" and done["completed_at"] is not None
    lines = results(client, keys["acme"], batch["id"])
    assert [line["state"] for line in lines] == ["succeeded", "failed", "cancelled"]
    assert lines[0]["artifacts"]["audio.flac"].endswith(f"/v1/jobs/{first}/artifacts/audio.flac")
    assert lines[1]["error"] == {"code": "internal_error", "message": "boom"}
    listed = client.get("/v1/batches", headers=keys["acme"]).get_json()["batches"]
    assert [b["id"] for b in listed] == [batch["id"]]
    assert client.get(f"/v1/batches/{batch['id']}", headers=keys["other"]).status_code == 404
    assert client.get("/v1/batches", headers=keys["other"]).get_json()["batches"] == []


def test_jsonl_bodies_and_files(client, keys) -> None:
    jsonl = "\n".join(json.dumps(song(i)) for i in range(3)) + "\n\n"
    reply = client.post(
        "/v1/batches?webhook_url=http://127.0.0.1:9/hook",
        data=jsonl,
        headers={**keys["acme"], "Content-Type": "application/jsonl"},
    )
    assert reply.status_code == 422 and reply.get_json()["error"]["field"] == "webhook_url"
    reply = client.post(
        "/v1/batches", data=jsonl, headers={**keys["acme"], "Content-Type": "application/jsonl"}
    )
    assert reply.status_code == 202 and reply.get_json()["total"] == 3
    reply = client.post(
        "/v1/batches",
        data={"file": (io.BytesIO(jsonl.encode()), "items.jsonl")},
        headers=keys["acme"],
        content_type="multipart/form-data",
    )
    assert reply.status_code == 202 and reply.get_json()["total"] == 3
    bad = client.post(
        "/v1/batches",
        data='{"type": }',
        headers={**keys["acme"], "Content-Type": "application/jsonl"},
    )
    assert bad.status_code == 400 and "line 1" in bad.get_json()["error"]["message"]


def test_cancelling_a_batch_cancels_what_has_not_finished(client, keys, jobs, store, redis_client):
    batch = post_batch(client, keys["acme"], {"items": [song(i) for i in range(4)]}).get_json()
    ids = [line["job_id"] for line in results(client, keys["acme"], batch["id"])]
    finish(jobs, store, "acme", ids[0], {"metadata.json": b"{}"})
    jobs.start(ids[1])
    reply = client.post(f"/v1/batches/{batch['id']}/cancel", headers=keys["acme"])
    assert reply.status_code == 200 and reply.get_json()["state"] == "cancelling"
    states = [jobs.get(i).state for i in ids]
    assert states == ["succeeded", "running", "cancelled", "cancelled"]
    assert jobs.get(ids[1]).cancel_requested
    scheduler = FairScheduler(redis_client, Quotas())
    assert not any(enqueue(scheduler, jobs.get(i)) for i in ids[2:])  # the sender skips them
    jobs.mark_cancelled(ids[1])  # what its worker does at the next frame
    after = client.get(f"/v1/batches/{batch['id']}", headers=keys["acme"]).get_json()
    assert after["state"] == "cancelled" and after["counts"]["cancelled"] == 3
    assert (
        client.post(f"/v1/batches/{batch['id']}/cancel", headers=keys["other"]).status_code == 404
    )


def test_batch_idempotency_key(client, keys, redis_client) -> None:
    body = {"items": [song(0)], "idempotency_key": "album-1"}
    first = post_batch(client, keys["acme"], body)
    again = post_batch(client, keys["acme"], body)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(redis_client.keys("job:*")) == 1
    other = post_batch(client, keys["acme"], {**body, "items": [song(1)]})
    assert other.status_code == 409 and other.get_json()["error"]["field"] == "idempotency_key"
    assert post_batch(client, keys["other"], body).status_code == 202  # keys are per tenant


def test_webhooks_need_a_secret_and_an_outside_target(
    client, keys, redis_client, redis_url, tmp_path, store, celery
) -> None:
    hooked = {**song(0)["params"]}
    body = {"type": "generate", "params": hooked, "webhook_url": "http://127.0.0.1:9/hook"}
    reply = client.post("/v1/jobs", json=body, headers=keys["acme"])
    assert reply.status_code == 422 and "secret" in reply.get_json()["error"]["message"]
    created = client.post("/v1/webhooks/secret", headers=keys["acme"])
    assert created.status_code == 201 and created.get_json()["secret"].startswith("whsec_")
    job = client.post("/v1/jobs", json=body, headers=keys["acme"]).get_json()
    assert redis_client.sismember(WATCH_KEY, f"job:{job['id']}")
    strict = create_app(
        make_settings(redis_url, tmp_path),
        redis_client=redis_client,
        store=store,
        celery_app=celery,
    ).test_client()
    for url in ("http://127.0.0.1:9/", "http://10.1.2.3/", "http://169.254.169.254/", "ftp://x/"):
        reply = strict.post("/v1/jobs", json={**body, "webhook_url": url}, headers=keys["acme"])
        assert reply.status_code == 422 and reply.get_json()["error"]["field"] == "webhook_url"
    endpoint = strict.put(
        "/v1/webhooks/endpoint", json={"url": "http://[::1]/"}, headers=keys["acme"]
    )
    assert endpoint.status_code == 422 and endpoint.get_json()["error"]["field"] == "url"
    settled = client.put(
        "/v1/webhooks/endpoint", json={"url": "http://127.0.0.1:9/d"}, headers=keys["acme"]
    )
    assert settled.get_json() == {
        "endpoint": "http://127.0.0.1:9/d",
        "secret_set": True,
        "events": ["job.succeeded", "job.failed", "job.cancelled", "batch.completed"],
    }
    assert client.get("/v1/webhooks", headers=keys["other"]).get_json()["secret_set"] is False
    plain = client.post("/v1/jobs", json=song(1) | {"custom_id": None}, headers=keys["acme"])
    assert plain.status_code == 422  # custom_id belongs to batch items only
    default = {"type": "generate", "params": hooked}
    job = client.post("/v1/jobs", json=default, headers=keys["acme"]).get_json()
    assert redis_client.get(f"webhook-target:job:{job['id']}") == b"http://127.0.0.1:9/d"


# -- deletion and uploads --------------------------------------------------------------------


def test_deleting_jobs(client, keys, jobs, store) -> None:
    job = client.post(
        "/v1/jobs", json={"type": "generate", "params": {"tags": "x"}}, headers=keys["acme"]
    ).get_json()
    assert client.delete(f"/v1/jobs/{job['id']}", headers=keys["acme"]).status_code == 409
    finish(jobs, store, "acme", job["id"], {"audio.flac": b"a", "metadata.json": b"{}"})
    assert store.exists(artifact_key("acme", job["id"], "audio.flac"))
    assert client.delete(f"/v1/jobs/{job['id']}", headers=keys["other"]).status_code == 404
    assert client.delete(f"/v1/jobs/{job['id']}", headers=keys["acme"]).status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}", headers=keys["acme"]).status_code == 404
    assert client.get("/v1/jobs", headers=keys["acme"]).get_json()["jobs"] == []
    assert not store.exists(artifact_key("acme", job["id"], "audio.flac"))
    assert client.delete(f"/v1/jobs/{job['id']}", headers=keys["acme"]).status_code == 404


def test_listing_getting_and_deleting_uploads(client, keys, store) -> None:
    made = [upload(client, keys["acme"], wav_bytes(), f"s{i}.wav").get_json() for i in range(3)]
    page = client.get("/v1/uploads?limit=2", headers=keys["acme"]).get_json()
    assert [u["id"] for u in page["uploads"]] == [made[2]["id"], made[1]["id"]]
    rest = client.get(f"/v1/uploads?cursor={page['next_cursor']}", headers=keys["acme"])
    assert [u["id"] for u in rest.get_json()["uploads"]] == [made[0]["id"]]
    assert client.get("/v1/uploads", headers=keys["other"]).get_json()["uploads"] == []
    one = client.get(f"/v1/uploads/{made[0]['id']}", headers=keys["acme"])
    assert one.get_json() == made[0]
    assert client.get(f"/v1/uploads/{made[0]['id']}", headers=keys["other"]).status_code == 404
    assert client.delete(f"/v1/uploads/{made[0]['id']}", headers=keys["other"]).status_code == 404
    key = f"tenants/acme/uploads/{made[0]['id']}/s0.wav"
    assert store.exists(key)
    assert client.delete(f"/v1/uploads/{made[0]['id']}", headers=keys["acme"]).status_code == 204
    assert not store.exists(key)
    assert client.get(f"/v1/uploads/{made[0]['id']}", headers=keys["acme"]).status_code == 404
    assert len(client.get("/v1/uploads", headers=keys["acme"]).get_json()["uploads"]) == 2
    bad = client.get("/v1/uploads?limit=0", headers=keys["acme"])
    assert bad.status_code == 422 and bad.get_json()["error"]["field"] == "limit"
