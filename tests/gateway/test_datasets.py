"""/v1/datasets and the fine-tune submit against a real redis-server (Celery recorded):
item states from their jobs, encode jobs on the cpu queue, limits and errors naming
items[i].field, tenant isolation, and adapter_id on song jobs."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis

from api.gateway import create_app
from shared.core.config import Settings
from shared.core.jobs import Job, JobStore
from shared.core.quotas import Quotas
from shared.core.scheduler import FairScheduler
from shared.core.storage import LocalStore, artifact_key
from shared.core.tenants import TenantStore
from tests.gateway.test_gateway import wav_bytes
from tests.support.fakes import RecordingCelery


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings.from_env(
        {
            "HEARTCLUSTER_REDIS_URL": redis_url,
            "HEARTCLUSTER_DATA_DIR": str(tmp_path),
            "HEARTCLUSTER_MAX_DATASET_ITEMS": "3",
            "HEARTCLUSTER_MAX_DATASET_ITEM_SECONDS": "20",
            "HEARTCLUSTER_MAX_DATASET_SECONDS": "25",
        }
    )


@pytest.fixture
def celery(redis_client: redis.Redis) -> RecordingCelery:
    return RecordingCelery(broker=redis_client)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "artifacts")


@pytest.fixture
def client(settings: Settings, redis_client, store: LocalStore, celery: RecordingCelery):
    return create_app(
        settings, redis_client=redis_client, store=store, celery_app=celery
    ).test_client()


@pytest.fixture
def keys(redis_client) -> dict[str, dict[str, str]]:
    tenants = TenantStore(redis_client)
    return {n: {"Authorization": f"Bearer {tenants.create_key(n)}"} for n in ("acme", "other")}


@pytest.fixture
def jobs(redis_client) -> JobStore:
    return JobStore(redis_client)


def _song_job(jobs: JobStore, store: LocalStore, tenant: str, frames: int, **fields) -> Job:
    """A succeeded job holding tokens.npy of `frames` frames."""
    params = fields.pop("params", {"tags": "pop"})
    job = jobs.create(Job.new(tenant, fields.pop("type", "generate"), params))
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((8, frames), dtype=np.int32))
    store.put_bytes(artifact_key(tenant, job.id, "tokens.npy"), buffer.getvalue())
    jobs.start(job.id)
    return jobs.succeed(job.id, fields.pop("artifacts", ["tokens.npy", "metadata.json"]))


def _upload(client, key: dict[str, str], data: bytes, name: str) -> str:
    reply = client.post(
        "/v1/uploads",
        headers=key,
        data={"file": (io.BytesIO(data), name)},
        content_type="multipart/form-data",
    )
    assert reply.status_code == 201, reply.json
    return reply.json["id"]


def _tokens_npy(frames: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ones((8, frames), dtype=np.int32))
    return buffer.getvalue()


def test_a_dataset_of_songs_and_uploads_shows_each_items_state_and_totals(
    client, keys, jobs, store, celery
) -> None:
    song = _song_job(jobs, store, "acme", frames=125)
    audio = _upload(client, keys["acme"], wav_bytes(seconds=2.0), "a.wav")
    tokens = _upload(client, keys["acme"], _tokens_npy(50), "t.npy")
    body = {
        "name": "samba set",
        "items": [
            {"source_job_id": song.id, "tags": "samba"},
            {"upload_id": audio, "tags": "samba,guitar", "lyrics": "la la"},
            {"upload_id": tokens, "tags": "samba"},
        ],
    }
    reply = client.post("/v1/datasets", headers=keys["acme"], json=body)
    assert reply.status_code == 201, reply.json
    created = reply.json
    states = [item["state"] for item in created["items"]]
    assert states == ["ready", "encoding", "ready"]
    encode_id = created["items"][1]["encode_job_id"]
    # the encode job waits in the fair scheduler; its queue gets one wake-up
    assert [(sent["args"], sent["queue"]) for sent in celery.sent] == [(["cpu"], "cpu")]
    pending = FairScheduler(jobs.redis, Quotas()).pending("cpu", "acme")
    assert pending == {"interactive": [encode_id], "batch": []}
    assert jobs.get(encode_id).params == {"upload_id": audio}
    totals = created["totals"]
    assert totals["items"] == 3 and totals["ready"] == 2 and totals["encoding"] == 1
    assert totals["frames"] == 125 + 26 + 50
    assert totals["seconds"] == pytest.approx(201 / 12.5)

    jobs.start(encode_id)
    jobs.fail(encode_id, "invalid_params", "upload_id: not audio")
    shown = client.get(f"/v1/datasets/{created['id']}", headers=keys["acme"]).json
    assert shown["items"][1]["state"] == "failed"
    assert shown["items"][1]["reason"] == "upload_id: not audio"

    listed = client.get("/v1/datasets", headers=keys["acme"]).json
    assert [d["id"] for d in listed["datasets"]] == [created["id"]]
    assert listed["datasets"][0]["items"] == 3
    assert client.get("/v1/datasets", headers=keys["other"]).json["datasets"] == []
    assert client.get(f"/v1/datasets/{created['id']}", headers=keys["other"]).status_code == 404
    assert client.delete(f"/v1/datasets/{created['id']}", headers=keys["other"]).status_code == 404
    assert client.delete(f"/v1/datasets/{created['id']}", headers=keys["acme"]).status_code == 204
    assert client.get(f"/v1/datasets/{created['id']}", headers=keys["acme"]).status_code == 404


@pytest.mark.parametrize(
    ("item", "status", "field"),
    [
        ({"tags": "samba"}, 422, "items[1].source_job_id"),
        ({"tags": "", "source_job_id": "x"}, 422, "items[1].tags"),
        ({"tags": "samba", "source_job_id": "x", "colour": "red"}, 422, "items[1].colour"),
        ({"tags": "samba", "source_job_id": "nope"}, 404, "items[1].source_job_id"),
        ({"tags": "samba", "upload_id": "nope"}, 404, "items[1].upload_id"),
    ],
)
def test_a_bad_item_is_refused_naming_it(client, keys, jobs, store, item, status, field) -> None:
    song = _song_job(jobs, store, "acme", frames=10)
    body = {"name": "d", "items": [{"source_job_id": song.id, "tags": "pop"}, item]}
    reply = client.post("/v1/datasets", headers=keys["acme"], json=body)
    assert reply.status_code == status, reply.json
    assert reply.json["error"]["field"] == field


def test_another_tenants_song_or_upload_is_not_found(client, keys, jobs, store) -> None:
    theirs = _song_job(jobs, store, "other", frames=10)
    upload = _upload(client, keys["other"], _tokens_npy(10), "t.npy")
    for item in ({"source_job_id": theirs.id}, {"upload_id": upload}):
        reply = client.post(
            "/v1/datasets",
            headers=keys["acme"],
            json={"name": "d", "items": [{**item, "tags": "x"}]},
        )
        assert reply.status_code == 404
        assert reply.json["error"]["field"] == f"items[0].{next(iter(item))}"


def test_dataset_limits_items_seconds_per_item_and_in_all(client, keys, jobs, store) -> None:
    short = _song_job(jobs, store, "acme", frames=125)  # 10 s
    long = _song_job(jobs, store, "acme", frames=300)  # 24 s > 20 s per item
    item = {"source_job_id": short.id, "tags": "pop"}
    too_many = client.post(
        "/v1/datasets", headers=keys["acme"], json={"name": "d", "items": [item] * 4}
    )
    assert too_many.status_code == 422 and too_many.json["error"]["field"] == "items"
    too_long = client.post(
        "/v1/datasets",
        headers=keys["acme"],
        json={"name": "d", "items": [item, {"source_job_id": long.id, "tags": "pop"}]},
    )
    assert too_long.status_code == 422
    assert too_long.json["error"]["field"] == "items[1].source_job_id"
    assert "at most 20 s" in too_long.json["error"]["message"]
    over_total = client.post(
        "/v1/datasets", headers=keys["acme"], json={"name": "d", "items": [item] * 3}
    )
    assert over_total.status_code == 422
    assert over_total.json["error"]["field"] == "items[2].source_job_id"


def test_a_finetune_goes_to_the_train_queue_once_its_dataset_is_ready(
    client, keys, jobs, store, celery
) -> None:
    song = _song_job(jobs, store, "acme", frames=20)
    audio = _upload(client, keys["acme"], wav_bytes(seconds=1.0), "a.wav")
    items = [{"source_job_id": song.id, "tags": "samba"}, {"upload_id": audio, "tags": "samba"}]
    dataset = client.post(
        "/v1/datasets", headers=keys["acme"], json={"name": "d", "items": items}
    ).json
    submit = {"type": "finetune", "params": {"dataset_id": dataset["id"], "steps": 10}}

    waiting = client.post("/v1/jobs", headers=keys["acme"], json=submit)
    assert waiting.status_code == 422
    assert waiting.json["error"]["field"] == "params.dataset_id"
    assert "still encoding" in waiting.json["error"]["message"]
    encode_id = dataset["items"][1]["encode_job_id"]
    jobs.start(encode_id)
    jobs.fail(encode_id, "invalid_params", "bad audio")  # failed items are left out

    accepted = client.post("/v1/jobs", headers=keys["acme"], json=submit)
    assert accepted.status_code == 202, accepted.json
    assert [sent["queue"] for sent in celery.sent].count("train") == 1
    assert accepted.json["params"]["rank"] == 16 and accepted.json["params"]["alpha"] == 32

    other = client.post("/v1/jobs", headers=keys["other"], json=submit)
    assert other.status_code == 404 and other.json["error"]["field"] == "params.dataset_id"
    bad = client.post(
        "/v1/jobs",
        headers=keys["acme"],
        json={"type": "finetune", "params": {"dataset_id": dataset["id"], "targets": ["lm_head"]}},
    )
    assert bad.status_code == 422 and bad.json["error"]["field"] == "params.targets"


def test_adapter_id_must_be_a_succeeded_finetune_of_the_same_tenant(
    client, keys, jobs, store
) -> None:
    adapter = _song_job(
        jobs,
        store,
        "acme",
        frames=1,
        type="finetune",
        artifacts=["adapter_config.json", "adapter_model.safetensors", "metadata.json"],
    )
    song = _song_job(jobs, store, "acme", frames=1)
    generate = {"type": "generate", "params": {"tags": "samba", "duration_s": 2}}
    ok = client.post(
        "/v1/jobs",
        headers=keys["acme"],
        json={**generate, "params": {**generate["params"], "adapter_id": adapter.id}},
    )
    assert ok.status_code == 202, ok.json
    assert ok.json["parent_job_id"] is None  # an adapter is not a parent song
    theirs = client.post(
        "/v1/jobs",
        headers=keys["other"],
        json={**generate, "params": {**generate["params"], "adapter_id": adapter.id}},
    )
    assert theirs.status_code == 404 and theirs.json["error"]["field"] == "params.adapter_id"
    not_adapter = client.post(
        "/v1/jobs",
        headers=keys["acme"],
        json={**generate, "params": {**generate["params"], "adapter_id": song.id}},
    )
    assert not_adapter.status_code == 422
    assert not_adapter.json["error"]["field"] == "params.adapter_id"
    extend = client.post(
        "/v1/jobs",
        headers=keys["other"],
        json={"type": "extend", "params": {"source_job_id": song.id, "adapter_id": adapter.id}},
    )
    assert extend.status_code == 404


def test_an_adapter_the_gpu_workers_cannot_serve_is_refused_at_submit(
    client, keys, jobs, store, settings, redis_client, celery
) -> None:
    """Rank over HEARTCLUSTER_ADAPTER_MAX_RANK, or a target outside ADAPTER_TARGETS: 422 naming
    params.adapter_id; a servable one is accepted and the job shows its adapter_id."""

    def finetune(rank: int, targets: list[str]) -> Job:
        return _song_job(
            jobs,
            store,
            "acme",
            frames=1,
            type="finetune",
            params={"dataset_id": "d", "rank": rank, "targets": targets},
            artifacts=["adapter_config.json", "adapter_model.safetensors", "metadata.json"],
        )

    def submit(test_client, adapter: Job, job_type: str = "generate", **params: object):
        body = {"tags": "samba", "duration_s": 2, "adapter_id": adapter.id, **params}
        return test_client.post(
            "/v1/jobs", headers=keys["acme"], json={"type": job_type, "params": body}
        )

    too_big = finetune(settings.adapter_max_rank + 1, ["q_proj"])
    refused = submit(client, too_big)
    assert refused.status_code == 422 and refused.json["error"]["field"] == "params.adapter_id"
    assert f"rank {settings.adapter_max_rank + 1}" in refused.json["error"]["message"]
    song = _song_job(jobs, store, "acme", frames=50)
    extend = submit(client, too_big, "extend", source_job_id=song.id)
    assert extend.status_code == 422 and extend.json["error"]["field"] == "params.adapter_id"

    servable = finetune(settings.adapter_max_rank, ["q_proj", "decoder.w1"])
    ok = submit(client, servable)
    assert ok.status_code == 202, ok.json
    shown = client.get(f"/v1/jobs/{ok.json['id']}", headers=keys["acme"])
    assert shown.json["params"]["adapter_id"] == servable.id

    attention_only = replace(settings, adapter_targets=("q_proj", "k_proj", "v_proj"))
    narrow = create_app(
        attention_only, redis_client=redis_client, store=store, celery_app=celery
    ).test_client()
    unserved = submit(narrow, servable)
    assert unserved.status_code == 422 and unserved.json["error"]["field"] == "params.adapter_id"
    assert "decoder.w1" in unserved.json["error"]["message"]
    assert submit(narrow, finetune(4, ["backbone.q_proj", "v_proj"])).status_code == 202
    no_slots = create_app(
        replace(settings, adapter_slots=0),
        redis_client=redis_client,
        store=store,
        celery_app=celery,
    ).test_client()
    assert submit(no_slots, servable).json["error"]["field"] == "params.adapter_id"
