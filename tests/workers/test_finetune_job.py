"""The finetune job through the real runner and tiny models on CPU: its artifacts, a worker
killed with SIGKILL mid-training whose redelivered job resumes from the last checkpoint and
ends with the same adapter as an uninterrupted run, cancel, and a song job with the adapter."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from safetensors.torch import load as load_safetensors

from shared.core.config import Settings
from shared.core.datasets import DatasetItem, DatasetStore, new_dataset
from shared.core.jobs import LEASES_KEY, Job, JobStore, Upload, UploadStore, job_key, new_id
from shared.core.quotas import Quotas
from shared.core.scheduler import FairScheduler
from shared.core.storage import LocalStore, ObjectStore, artifact_key, job_prefix, upload_key
from tests.ml.finetune_support import TAG, pattern_song
from workers.handlers import CHECKPOINT
from workers.models import WorkerModels
from workers.runner import JobRunner

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {
    "steps": 12,
    "checkpoint_every": 4,
    "batch_size": 2,
    "grad_accumulation": 2,
    "dropout": 0.1,
    "learning_rate": 1e-3,
    "warmup_steps": 2,
    "validation_fraction": 0.25,
    "rank": 4,
    "alpha": 8,
    "seed": 5,
}


@pytest.fixture
def env(redis_url: str, tmp_path: Path, tiny_model_dir: Path) -> dict[str, str]:
    return {
        "HEARTCLUSTER_REDIS_URL": redis_url,
        "HEARTCLUSTER_DATA_DIR": str(tmp_path),
        "HEARTCLUSTER_STORAGE_URL": (tmp_path / "artifacts").as_uri(),
        "HEARTCLUSTER_MODEL_DIR": str(tiny_model_dir),
        "HEARTCLUSTER_DEVICE": "cpu",
        "HEARTCLUSTER_LEASE_S": "30",
        "HEARTCLUSTER_HEARTBEAT_S": "1",
    }


@pytest.fixture
def runner(env: dict[str, str], redis_client: redis.Redis) -> Iterator[JobRunner]:
    settings = Settings.from_env(env)
    runner = _runner(
        settings, redis_client, LocalStore(settings.data_dir / "artifacts"), "survivor"
    )
    yield runner
    runner.close()


def _runner(
    settings: Settings, redis_client: redis.Redis, objects: ObjectStore, worker: str
) -> JobRunner:
    """A job runner in this process, as a train or GPU worker holds one."""
    return JobRunner(
        settings,
        JobStore(redis_client),
        objects,
        WorkerModels(settings),
        UploadStore(redis_client),
        enqueue=lambda job: None,
        scheduler=FairScheduler(redis_client, Quotas()),
        wake=lambda queue: None,
        worker=worker,
    )


def _dataset(runner: JobRunner, tenant: str = "acme") -> str:
    """Eight tokens uploads of the pattern song under the new tag."""
    items = []
    for i in range(8):
        buffer = io.BytesIO()
        np.save(buffer, pattern_song(frames=16, phase=i))
        upload_id = new_id()
        key = upload_key(tenant, upload_id, "song.npy")
        runner.objects.put_bytes(key, buffer.getvalue())
        runner.uploads.create(
            Upload(upload_id, tenant, key, "song.npy", "tokens", len(buffer.getvalue()), 1.28)
        )
        items.append(DatasetItem(TAG, "", upload_id=upload_id, frames=16))
    dataset = new_dataset(tenant, "samba", items)
    DatasetStore(runner.jobs.redis).create(dataset)
    return dataset.id


def _finetune(runner: JobRunner, dataset_id: str) -> Job:
    return runner.jobs.create(Job.new("acme", "finetune", {"dataset_id": dataset_id, **PARAMS}))


def _artifact(runner: JobRunner, job: Job, name: str) -> bytes:
    return runner.objects.get_bytes(artifact_key(job.tenant, job.id, name))


def test_a_killed_worker_s_fine_tune_resumes_and_ends_with_the_same_adapter(
    runner: JobRunner, env: dict[str, str]
) -> None:
    dataset_id = _dataset(runner)
    uninterrupted = _finetune(runner, dataset_id)
    runner.run(uninterrupted.id)
    done = runner.jobs.get(uninterrupted.id)
    assert done.state == "succeeded", done.error
    assert sorted(done.artifacts) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "metadata.json"]
    )
    metadata = json.loads(_artifact(runner, done, "metadata.json"))
    assert metadata["resumed_from_step"] == 0 and metadata["dataset"]["songs"] == 8
    assert metadata["examples"] == {"train": 6, "validation": 2}
    assert metadata["final"]["val_loss"] < metadata["base_val_loss"]
    lines = _artifact(runner, done, "metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(13))

    job = _finetune(runner, dataset_id)
    checkpoint = artifact_key(job.tenant, job.id, CHECKPOINT)
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.support.finetune_worker", job.id],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 120
        while (
            not runner.objects.exists(checkpoint) or (runner.jobs.get(job.id).frames_done or 0) < 5
        ):
            assert worker.poll() is None, "the worker ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait()
    assert runner.jobs.get(job.id).state == "running"

    runner.jobs.redis.hset(job_key(job.id), "lease_expires_at", "0")  # its lease ran out
    runner.jobs.redis.zadd(LEASES_KEY, {job.id: 0})
    assert [outcome for outcome, _ in runner.jobs.reap(max_attempts=3)] == ["requeued"]
    runner.run(job.id)  # the redelivery
    resumed = runner.jobs.get(job.id)
    assert resumed.state == "succeeded", resumed.error
    metadata = json.loads(_artifact(runner, resumed, "metadata.json"))
    assert metadata["resumed_from_step"] in (4, 8)
    got = load_safetensors(_artifact(runner, resumed, "adapter_model.safetensors"))
    expected = load_safetensors(_artifact(runner, done, "adapter_model.safetensors"))
    assert got.keys() == expected.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5)
    lines = _artifact(runner, resumed, "metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(13))


def test_a_cancelled_fine_tune_stops_and_keeps_nothing(runner: JobRunner) -> None:
    job = runner.jobs.create(
        Job.new(
            "acme",
            "finetune",
            {"dataset_id": _dataset(runner), **PARAMS, "steps": 10_000, "checkpoint_every": 2},
        )
    )
    thread = threading.Thread(target=runner.run, args=(job.id,))
    thread.start()
    deadline = time.monotonic() + 120
    while (runner.jobs.get(job.id).frames_done or 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    runner.jobs.cancel(job.id)
    thread.join(timeout=60)
    assert not thread.is_alive()
    cancelled = runner.jobs.get(job.id)
    assert cancelled.state == "cancelled"
    assert cancelled.frames_done is not None and 3 <= cancelled.frames_done < 10_000
    assert "loss" in cancelled.message and "eta" in cancelled.message
    job_dir = Path(runner.settings.data_dir) / "artifacts" / job_prefix(job.tenant, job.id)
    assert not [path for path in job_dir.rglob("*") if path.is_file()]


def test_song_jobs_with_the_adapter_run_or_fail_clearly_where_it_cannot_be_served(
    runner: JobRunner, env: dict[str, str], redis_client: redis.Redis
) -> None:
    dataset_id = _dataset(runner)
    adapter = _finetune(runner, dataset_id)
    runner.run(adapter.id)

    def song(on: JobRunner) -> Job:
        params = {"tags": TAG, "duration_s": 0.8, "seed": 1, "adapter_id": adapter.id}
        job = on.jobs.create(Job.new("acme", "generate", params))
        on.run(job.id)
        return on.jobs.get(job.id)

    # trained on another base model version: the worker refuses to read it
    key = artifact_key(adapter.tenant, adapter.id, "metadata.json")
    recorded = runner.objects.get_bytes(key)
    runner.objects.put_bytes(
        key, json.dumps({**json.loads(recorded), "model_version": "7B"}).encode()
    )
    other_base = song(runner)
    assert other_base.state == "failed" and other_base.error is not None
    assert "adapter_id" in other_base.error["message"]
    assert "HeartMuLa-oss-7B" in other_base.error["message"]
    runner.objects.put_bytes(key, recorded)

    finished = song(runner)
    assert finished.state == "succeeded", finished.error
    metadata = json.loads(_artifact(runner, finished, "metadata.json"))
    assert metadata["adapter_id"] == adapter.id

    # a worker serving lower ranks than the adapter's (PARAMS rank 4) fails the job, naming it
    settings = Settings.from_env({**env, "HEARTCLUSTER_ADAPTER_MAX_RANK": "2"})
    small = _runner(settings, redis_client, runner.objects, "small")
    try:
        refused = song(small)
    finally:
        small.close()
    assert refused.state == "failed" and refused.error is not None
    assert "adapter_id" in refused.error["message"] and "rank 4" in refused.error["message"]
