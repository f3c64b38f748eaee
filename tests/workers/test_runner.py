"""The worker's job lifecycle in-process (no Celery): attempt cap, cancelled jobs, refused
requests, redelivery after a lost worker, artifacts only on success."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from shared.core.config import Settings
from shared.core.constants import (
    AUDIO_EOS_ID,
    CONTEXT_POSITIONS,
    FRAME_S,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
)
from shared.core.jobs import Job, JobStore, UploadStore
from shared.core.prompt_text import prompt_counter
from shared.core.quotas import Quotas
from shared.core.scheduler import FairScheduler
from shared.core.storage import LocalStore, artifact_key
from workers.handlers import job_seed
from workers.models import WorkerModels
from workers.runner import CANCEL_POLL_S, JobRunner

SHORT = {"tags": "piano,happy", "duration_s": 1.0, "cfg_scale": 1.0}
ENQUEUED: list[Job] = []  # jobs the runner released (dependents of finished jobs)


@pytest.fixture(scope="module")
def runner(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JobRunner]:
    root = tmp_path_factory.mktemp("runner")
    settings = Settings.from_env(
        {
            "HEARTCLUSTER_REDIS_URL": f"{redis_url.rsplit('/', 1)[0]}/3",
            "HEARTCLUSTER_MODEL_DIR": str(tiny_model_dir),
            "HEARTCLUSTER_DATA_DIR": str(root),
            "HEARTCLUSTER_DEVICE": "cpu",
            "HEARTCLUSTER_ENGINE_MAX_ROWS": "2",
        }
    )
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    models = WorkerModels(settings)
    runner = JobRunner(
        settings,
        JobStore(client),
        LocalStore(root / "artifacts"),
        models,
        UploadStore(client),
        enqueue=ENQUEUED.append,
        scheduler=FairScheduler(client, Quotas()),
        wake=lambda queue: None,
    )
    yield runner
    runner.close()  # its heartbeat thread, started by the first job, would outlive the module
    models.close()
    client.close()


def test_the_engine_settings_reach_the_engine(tiny_model_dir: Path, tmp_path: Path) -> None:
    """HEARTCLUSTER_ENGINE_CUDA_GRAPHS gets to the engine, which refuses it on the CPU."""
    settings = Settings.from_env(
        {
            "HEARTCLUSTER_MODEL_DIR": str(tiny_model_dir),
            "HEARTCLUSTER_DATA_DIR": str(tmp_path),
            "HEARTCLUSTER_DEVICE": "cpu",
            "HEARTCLUSTER_ENGINE_CUDA_GRAPHS": "1",
        }
    )
    with pytest.raises(ValueError, match="cuda_graphs: needs a CUDA device"):
        WorkerModels(settings).engine()


def _new(runner: JobRunner, type: str, params: dict, **fields) -> Job:
    job = dataclasses.replace(Job.new("acme", type, params), **fields)
    return runner.jobs.create(job)


def _stored(runner: JobRunner, job: Job) -> list[str]:
    names = ("tokens.npy", "audio.flac", "preview.png", "metadata.json")
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
    assert sorted(final.artifacts) == ["audio.flac", "metadata.json", "preview.png", "tokens.npy"]
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


def _batch_counts() -> tuple[float, float]:
    """(batches, songs in them) the worker's codec batcher has solved so far."""
    count = REGISTRY.get_sample_value("heartcluster_codec_batch_songs_count") or 0.0
    return count, REGISTRY.get_sample_value("heartcluster_codec_batch_songs_sum") or 0.0


def test_concurrent_decode_jobs_share_codec_batches_and_one_cancels_alone(
    runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two decode jobs of a 3-window song: their first windows solve in one batch; the first
    job is then cancelled, and the second goes on to the audio it has decoded alone. Each
    round of the batcher's loop waits for the test's go, so the rounds are known exactly."""
    from shared.core.audio import read_audio
    from shared.core.jobs import Upload

    codes = np.random.default_rng(4).integers(0, 8192, (8, 700)).astype(np.int32)
    data = io.BytesIO()
    np.save(data, codes)
    key = "tenants/acme/uploads/t-700/codes.npy"
    runner.objects.put_bytes(key, data.getvalue())
    runner.uploads.create(Upload("t-700", "acme", key, "codes.npy", "tokens", 1, 56.0))
    batcher = runner.models.codec_batcher()
    go = threading.Semaphore(0)
    step = batcher.step

    def gated_step() -> None:
        go.acquire()
        step()

    monkeypatch.setattr(batcher, "step", gated_step)
    before = _batch_counts()
    params = {"tokens_upload_id": "t-700", "seed": 9, "steps": 2}
    doomed, kept = _new(runner, "decode", params), _new(runner, "decode", params)
    threads = [threading.Thread(target=runner.run, args=(job.id,)) for job in (doomed, kept)]
    for thread in threads:
        thread.start()
    while batcher.songs_decoding < 2:
        time.sleep(0.01)
    go.release()  # round 1: both first windows
    while runner.jobs.get(kept.id).progress == 0.0:
        time.sleep(0.01)
    runner.jobs.cancel(doomed.id)
    time.sleep(3 * CANCEL_POLL_S)  # the doomed job's next abort check asks Redis
    go.release(8)  # round 2 drops the cancelled song; rounds 2 and 3 decode the other
    for thread in threads:
        thread.join()
    assert runner.jobs.get(doomed.id).state == "cancelled"
    assert runner.jobs.get(kept.id).state == "succeeded", runner.jobs.get(kept.id).error
    batches, songs = _batch_counts()
    assert (batches - before[0], songs - before[1]) == (3, 4)  # sizes 2, 1, 1
    alone = runner.models.codec_batcher().decoder.detokenize(codes, steps=2, seed=9).numpy()
    audio, _ = read_audio(_artifact(runner, kept, "audio.flac"))
    # The file holds 24-bit samples in [-1, 1] (the tiny codec's noise goes past full scale).
    np.testing.assert_allclose(audio, np.clip(alone, -1, 1), atol=1e-5 + 2.0**-22, rtol=0)


def test_encode_tokenizes_an_uploaded_song(runner: JobRunner, tmp_path: Path) -> None:
    from shared.core.audio import encode_audio
    from shared.core.jobs import Upload

    rng = np.random.default_rng(0)
    audio = encode_audio(rng.uniform(-0.1, 0.1, (2, SAMPLE_RATE)).astype(np.float32), "wav")
    key = "tenants/acme/uploads/u1/song.wav"
    runner.objects.put_bytes(key, audio)
    upload = Upload("u1", "acme", key, "song.wav", "audio", len(audio), 1.0, SAMPLE_RATE, 2)
    runner.uploads.create(upload)
    job = _new(runner, "encode", {"upload_id": "u1"})
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "succeeded", final.error
    tokens = np.load(
        io.BytesIO(runner.objects.get_bytes(artifact_key("acme", job.id, "tokens.npy")))
    )
    assert tokens.shape == (8, 13)  # int(1.0 s * 12.5) + 1 frames


def _artifact(runner: JobRunner, job: Job, name: str) -> bytes:
    return runner.objects.get_bytes(artifact_key(job.tenant, job.id, name))


def _tokens(runner: JobRunner, job: Job) -> np.ndarray:
    return np.load(io.BytesIO(_artifact(runner, job, "tokens.npy")))


def _finished(runner: JobRunner, job_type: str, params: dict, **fields) -> Job:
    job = _new(runner, job_type, params, **fields)
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "succeeded", final.error
    return final


@pytest.fixture(scope="module")
def parent(runner: JobRunner) -> Job:
    """A 12-frame song (seed 7 runs all frames on the tiny model without audio EOS)."""
    return _finished(runner, "generate", {**SHORT, "seed": 7})


def test_extend_keeps_the_parent_and_continues_from_its_last_prediction(
    runner: JobRunner, parent: Job
) -> None:
    from shared.ml.generation.engine import GenerationRequest

    params = {
        "source_job_id": parent.id,
        "tags": "piano,happy",
        "lyrics": "",
        "seed": 3,
        "duration_s": 0.48,
        "cfg_scale": 1.0,
    }
    first = _finished(runner, "extend", params)
    tokens, parent_tokens = _tokens(runner, first), _tokens(runner, parent)
    assert tokens.shape == (8, 18) and np.array_equal(tokens[:, :12], parent_tokens)
    request = GenerationRequest(
        "piano,happy", "", 0.48, cfg_scale=1.0, seed=3, history=parent_tokens
    )
    expected = runner.models.engine().submit(request).result().tokens
    assert np.array_equal(tokens[:, 12:], expected)
    metadata = json.loads(_artifact(runner, first, "metadata.json"))
    assert metadata["parent_job_id"] == parent.id and metadata["parent_frames"] == 12

    second = _finished(runner, "extend", {**params, "source_job_id": first.id, "seed": 4})
    chained = _tokens(runner, second)
    assert chained.shape == (8, 24) and np.array_equal(chained[:, :18], tokens)


def test_extend_past_the_context_fails_before_generating(runner: JobRunner, parent: Job) -> None:
    # prompt + new frames fit (the params pass), prompt + the parent's 12 frames + new do not
    lyrics = "la la la " * 600
    rows = prompt_counter(runner.settings.model_dir).rows("piano", lyrics)
    params = {
        "source_job_id": parent.id,
        "tags": "piano",
        "lyrics": lyrics,
        "duration_s": (CONTEXT_POSITIONS - rows - 6) * FRAME_S,
    }
    job = _new(runner, "extend", params)
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "failed" and final.error["message"].startswith("duration_s:")
    assert "history (12 frames)" in final.error["message"]


def test_inpaint_changes_only_the_gap(runner: JobRunner, parent: Job) -> None:
    from shared.core.audio import read_audio
    from shared.core.inpaint import CROSSFADE_SAMPLES

    params = {
        "source_job_id": parent.id,
        "start_s": 0.24,
        "end_s": 0.72,
        "tags": "piano",
        "lyrics": "",
        "seed": 5,
    }
    job = _finished(runner, "inpaint", params)
    tokens, before = _tokens(runner, job), _tokens(runner, parent)
    assert tokens.shape == before.shape
    assert np.array_equal(tokens[:, :3], before[:, :3])
    assert np.array_equal(tokens[:, 9:], before[:, 9:])
    assert not np.array_equal(tokens[:, 3:9], before[:, 3:9])

    audio, _ = read_audio(_artifact(runner, job, "audio.flac"))
    original, _ = read_audio(_artifact(runner, parent, "audio.flac"))
    half = CROSSFADE_SAMPLES // 2
    lo, hi = 3 * SAMPLES_PER_FRAME - half, 9 * SAMPLES_PER_FRAME + half
    assert audio.shape == original.shape
    assert np.array_equal(audio[:, :lo], original[:, :lo])
    assert np.array_equal(audio[:, hi:], original[:, hi:])
    assert not np.allclose(audio[:, lo:hi], original[:, lo:hi])


def test_inpaint_range_outside_the_song_fails_naming_the_field(
    runner: JobRunner, parent: Job
) -> None:
    job = _new(
        runner,
        "inpaint",
        {"source_job_id": parent.id, "start_s": 0.5, "end_s": 3.0, "tags": "piano", "lyrics": ""},
    )
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "failed" and final.error["message"].startswith("end_s:")


def test_extend_of_an_upload_waits_for_its_encode_step(runner: JobRunner) -> None:
    from shared.core.audio import encode_audio
    from shared.core.jobs import Upload

    rng = np.random.default_rng(1)
    audio = encode_audio(rng.uniform(-0.1, 0.1, (2, SAMPLE_RATE)).astype(np.float32), "wav")
    key = "tenants/acme/uploads/u2/take.wav"
    runner.objects.put_bytes(key, audio)
    runner.uploads.create(
        Upload("u2", "acme", key, "take.wav", "audio", len(audio), 1.0, SAMPLE_RATE, 2)
    )
    encode = _new(runner, "encode", {"upload_id": "u2"})
    params = {
        "upload_id": "u2",
        "tags": "rock",
        "lyrics": "",
        "duration_s": 0.4,
        "seed": 3,
        "cfg_scale": 1.0,
    }
    extend = _new(runner, "extend", params, parent_job_id=encode.id)
    runner.jobs.add_dependent(encode.id, extend.id)
    ENQUEUED.clear()
    runner.run(encode.id)
    assert [j.id for j in ENQUEUED] == [extend.id]
    runner.run(extend.id)
    final = runner.jobs.get(extend.id)
    assert final.state == "succeeded", final.error
    encoded = _tokens(runner, runner.jobs.get(encode.id))
    assert np.array_equal(_tokens(runner, final)[:, :13], encoded)


def test_a_failed_step_fails_the_job_waiting_for_it(runner: JobRunner) -> None:
    encode = _new(runner, "encode", {"upload_id": "missing"})
    extend = _new(
        runner, "extend", {"upload_id": "missing", "tags": "rock"}, parent_job_id=encode.id
    )
    runner.jobs.add_dependent(encode.id, extend.id)
    ENQUEUED.clear()
    runner.run(encode.id)
    final = runner.jobs.get(extend.id)
    assert ENQUEUED == [] and final.state == "failed"
    assert final.error["code"] == "dependency_failed" and encode.id in final.error["message"]


def test_transcribe_a_songs_audio_writes_transcript_lrc_and_srt(
    runner: JobRunner, parent: Job
) -> None:
    job = _finished(runner, "transcribe", {"source_job_id": parent.id, "language": "en"})
    assert sorted(job.artifacts) == ["lyrics.lrc", "lyrics.srt", "metadata.json", "transcript.json"]
    transcript = json.loads(_artifact(runner, job, "transcript.json"))
    assert set(transcript) >= {"text", "segments", "duration_s"}
    assert transcript["duration_s"] == pytest.approx(12 * FRAME_S)
    assert transcript["segments"], "the tiny model always writes some text"
    for segment in transcript["segments"]:
        assert 0 <= segment["start"] <= segment["end"] <= transcript["duration_s"] + 1e-6
    # Both exports hold one line/cue per segment with printable text (the random tiny model's
    # text varies: Whisper's temperature fallback samples).
    srt = _artifact(runner, job, "lyrics.srt").decode()
    lrc = _artifact(runner, job, "lyrics.lrc").decode().splitlines()
    assert srt.count(" --> ") == len(lrc) <= len(transcript["segments"])
    assert all(re.fullmatch(r"\[\d\d:\d\d\.\d\d\] .*", line) for line in lrc)


def test_a_redelivered_job_whose_cancel_was_asked_ends_cancelled(runner: JobRunner) -> None:
    job = _new(runner, "generate", SHORT)
    runner.jobs.start(job.id)  # a worker took it ...
    runner.jobs.cancel(job.id)  # ... the user cancelled, and the worker died
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "cancelled" and _stored(runner, job) == []


def test_cancelling_a_step_cancels_the_job_waiting_for_it(runner: JobRunner) -> None:
    encode = _new(runner, "encode", {"upload_id": "u-none"})
    extend = _new(
        runner, "extend", {"upload_id": "u-none", "tags": "rock"}, parent_job_id=encode.id
    )
    runner.jobs.add_dependent(encode.id, extend.id)
    runner.jobs.start(encode.id)
    runner.jobs.cancel(encode.id)
    runner.jobs.mark_cancelled(encode.id)
    runner.run(encode.id)  # the redelivered message finds it cancelled
    assert runner.jobs.get(extend.id).state == "cancelled"


def test_a_release_that_cannot_be_queued_fails_the_waiting_job(
    runner: JobRunner, parent: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broker_down(job: Job) -> None:
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(runner, "enqueue", broker_down)
    extend = _new(
        runner, "extend", {"source_job_id": parent.id, "tags": "rock"}, parent_job_id=parent.id
    )
    runner.jobs.add_dependent(parent.id, extend.id)
    runner.run(parent.id)  # already succeeded: only releases what waits on it
    final = runner.jobs.get(extend.id)
    assert final.state == "failed" and final.error["code"] == "enqueue_failed"


def test_a_song_ended_before_its_first_frame_fails_saying_so(runner: JobRunner) -> None:

    def always_eos(_module, _inputs, logits):
        logits = logits.clone()
        logits[:, AUDIO_EOS_ID] = 1e4
        return logits

    hook = runner.models.engine().model.codebook0_head.register_forward_hook(always_eos)
    try:
        job = _new(runner, "generate", SHORT)
        runner.run(job.id)
    finally:
        hook.remove()
    final = runner.jobs.get(job.id)
    assert final.state == "failed" and final.error["code"] == "nothing_generated"
    assert _stored(runner, job) == []
