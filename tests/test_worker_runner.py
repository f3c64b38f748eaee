"""The worker's job lifecycle in-process (no Celery): attempt cap, cancelled jobs, refused
requests, redelivery after a lost worker, artifacts only on success."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from shared.config import Settings
from shared.jobs import Job, JobStore, UploadStore
from shared.storage import LocalStore, artifact_key
from workers.models import WorkerModels
from workers.runner import JobRunner, job_seed

SHORT = {"tags": "piano,happy", "duration_s": 1.0, "cfg_scale": 1.0}


@pytest.fixture(scope="module")
def runner(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobRunner]:
    from shared.models.tiny import write_tiny_models

    model_dir = tmp_path_factory.mktemp("tiny-models")
    write_tiny_models(model_dir)
    root = tmp_path_factory.mktemp("runner")
    settings = Settings.from_env(
        {
            "HEARTCLUSTER_REDIS_URL": f"{redis_url.rsplit('/', 1)[0]}/3",
            "HEARTCLUSTER_MODEL_DIR": str(model_dir),
            "HEARTCLUSTER_DATA_DIR": str(root),
            "HEARTCLUSTER_DEVICE": "cpu",
            "HEARTCLUSTER_ENGINE_MAX_ROWS": "2",
        }
    )
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    models = WorkerModels(settings)
    runner = JobRunner(
        settings, JobStore(client), LocalStore(root / "artifacts"), models, UploadStore(client)
    )
    yield runner
    models.close()
    client.close()


def _new(runner: JobRunner, type: str, params: dict, **fields) -> Job:
    job = dataclasses.replace(Job.new("acme", type, params), **fields)
    return runner.jobs.create(job)


def _stored(runner: JobRunner, job: Job) -> list[str]:
    names = ("tokens.npy", "audio.flac", "metadata.json")
    return [n for n in names if runner.objects.exists(artifact_key(job.tenant, job.id, n))]


def test_job_past_the_attempt_cap_fails_without_running(runner: JobRunner) -> None:
    job = _new(runner, "generate", SHORT, attempts=runner.settings.max_attempts)
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "failed" and final.error["code"] == "too_many_attempts"
    assert final.attempts == runner.settings.max_attempts and final.started_at is None
    assert _stored(runner, job) == []


def test_cancelled_job_is_skipped(runner: JobRunner) -> None:
    job = _new(runner, "generate", SHORT)
    runner.jobs.cancel(job.id)
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "cancelled" and final.attempts == 0 and final.started_at is None


def test_request_over_the_model_context_fails_naming_the_field(runner: JobRunner) -> None:
    params = {"tags": "piano", "lyrics": "la la la " * 600, "duration_s": 600.0}
    job = _new(runner, "generate", params)
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "failed" and final.error["code"] == "invalid_params"
    assert final.error["message"].startswith("duration_s:")
    assert _stored(runner, job) == []


def test_redelivered_job_reruns_with_a_stable_seed(runner: JobRunner) -> None:
    # An id whose derived seed (7) runs all 12 frames on the tiny model without audio EOS.
    job = _new(runner, "generate", SHORT, id="00000007" + Job.new("x", "x", {}).id[8:])
    runner.jobs.start(job.id)  # a worker took it, then died before finishing
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "succeeded" and final.attempts == 2
    assert sorted(final.artifacts) == ["audio.flac", "metadata.json", "tokens.npy"]
    key = artifact_key(job.tenant, job.id, "metadata.json")
    metadata = json.loads(runner.objects.get_bytes(key))
    assert metadata["seed"] == job_seed(job, None) == 7
    tokens = np.load(
        io.BytesIO(runner.objects.get_bytes(artifact_key("acme", job.id, "tokens.npy")))
    )
    assert tokens.shape == (8, 12)


def test_decode_of_a_missing_source_fails_naming_it(runner: JobRunner) -> None:
    job = _new(runner, "decode", {"source_job_id": "0" * 32})
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "failed" and final.error["code"] == "invalid_params"
    assert final.error["message"].startswith("source_job_id:")


def test_encode_tokenizes_an_uploaded_song(runner: JobRunner, tmp_path: Path) -> None:
    from shared.audio import encode_audio
    from shared.jobs import Upload

    rng = np.random.default_rng(0)
    audio = encode_audio(rng.uniform(-0.1, 0.1, (2, 48_000)).astype(np.float32), "wav")
    key = "tenants/acme/uploads/u1/song.wav"
    runner.objects.put_bytes(key, audio)
    upload = Upload("u1", "acme", key, "song.wav", "audio", len(audio), 1.0, 48_000, 2)
    runner.uploads.create(upload)
    job = _new(runner, "encode", {"upload_id": "u1"})
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "succeeded", final.error
    tokens = np.load(
        io.BytesIO(runner.objects.get_bytes(artifact_key("acme", job.id, "tokens.npy")))
    )
    assert tokens.shape == (8, 13)  # int(1.0 s * 12.5) + 1 frames
