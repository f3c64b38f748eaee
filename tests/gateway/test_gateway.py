"""The Flask gateway against a real redis-server, with a recording stand-in for Celery where no
worker is involved (and once with the real Celery app, checking the broker queue itself)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import redis
import requests
import soundfile
from redis.backoff import NoBackoff
from redis.retry import Retry

from api.client.client import parse_sse
from api.gateway import create_app
from shared.core.config import Settings
from shared.core.constants import CODEC_CODES
from shared.core.jobs import JobStore
from shared.core.queueing import QUEUES, TASK_NAME
from shared.core.quotas import Quotas
from shared.core.scheduler import FairScheduler
from shared.core.storage import LocalStore, S3Store, artifact_key
from shared.core.tenants import TenantStore
from tests.support.fakes import RecordingCelery

ROOT = Path(__file__).resolve().parents[2]
MAX_UPLOAD_BYTES = 400_000


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings.from_env(
        {
            "HEARTCLUSTER_REDIS_URL": redis_url,
            "HEARTCLUSTER_DATA_DIR": str(tmp_path),
            "HEARTCLUSTER_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
            "HEARTCLUSTER_MAX_UPLOAD_SECONDS": "5",
            "HEARTCLUSTER_MAX_LYRICS_CHARS": "100",
        }
    )


@pytest.fixture
def celery(redis_client: redis.Redis) -> RecordingCelery:
    return RecordingCelery(consumed=("cpu",), broker=redis_client)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "artifacts")


@pytest.fixture
def app(settings: Settings, redis_client, store: LocalStore, celery: RecordingCelery):
    return create_app(settings, redis_client=redis_client, store=store, celery_app=celery)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def keys(redis_client) -> dict[str, dict[str, str]]:
    tenants = TenantStore(redis_client)
    return {
        name: {"Authorization": f"Bearer {tenants.create_key(name)}"} for name in ("acme", "other")
    }


@pytest.fixture
def jobs(redis_client) -> JobStore:
    return JobStore(redis_client)


@pytest.fixture
def scheduler(redis_client) -> FairScheduler:
    return FairScheduler(redis_client, Quotas())


def generate_body(**params: Any) -> dict[str, Any]:
    return {"type": "generate", "params": {"tags": "piano,happy", "seed": 7, **params}}


def submit(client, headers, body: Any = None):
    return client.post("/v1/jobs", json=generate_body() if body is None else body, headers=headers)


def wav_bytes(seconds: float = 0.5, rate: int = 8000, channels: int = 2) -> bytes:
    buffer = io.BytesIO()
    samples = np.zeros((int(seconds * rate), channels), dtype=np.float32)
    soundfile.write(buffer, samples, rate, format="WAV")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def upload(client, headers, data: bytes, filename: str):
    return client.post(
        "/v1/uploads",
        data={"file": (io.BytesIO(data), filename)},
        headers=headers,
        content_type="multipart/form-data",
    )


def finish(jobs: JobStore, store, tenant: str, job_id: str, files: dict[str, bytes]) -> None:
    """Do what a worker does for a successful job."""
    jobs.start(job_id)
    for name, data in files.items():
        store.put_bytes(artifact_key(tenant, job_id, name), data)
    jobs.succeed(job_id, list(files))


# -- submit, get, list, cancel ----------------------------------------------------------------


def test_submit_records_and_enqueues(
    client, keys, celery: RecordingCelery, jobs, scheduler
) -> None:
    reply = submit(client, keys["acme"])
    assert reply.status_code == 202
    job = reply.get_json()
    for name in ("id", "type", "state", "progress", "error", "artifacts", "created_at"):
        assert name in job
    assert (job["type"], job["state"], job["progress"], job["error"], job["artifacts"]) == (
        "generate",
        "queued",
        0.0,
        None,
        [],
    )
    assert job["params"]["tags"] == "piano,happy" and job["params"]["top_k"] == 50
    assert "tenant" not in job
    assert reply.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["priority"] == "interactive"
    (sent,) = celery.sent  # a wake-up for its queue; the job waits in the fair scheduler
    assert (sent["name"], sent["args"], sent["queue"]) == (TASK_NAME, ["gpu"], "gpu")
    assert scheduler.pending("gpu", "acme") == {"interactive": [job["id"]], "batch": []}
    assert jobs.get(job["id"]).tenant == "acme"
    got = client.get(f"/v1/jobs/{job['id']}", headers=keys["acme"])
    assert got.status_code == 200 and got.get_json() == job


def test_submit_without_content_type_still_parses(client, keys) -> None:
    reply = client.post("/v1/jobs", data=json.dumps(generate_body()), headers=keys["acme"])
    assert reply.status_code == 202


def test_list_newest_first_filtered_and_paginated(client, keys, jobs) -> None:
    ids = [submit(client, keys["acme"]).get_json()["id"] for _ in range(5)]
    submit(client, keys["other"])
    jobs.start(ids[1])
    listed = client.get("/v1/jobs", headers=keys["acme"]).get_json()
    assert [j["id"] for j in listed["jobs"]] == ids[::-1] and listed["next_cursor"] is None
    running = client.get("/v1/jobs?state=running", headers=keys["acme"]).get_json()
    assert [j["id"] for j in running["jobs"]] == [ids[1]]
    assert client.get("/v1/jobs?type=encode", headers=keys["acme"]).get_json()["jobs"] == []
    pages, cursor = [], None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(f"/v1/jobs{query}", headers=keys["acme"]).get_json()
        pages.append([j["id"] for j in page["jobs"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [i for page in pages for i in page] == ids[::-1]
    assert max(len(page) for page in pages) == 2


@pytest.mark.parametrize(
    ("query", "field"),
    [("state=done", "state"), ("type=karaoke", "type"), ("limit=0", "limit"),
     ("limit=x", "limit"), ("limit=201", "limit"), ("cursor=@@", "cursor")],
)  # fmt: skip
def test_list_rejects_bad_queries(client, keys, query: str, field: str) -> None:
    reply = client.get(f"/v1/jobs?{query}", headers=keys["acme"])
    assert reply.status_code == 422
    assert reply.get_json()["error"]["field"] == field


def test_cancel_queued_job(client, keys, jobs, scheduler) -> None:
    job_id = submit(client, keys["acme"]).get_json()["id"]
    reply = client.post(f"/v1/jobs/{job_id}/cancel", headers=keys["acme"])
    assert reply.status_code == 200 and reply.get_json()["state"] == "cancelled"
    assert scheduler.pending("gpu", "acme") == {"interactive": [], "batch": []}
    assert scheduler.next("gpu", "w1", 30, 3).outcome == "empty"
    assert jobs.start(job_id) is None  # a worker that still receives it never runs it
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=keys["acme"])
    assert again.status_code == 200 and again.get_json()["state"] == "cancelled"


def test_cancel_running_job_flags_it(client, keys, celery: RecordingCelery, jobs) -> None:
    job_id = submit(client, keys["acme"]).get_json()["id"]
    jobs.start(job_id)
    reply = client.post(f"/v1/jobs/{job_id}/cancel", headers=keys["acme"]).get_json()
    assert reply["state"] == "running" and reply["cancel_requested"] is True
    assert jobs.cancel_requested(job_id) and celery.revoked == []


def test_cancel_finished_job_is_unchanged(client, keys, jobs, store) -> None:
    job_id = submit(client, keys["acme"]).get_json()["id"]
    finish(jobs, store, "acme", job_id, {"tokens.npy": b"t"})
    reply = client.post(f"/v1/jobs/{job_id}/cancel", headers=keys["acme"]).get_json()
    assert reply["state"] == "succeeded" and reply["artifacts"] == ["tokens.npy"]


# -- tenants and keys -----------------------------------------------------------------------


def test_other_tenants_jobs_are_404(client, keys, jobs, store, celery) -> None:
    job_id = submit(client, keys["acme"]).get_json()["id"]
    finish(jobs, store, "acme", job_id, {"audio.flac": b"song"})
    other = keys["other"]
    for method, path in [
        ("get", f"/v1/jobs/{job_id}"),
        ("post", f"/v1/jobs/{job_id}/cancel"),
        ("get", f"/v1/jobs/{job_id}/artifacts/audio.flac"),
        ("get", f"/v1/jobs/{job_id}/events"),
    ]:
        reply = getattr(client, method)(path, headers=other)
        assert reply.status_code == 404, path
        assert reply.get_json()["error"]["code"] == "not_found"
    assert client.get("/v1/jobs", headers=other).get_json()["jobs"] == []
    assert client.get(f"/v1/jobs/{job_id}", headers=keys["acme"]).get_json()["state"] == (
        "succeeded"
    )
    assert celery.revoked == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "},
     {"Authorization": "Bearer hc_not-a-key"}, {"Authorization": "Bearer nonsense"}],
)  # fmt: skip
def test_bad_keys_are_401(client, celery: RecordingCelery, headers: dict) -> None:
    for reply in (
        submit(client, headers),
        client.get("/v1/jobs", headers=headers),
        upload(client, headers, wav_bytes(), "a.wav"),
    ):
        assert reply.status_code == 401
        assert reply.get_json()["error"]["code"] == "unauthorized"
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert celery.sent == []


def test_keys_are_stored_hashed(redis_client) -> None:
    key = TenantStore(redis_client).create_key("acme")
    dump = b"".join(redis_client.dump(name) or b"" for name in redis_client.scan_iter(match="*"))
    assert key.encode() not in dump
    assert TenantStore(redis_client).tenant_for_key(key) == "acme"


def test_keys_create_cli_prints_the_key_last(redis_url, redis_client, monkeypatch, capsys) -> None:
    from api.client.cli import main

    monkeypatch.setenv("HEARTCLUSTER_REDIS_URL", redis_url)
    assert main(["keys", "create", "--tenant", "acme"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert TenantStore(redis_client).tenant_for_key(key) == "acme"
    assert main(["keys", "create", "--tenant", "Bad Name"]) == 2
    assert "tenant" in capsys.readouterr().err


# -- validation: clear 4xx, nothing enqueued -------------------------------------------------

BAD_SUBMITS = [
    ({"type": "karaoke", "params": {"tags": "a"}}, 422, "type"),
    ({"params": {"tags": "a"}}, 422, "type"),
    ({"type": "generate", "params": {}}, 422, "params.tags"),
    ({"type": "generate"}, 422, "params.tags"),
    (generate_body(duration_s="long"), 422, "params.duration_s"),
    (generate_body(top_k=2.5), 422, "params.top_k"),
    (generate_body(seed="7"), 422, "params.seed"),
    (generate_body(duration_s=0), 422, "params.duration_s"),
    (generate_body(duration_s=10_000), 422, "params.duration_s"),
    (generate_body(temperature=3), 422, "params.temperature"),
    (generate_body(cfg_scale=0), 422, "params.cfg_scale"),
    (generate_body(top_k=100_000), 422, "params.top_k"),
    (generate_body(seed=-1), 422, "params.seed"),
    (generate_body(format="ogg"), 422, "params.format"),
    (generate_body(tags=",".join(f"t{i}" for i in range(33))), 422, "params.tags"),
    (generate_body(lyrics="la " * 40), 422, "params.lyrics"),
    (generate_body(bogus=1), 422, "params.bogus"),
    ({"type": "decode", "params": {}}, 422, "params.tokens_upload_id"),
    ({"type": "decode", "params": {"source_job_id": "nope"}}, 404, "params.source_job_id"),
    ({"type": "decode", "params": {"tokens_upload_id": "nope"}}, 404, "params.tokens_upload_id"),
    ({"type": "encode", "params": {"upload_id": "nope"}}, 404, "params.upload_id"),
    ([1, 2], 400, None),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_SUBMITS)
def test_bad_submits_name_the_field_and_enqueue_nothing(
    client, keys, celery: RecordingCelery, body, status: int, field: str | None
) -> None:
    reply = submit(client, keys["acme"], body)
    assert reply.status_code == status
    error = reply.get_json()["error"]
    assert error["field"] == field and error["message"] and error["code"]
    assert celery.sent == []
    assert client.get("/v1/jobs", headers=keys["acme"]).get_json()["jobs"] == []


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b'{"type": "generate",'])
def test_malformed_json_is_400(client, keys, celery: RecordingCelery, raw: bytes) -> None:
    reply = client.post("/v1/jobs", data=raw, headers=keys["acme"], content_type="application/json")
    assert reply.status_code == 400
    assert reply.get_json()["error"]["code"] == "malformed_json"
    assert celery.sent == []


def test_decode_of_an_unfinished_job_is_refused(client, keys, celery) -> None:
    job_id = submit(client, keys["acme"]).get_json()["id"]
    reply = submit(client, keys["acme"], {"type": "decode", "params": {"source_job_id": job_id}})
    assert reply.status_code == 422
    assert reply.get_json()["error"]["field"] == "params.source_job_id"
    assert len(celery.sent) == 1


def test_decode_of_a_finished_job_names_its_parent(client, keys, jobs, store, celery) -> None:
    job_id = submit(client, keys["acme"]).get_json()["id"]
    finish(jobs, store, "acme", job_id, {"tokens.npy": b"t"})
    body = {"type": "decode", "params": {"source_job_id": job_id, "steps": 4}}
    decode = submit(client, keys["acme"], body)
    assert decode.status_code == 202
    assert decode.get_json()["parent_job_id"] == job_id
    assert [sent["queue"] for sent in celery.sent] == ["gpu", "gpu"]  # the song, its decode
    other = submit(client, keys["other"], body)
    assert other.status_code == 404 and other.get_json()["error"]["field"] == (
        "params.source_job_id"
    )


def break_transactions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every MULTI/EXEC fails as if Redis went away; plain pipelines still work."""
    execute = redis.client.Pipeline.execute

    def transaction_fails(pipe: redis.client.Pipeline, raise_on_error: bool = True) -> list:
        if pipe.transaction:
            raise redis.ConnectionError("Redis went away")
        return execute(pipe, raise_on_error)

    monkeypatch.setattr(redis.client.Pipeline, "execute", transaction_fails)


def test_a_submit_redis_cannot_record_is_503_and_leaves_nothing_behind(
    client, keys, celery, monkeypatch
) -> None:
    """Job, audio reservation, scheduler entry and wake-up are one transaction: a submit whose
    transaction fails leaves none of them (no job sits queued without its wake-up)."""
    break_transactions(monkeypatch)
    reply = submit(client, keys["acme"])
    assert reply.status_code == 503 and reply.get_json()["error"]["code"] == "unavailable"
    monkeypatch.undo()
    assert client.get("/v1/jobs", headers=keys["acme"]).get_json()["jobs"] == []
    usage = client.get("/v1/usage", headers=keys["acme"]).get_json()
    assert usage["queued"]["used"] == usage["audio_seconds_today"]["used"] == 0
    assert celery.sent == []


def test_an_idempotent_submit_redis_cannot_queue_ends_failed_not_waiting(
    client, keys, celery, monkeypatch
) -> None:
    """With a key the job is recorded first (the key names it); when the rest cannot be
    written it fails, so a retry with the key finds it ended instead of queued forever."""
    headers = {**keys["acme"], "Idempotency-Key": "k-outage"}
    break_transactions(monkeypatch)
    assert submit(client, headers).status_code == 503
    monkeypatch.undo()
    again = submit(client, headers)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    job = again.get_json()
    assert job["state"] == "failed" and job["error"]["code"] == "enqueue_failed"
    assert celery.sent == []


def test_real_celery_enqueues_only_valid_jobs(
    settings: Settings, redis_client, store, keys
) -> None:
    app = create_app(settings, redis_client=redis_client, store=store)  # real Celery app
    client = app.test_client()
    for body, _, _ in BAD_SUBMITS:
        assert submit(client, keys["acme"], body).status_code in (400, 404, 422)
    assert submit(client, {}).status_code == 401
    assert all(redis_client.llen(queue) == 0 for queue in QUEUES)
    job_id = submit(client, keys["acme"]).get_json()["id"]
    assert redis_client.llen("gpu") == 1
    message = json.loads(redis_client.lindex("gpu", 0))
    assert message["headers"]["task"] == TASK_NAME
    assert json.loads(base64.b64decode(message["body"]))[0] == ["gpu"]
    assert FairScheduler(redis_client, Quotas()).next("gpu", "w", 30, 3).job.id == job_id


# -- idempotency ------------------------------------------------------------------------------


def test_idempotent_submit_by_header_and_body(client, keys, celery: RecordingCelery) -> None:
    first = submit(client, {**keys["acme"], "Idempotency-Key": "k1"})
    assert first.status_code == 202
    again = submit(client, {**keys["acme"], "Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    via_body = submit(client, keys["acme"], {**generate_body(), "idempotency_key": "k1"})
    assert first.get_json()["id"] == again.get_json()["id"] == via_body.get_json()["id"]
    assert len(celery.sent) == 1
    assert len(client.get("/v1/jobs", headers=keys["acme"]).get_json()["jobs"]) == 1
    # another tenant's identical key is its own
    assert submit(client, {**keys["other"], "Idempotency-Key": "k1"}).status_code == 202
    assert len(celery.sent) == 2


def test_idempotency_key_reuse_with_other_params_is_409(client, keys, celery) -> None:
    submit(client, keys["acme"], {**generate_body(), "idempotency_key": "k2"})
    reply = submit(client, keys["acme"], {**generate_body(seed=8), "idempotency_key": "k2"})
    assert reply.status_code == 409
    assert reply.get_json()["error"]["code"] == "idempotency_conflict"
    assert len(celery.sent) == 1


def test_idempotency_header_and_body_must_agree(client, keys, celery) -> None:
    headers = {**keys["acme"], "Idempotency-Key": "b"}
    reply = submit(client, headers, {**generate_body(), "idempotency_key": "a"})
    assert reply.status_code == 422 and reply.get_json()["error"]["field"] == "idempotency_key"
    assert celery.sent == []


# -- uploads ----------------------------------------------------------------------------------


def test_audio_upload_is_stored_and_usable(client, keys, store, celery, redis_client) -> None:
    reply = upload(client, keys["acme"], wav_bytes(0.5, 8000, 2), "take one.wav")
    assert reply.status_code == 201
    info = reply.get_json()
    assert (info["kind"], info["duration_s"], info["sample_rate"], info["channels"]) == (
        "audio",
        0.5,
        8000,
        2,
    )
    assert info["filename"] == "take_one.wav"
    key = f"tenants/acme/uploads/{info['id']}/take_one.wav"
    assert store.get_bytes(key) == wav_bytes(0.5, 8000, 2)
    encode = submit(client, keys["acme"], {"type": "encode", "params": {"upload_id": info["id"]}})
    assert encode.status_code == 202 and [sent["queue"] for sent in celery.sent] == ["cpu"]
    other = submit(client, keys["other"], {"type": "encode", "params": {"upload_id": info["id"]}})
    assert other.status_code == 404 and other.get_json()["error"]["field"] == "params.upload_id"
    as_tokens = submit(
        client, keys["acme"], {"type": "decode", "params": {"tokens_upload_id": info["id"]}}
    )
    assert as_tokens.status_code == 422
    assert as_tokens.get_json()["error"]["field"] == "params.tokens_upload_id"


def test_tokens_upload_feeds_decode(client, keys, celery) -> None:
    codes = np.random.default_rng(0).integers(0, CODEC_CODES, size=(8, 25), dtype=np.int32)
    reply = upload(client, keys["acme"], npy_bytes(codes), "tokens.npy")
    assert reply.status_code == 201
    info = reply.get_json()
    assert info["kind"] == "tokens" and info["duration_s"] == 2.0
    decode = submit(
        client, keys["acme"], {"type": "decode", "params": {"tokens_upload_id": info["id"]}}
    )
    assert decode.status_code == 202


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        (b"this is not audio at all" * 10, "song.wav"),
        (b"\x00" * 1000, "song.flac"),
        (b"", "empty.wav"),
        (b"RIFF", "truncated.wav"),
        (None, "long.wav"),  # 10 s of audio: over MAX_UPLOAD_SECONDS
        (npy_bytes(np.zeros((7, 10), dtype=np.int32)), "tokens.npy"),
        (npy_bytes(np.zeros((8, 10), dtype=np.float32)), "tokens.npy"),
        (npy_bytes(np.full((8, 10), CODEC_CODES, dtype=np.int32)), "tokens.npy"),
        (b"not numpy", "tokens.npy"),
    ],
)
def test_invalid_uploads_are_422(client, keys, store, data: bytes | None, filename: str) -> None:
    data = wav_bytes(10.0, 8000, 1) if data is None else data
    reply = upload(client, keys["acme"], data, filename)
    assert reply.status_code == 422
    error = reply.get_json()["error"]
    assert error["field"] == "file" and error["code"] in ("invalid_file",)
    assert not (store.root / "tenants").exists()


def test_missing_file_field_is_422(client, keys) -> None:
    reply = client.post(
        "/v1/uploads", data={"other": "x"}, headers=keys["acme"], content_type="multipart/form-data"
    )
    assert reply.status_code == 422 and reply.get_json()["error"]["field"] == "file"


def test_oversized_upload_is_413(client, keys, store) -> None:
    reply = upload(client, keys["acme"], b"\x00" * (MAX_UPLOAD_BYTES + 10), "big.wav")
    assert reply.status_code == 413
    assert reply.get_json()["error"]["code"] == "too_large"
    way_over = upload(client, keys["acme"], b"\x00" * (MAX_UPLOAD_BYTES * 2), "big.wav")
    assert way_over.status_code == 413 and way_over.get_json()["error"]["code"] == "too_large"
    assert not (store.root / "tenants").exists()


# -- artifacts --------------------------------------------------------------------------------


def test_local_artifacts_are_streamed(client, keys, jobs, store) -> None:
    job_id = submit(client, keys["acme"]).get_json()["id"]
    reply = client.get(f"/v1/jobs/{job_id}/artifacts/audio.flac", headers=keys["acme"])
    assert reply.status_code == 404  # not finished: no artifacts yet
    finish(jobs, store, "acme", job_id, {"audio.flac": b"fLaC-bytes", "metadata.json": b"{}"})
    reply = client.get(f"/v1/jobs/{job_id}/artifacts/audio.flac", headers=keys["acme"])
    assert reply.status_code == 200 and reply.data == b"fLaC-bytes"
    assert reply.headers["Content-Type"] == "audio/flac"
    assert "audio.flac" in reply.headers["Content-Disposition"]
    missing = client.get(f"/v1/jobs/{job_id}/artifacts/other.wav", headers=keys["acme"])
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"


def test_s3_artifacts_redirect_to_presigned_urls(
    settings, redis_client, celery, keys, jobs, s3_endpoint
) -> None:
    bucket = f"gw-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    s3 = S3Store(bucket, "cluster", endpoint_url=s3_endpoint)
    client = create_app(settings, redis_client, s3, celery).test_client()
    job_id = submit(client, keys["acme"]).get_json()["id"]
    finish(jobs, s3, "acme", job_id, {"tokens.npy": b"\x93NUMPY-ish"})
    reply = client.get(f"/v1/jobs/{job_id}/artifacts/tokens.npy", headers=keys["acme"])
    assert reply.status_code == 302
    location = reply.headers["Location"]
    assert location.startswith(s3_endpoint) and "X-Amz-Signature" in location
    fetched = requests.get(location, timeout=10)
    assert fetched.status_code == 200 and fetched.content == b"\x93NUMPY-ish"


# -- events -----------------------------------------------------------------------------------


def sse_events(reply) -> list[dict[str, Any]]:
    return list(parse_sse(iter(reply.get_data(as_text=True).split("\n"))))


def test_sse_streams_progress_until_terminal(client, keys, jobs) -> None:
    job_id = submit(client, keys["acme"]).get_json()["id"]
    started = threading.Event()

    def worker() -> None:
        started.wait(10)
        jobs.start(job_id)
        jobs.progress(job_id, 50.0, "generating", frames_done=5, frames_total=10)
        jobs.succeed(job_id, ["audio.flac"])

    thread = threading.Thread(target=worker)
    thread.start()
    reply = client.get(f"/v1/jobs/{job_id}/events", headers=keys["acme"], buffered=False)
    assert reply.status_code == 200 and reply.mimetype == "text/event-stream"
    chunks = reply.response
    first = next(chunks).decode()  # the snapshot is sent before any change is made
    assert first.startswith("event: state\n")
    started.set()
    body = first + b"".join(chunks).decode()
    thread.join()
    events = list(parse_sse(iter(body.split("\n"))))
    assert [(e["event"], e["job"]["state"]) for e in events] == [
        ("state", "queued"),
        ("state", "running"),
        ("progress", "running"),
        ("state", "succeeded"),
    ]
    assert events[2]["job"]["progress"] == 50.0 and events[2]["job"]["frames_done"] == 5
    assert all("tenant" not in e["job"] for e in events)


def test_sse_of_a_finished_job_ends_at_once(client, keys) -> None:
    job_id = submit(client, keys["acme"]).get_json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=keys["acme"])
    reply = client.get(f"/v1/jobs/{job_id}/events", headers=keys["acme"])
    assert [e["job"]["state"] for e in sse_events(reply)] == ["cancelled"]


# -- health, errors, OpenAPI, imports ---------------------------------------------------------


def test_healthz_and_readyz(client, celery: RecordingCelery) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    checks = ready.get_json()["checks"]
    assert checks["redis"]["ok"] and checks["store"]["ok"]
    assert {q: v["consumers"] for q, v in checks["queues"].items()} == {
        "gpu": False,
        "cpu": True,
        "train": False,
    }
    assert client.get("/readyz?queues=cpu").status_code == 200
    assert client.get("/readyz?queues=cpu,gpu").status_code == 503
    bad = client.get("/readyz?queues=tpu")
    assert bad.status_code == 422 and bad.get_json()["error"]["field"] == "queues"


def test_readyz_reports_a_broken_store_and_redis(settings, redis_client, s3_endpoint) -> None:
    broken_store = S3Store("missing-bucket", endpoint_url=s3_endpoint)
    client = create_app(settings, redis_client, broken_store, RecordingCelery()).test_client()
    reply = client.get("/readyz")
    assert reply.status_code == 503
    assert "missing-bucket" in reply.get_json()["checks"]["store"]["error"]
    dead = redis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
    client = create_app(settings, dead, LocalStore(settings.local_root), RecordingCelery())
    reply = client.test_client().get("/readyz")
    assert reply.status_code == 503 and not reply.get_json()["checks"]["redis"]["ok"]


def test_flask_errors_are_json(app, client) -> None:
    def boom():
        raise RuntimeError("secret detail")

    app.add_url_rule("/boom", "boom", boom)
    for reply, status, code in [
        (client.get("/no/such/route"), 404, "not_found"),
        (client.delete("/v1/jobs"), 405, "method_not_allowed"),
        (client.get("/boom"), 500, "internal_error"),
    ]:
        assert reply.status_code == status and reply.is_json
        assert reply.get_json()["error"]["code"] == code
    assert "secret" not in client.get("/boom").get_data(as_text=True)
    assert "POST" in client.delete("/v1/jobs").headers["Allow"]


def test_openapi_document(client, settings: Settings) -> None:
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    for name in ("SubmitRequest", "GenerateParams", "DecodeParams", "EncodeParams", "JobOut",
                 "JobList", "UploadOut", "ErrorBody"):  # fmt: skip
        assert name in schemas
    generate = schemas["GenerateParams"]
    assert generate["required"] == ["tags"]
    assert generate["properties"]["lyrics"]["maxLength"] == settings.max_lyrics_chars
    assert generate["properties"]["duration_s"]["maximum"] == settings.max_duration_s
    assert set(doc["paths"]) >= {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/artifacts/{name}",
        "/v1/uploads",
        "/healthz",
        "/readyz",
    }
    assert doc["paths"]["/v1/jobs"]["post"]["responses"]["202"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for item in node for r in refs(item)]
        return []

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in schemas
    validator = pytest.importorskip("openapi_spec_validator")  # installed with moto[server]
    validator.validate(doc)


def test_gateway_never_imports_torch_or_workers(redis_url: str, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from api.gateway import create_app\n"
        "import api.client.client, api.client.cli\n"
        "app = create_app()\n"
        "app.test_client().get('/openapi.json')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'workers'))\n"
        "assert not bad, bad\n"
    )
    env = {"HEARTCLUSTER_REDIS_URL": redis_url, "HEARTCLUSTER_DATA_DIR": str(tmp_path),
           "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_create_app_from_the_environment(redis_url, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HEARTCLUSTER_REDIS_URL", redis_url)
    monkeypatch.setenv("HEARTCLUSTER_DATA_DIR", str(tmp_path))
    app = create_app()
    services = app.extensions["heartcluster"]
    assert services.settings.redis_url == redis_url
    assert isinstance(services.store, LocalStore) and services.store.root == tmp_path / "artifacts"
    assert services.celery.conf.broker_url == redis_url


# -- extend, inpaint, transcribe ---------------------------------------------------------------

SONG_FRAMES = 100  # 8 s


@pytest.fixture
def song(client, keys, jobs, store) -> str:
    """A finished 8 s song of tenant acme (tokens, audio, its generate params)."""
    body = {"type": "generate", "params": {"tags": "piano,happy", "lyrics": "la la", "seed": 1}}
    job_id = submit(client, keys["acme"], body).get_json()["id"]
    tokens = npy_bytes(np.zeros((8, SONG_FRAMES), dtype=np.int32))
    finish(jobs, store, "acme", job_id, {"tokens.npy": tokens, "audio.flac": b"f"})
    return job_id


def test_extend_inherits_the_parents_prompt(client, keys, celery, song) -> None:
    body = {"type": "extend", "params": {"source_job_id": song, "duration_s": 10.0}}
    reply = submit(client, keys["acme"], body)
    assert reply.status_code == 202
    job = reply.get_json()
    assert job["parent_job_id"] == song
    assert (job["params"]["tags"], job["params"]["lyrics"]) == ("piano,happy", "la la")
    assert [sent["queue"] for sent in celery.sent] == ["gpu", "gpu"]  # the song, its extension
    own = {"source_job_id": song, "tags": "rock", "lyrics": "", "duration_s": 5.0}
    job = submit(client, keys["acme"], {"type": "extend", "params": own}).get_json()
    assert (job["params"]["tags"], job["params"]["lyrics"]) == ("rock", "")


@pytest.mark.parametrize("job_type", ["extend", "inpaint", "transcribe"])
def test_another_tenants_parent_is_404(client, keys, celery, song, job_type: str) -> None:
    params = {"source_job_id": song}
    if job_type == "inpaint":
        params |= {"start_s": 1.0, "end_s": 2.0}
    reply = submit(client, keys["other"], {"type": job_type, "params": params})
    assert reply.status_code == 404
    assert reply.get_json()["error"]["field"] == "params.source_job_id"
    assert len(celery.sent) == 1  # only the song itself


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        (1.0, 9.0, "params.end_s"),
        (3.0, 2.0, "params.end_s"),
        (-1.0, 2.0, "params.start_s"),
        (2.0, 2.1, "params.end_s"),
    ],
)
def test_inpaint_ranges_are_checked_against_the_song(
    client, keys, celery, song, start: float, end: float, field: str
) -> None:
    body = {"type": "inpaint", "params": {"source_job_id": song, "start_s": start, "end_s": end}}
    reply = submit(client, keys["acme"], body)
    assert reply.status_code == 422, reply.get_json()
    assert reply.get_json()["error"]["field"] == field
    assert len(celery.sent) == 1


def test_inpaint_defaults_to_the_reference_repair_sampling(client, keys, celery, song) -> None:
    body = {"type": "inpaint", "params": {"source_job_id": song, "start_s": 1.0, "end_s": 2.5}}
    job = submit(client, keys["acme"], body).get_json()
    params = job["params"]
    assert (params["temperature"], params["top_k"], params["cfg_scale"]) == (0.2, 30, 1.0)
    assert params["tags"] == "piano,happy" and job["parent_job_id"] == song


def test_extend_of_an_upload_runs_an_encode_step_first(client, keys, celery, jobs) -> None:
    upload_id = upload(client, keys["acme"], wav_bytes(), "take.wav").get_json()["id"]
    params = {"upload_id": upload_id, "tags": "rock", "duration_s": 5.0}
    extend = submit(client, keys["acme"], {"type": "extend", "params": params}).get_json()
    encode = jobs.get(extend["parent_job_id"])
    assert encode.type == "encode" and encode.params == {"upload_id": upload_id}
    assert extend["state"] == "queued" and extend["stage"] == "waiting"
    assert [m["queue"] for m in celery.sent] == ["cpu"]  # only the encode step is queued
    assert jobs.take_dependents(encode.id) == [extend["id"]]

    no_tags = submit(client, keys["acme"], {"type": "extend", "params": {"upload_id": upload_id}})
    assert no_tags.status_code == 422 and no_tags.get_json()["error"]["field"] == "params.tags"


def test_cancelling_a_queued_step_cancels_the_job_waiting_for_it(client, keys, jobs) -> None:
    upload_id = upload(client, keys["acme"], wav_bytes(), "take.wav").get_json()["id"]
    params = {"upload_id": upload_id, "tags": "rock", "duration_s": 5.0}
    extend = submit(client, keys["acme"], {"type": "extend", "params": params}).get_json()
    client.post(f"/v1/jobs/{extend['parent_job_id']}/cancel", headers=keys["acme"])
    assert jobs.get(extend["id"]).state == "cancelled"


def test_transcribe_takes_an_upload_or_a_songs_audio(client, keys, celery, song) -> None:
    upload_id = upload(client, keys["acme"], wav_bytes(), "take.wav").get_json()["id"]
    for count, params in enumerate(
        ({"upload_id": upload_id}, {"source_job_id": song, "language": "en"}), start=1
    ):
        reply = submit(client, keys["acme"], {"type": "transcribe", "params": params})
        assert reply.status_code == 202
        assert [sent["queue"] for sent in celery.sent] == ["gpu"] + ["cpu"] * count  # song first
    both = {"upload_id": upload_id, "source_job_id": song}
    reply = submit(client, keys["acme"], {"type": "transcribe", "params": both})
    assert reply.status_code == 422 and reply.get_json()["error"]["field"] == "params.upload_id"


def _nan_wav() -> bytes:
    buffer = io.BytesIO()
    soundfile.write(
        buffer, np.full((4000, 2), np.nan, dtype=np.float32), 8000, format="WAV", subtype="FLOAT"
    )
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [(_nan_wav(), "NaN"), (wav_bytes(0.5)[: len(wav_bytes(0.5)) // 3], "truncated")],
)
def test_uploads_are_decoded_whole_before_they_are_accepted(
    client, keys, data: bytes, message: str
) -> None:
    reply = upload(client, keys["acme"], data, "take.wav")
    assert reply.status_code == 422
    error = reply.get_json()["error"]
    assert error["field"] == "file" and message in error["message"]


def test_extend_past_the_context_is_refused_at_submit(client, keys, celery, jobs, store) -> None:
    job_id = submit(client, keys["acme"]).get_json()["id"]
    long_song = npy_bytes(np.zeros((8, 8000), dtype=np.int32))
    finish(jobs, store, "acme", job_id, {"tokens.npy": long_song, "audio.flac": b"f"})
    body = {"type": "extend", "params": {"source_job_id": job_id, "duration_s": 20.0}}
    reply = submit(client, keys["acme"], body)
    assert reply.status_code == 422
    error = reply.get_json()["error"]
    assert error["field"] == "params.duration_s" and "8000 frames" in error["message"]
    assert len(celery.sent) == 1


def test_inpaint_prompts_obey_the_same_limits(client, keys, celery, song) -> None:
    params = {"source_job_id": song, "start_s": 1.0, "end_s": 2.0, "lyrics": "la " * 40}
    reply = submit(client, keys["acme"], {"type": "inpaint", "params": params})
    assert reply.status_code == 422 and reply.get_json()["error"]["field"] == "params.lyrics"
