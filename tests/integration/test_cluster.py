"""End to end through real processes: HTTP gateway → Redis/Celery → worker → object store.

Tiny random-weight models: the audio is noise; the tests check its format and length.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from shared.core.constants import FRAME_S, SAMPLE_RATE, SAMPLES_PER_FRAME
from shared.core.storage import artifact_key
from tests.integration.conftest import Cluster

# Random tiny weights sample audio EOS now and then; with these seeds they do not (checked
# against write_tiny_models(seed=0)): SHORT runs its 25 frames, LONG its 1500.
SHORT = {"tags": "piano,happy", "lyrics": "[verse] hello world", "duration_s": 2.0, "seed": 11}
# Longer than any test waits: these jobs end by being cancelled.
LONG = {"tags": "rock", "duration_s": 120.0, "cfg_scale": 1.0, "seed": 17}


def test_generate_streams_progress_and_serves_audio_and_tokens(cluster: Cluster) -> None:
    job = cluster.submit("alice", "generate", SHORT)
    assert job["state"] == "queued"

    events = list(cluster.events("alice", job["id"]))
    final = events[-1]["job"]
    assert final["state"] == "succeeded", final
    running = [e["job"] for e in events if e["job"]["state"] == "running"]
    stages = [j["stage"] for j in running]
    assert "generating" in stages and "decoding" in stages and "uploading" in stages
    percents = [j["progress"] for j in running]
    assert percents == sorted(percents) and 0 < percents[-1] < 100
    assert sorted(final["artifacts"]) == [
        "audio.flac",
        "metadata.json",
        "preview.png",
        "tokens.npy",
    ]

    tokens = np.load(io.BytesIO(cluster.artifact("alice", job["id"], "tokens.npy").content))
    frames = round(SHORT["duration_s"] / FRAME_S)
    assert tokens.shape == (8, frames) and tokens.dtype == np.int32

    reply = cluster.artifact("alice", job["id"], "audio.flac")
    assert reply.status_code == 200
    # S3 artifacts are a redirect to a presigned URL; local ones are streamed by the gateway.
    redirected = [r.status_code for r in reply.history]
    assert redirected == ([302] if cluster.settings.storage_scheme == "s3" else [])
    info = soundfile.info(io.BytesIO(reply.content))
    assert (info.format, info.samplerate, info.channels) == ("FLAC", SAMPLE_RATE, 2)
    assert info.frames == frames * SAMPLES_PER_FRAME

    metadata = json.loads(cluster.artifact("alice", job["id"], "metadata.json").content)
    assert metadata["seed"] == 11 and metadata["params"]["tags"] == "piano,happy"
    assert metadata["model_version"] == "tiny" and metadata["frames"] == frames


def _artifacts_left(cluster: Cluster, tenant: str, job_id: str) -> list[str]:
    names = ("tokens.npy", "audio.flac", "preview.png", "metadata.json")
    return [n for n in names if cluster.store.exists(artifact_key(tenant, job_id, n))]


def test_cancel_running_job_stops_it_and_frees_its_slot(local_cluster: Cluster) -> None:
    cluster = local_cluster
    job = cluster.submit("alice", "generate", LONG)
    cluster.wait("alice", job["id"], until=lambda j: (j.get("frames_done") or 0) > 0)

    reply = cluster.cancel("alice", job["id"])
    assert reply.status_code in (200, 202), reply.text
    final = cluster.wait("alice", job["id"])
    assert final["state"] == "cancelled"
    assert final["frames_done"] < final["frames_total"]
    assert final["artifacts"] == [] and _artifacts_left(cluster, "alice", job["id"]) == []

    after = cluster.submit("alice", "generate", SHORT)
    assert cluster.wait("alice", after["id"])["state"] == "succeeded"


def test_cancelled_queued_job_never_runs(local_cluster: Cluster) -> None:
    cluster = local_cluster
    # Both task threads of the GPU worker busy: the next job stays in the broker queue.
    blockers = [cluster.submit("alice", "generate", LONG) for _ in range(2)]
    for blocker in blockers:
        cluster.wait("alice", blocker["id"], until=lambda j: j["state"] == "running")
    queued = cluster.submit("alice", "generate", SHORT)
    assert cluster.job("alice", queued["id"])["state"] == "queued"

    reply = cluster.cancel("alice", queued["id"])
    assert reply.status_code in (200, 202), reply.text
    assert cluster.job("alice", queued["id"])["state"] == "cancelled"
    for blocker in blockers:
        cluster.cancel("alice", blocker["id"])
        assert cluster.wait("alice", blocker["id"])["state"] == "cancelled"

    # A job sent after it runs to the end, so the worker has been past the cancelled one.
    follower = cluster.submit("alice", "generate", SHORT)
    assert cluster.wait("alice", follower["id"])["state"] == "succeeded"
    never = cluster.job("alice", queued["id"])
    assert never["state"] == "cancelled"
    assert never["attempts"] == 0 and never["started_at"] is None
    assert _artifacts_left(cluster, "alice", queued["id"]) == []


def test_tenants_are_isolated_through_gateway_and_worker(s3_cluster: Cluster) -> None:
    cluster = s3_cluster
    job = cluster.submit("alice", "generate", {**SHORT, "duration_s": 1.0})
    assert cluster.wait("alice", job["id"])["state"] == "succeeded"
    url = f"{cluster.url}/v1/jobs/{job['id']}"

    bob = cluster.http("bob")
    assert bob.get(url, timeout=10).status_code == 404
    assert bob.post(f"{url}/cancel", timeout=10).status_code == 404
    assert bob.get(f"{url}/artifacts/audio.flac", timeout=10).status_code == 404
    listed = bob.get(f"{cluster.url}/v1/jobs", timeout=10).json()
    assert job["id"] not in json.dumps(listed)

    # The worker resolves a decode's source job within the submitting tenant only.
    params = {"source_job_id": job["id"], "steps": 2}
    reply = bob.post(f"{cluster.url}/v1/jobs", json={"type": "decode", "params": params})
    if reply.status_code < 400:
        failed = cluster.wait("bob", reply.json()["id"])
        assert failed["state"] == "failed" and "source_job_id" in failed["error"]["message"]
    else:
        assert "source_job_id" in json.dumps(reply.json()["error"])

    own = cluster.submit("alice", "decode", params)
    decoded = cluster.wait("alice", own["id"])
    assert decoded["state"] == "succeeded" and "audio.flac" in decoded["artifacts"]


def test_idempotent_submit_makes_one_job(s3_cluster: Cluster) -> None:
    cluster = s3_cluster
    body = {"idempotency_key": "song-42"}
    first = cluster.submit("alice", "generate", {**SHORT, "duration_s": 1.0}, **body)
    second = cluster.submit("alice", "generate", {**SHORT, "duration_s": 1.0}, **body)
    assert second["id"] == first["id"]
    final = cluster.wait("alice", first["id"])
    assert final["state"] == "succeeded" and final["attempts"] == 1
    listed = cluster.http("alice").get(f"{cluster.url}/v1/jobs?limit=100", timeout=10).json()
    assert json.dumps(listed).count(first["id"]) == 1


def test_gateway_process_never_imports_torch(cluster: Cluster) -> None:
    job = cluster.submit("alice", "generate", {**SHORT, "duration_s": 1.0})
    list(cluster.events("alice", job["id"]))
    assert cluster.artifact("alice", job["id"], "tokens.npy").status_code == 200
    processes = _process_tree(cluster.gateway.pid)
    assert len(processes) > 1  # gunicorn's master and its worker processes, which run the app
    for pid in processes:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "python" in maps  # the right process
        assert "libtorch" not in maps and "/torch/" not in maps


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    children = [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    return [pid] + [p for child in children for p in _process_tree(child)]


def _tokens(cluster: Cluster, tenant: str, job_id: str) -> np.ndarray:
    return np.load(io.BytesIO(cluster.artifact(tenant, job_id, "tokens.npy").content))


def test_extend_then_inpaint_a_song(s3_cluster: Cluster) -> None:
    cluster = s3_cluster
    song = cluster.submit("alice", "generate", {**SHORT, "duration_s": 1.0})
    assert cluster.wait("alice", song["id"])["state"] == "succeeded"
    longer = cluster.submit("alice", "extend", {"source_job_id": song["id"], "duration_s": 0.8})
    assert longer["params"]["tags"] == SHORT["tags"] and longer["parent_job_id"] == song["id"]
    assert cluster.wait("alice", longer["id"])["state"] == "succeeded"
    parent, extended = (
        _tokens(cluster, "alice", song["id"]),
        _tokens(cluster, "alice", longer["id"]),
    )
    assert parent.shape == (8, 12) and extended.shape == (8, 22)
    assert np.array_equal(extended[:, :12], parent)
    info = soundfile.info(io.BytesIO(cluster.artifact("alice", longer["id"], "audio.flac").content))
    assert info.frames == 22 * SAMPLES_PER_FRAME

    params = {"source_job_id": longer["id"], "start_s": 0.4, "end_s": 1.2}
    repaired = cluster.submit("alice", "inpaint", params)
    assert cluster.wait("alice", repaired["id"])["state"] == "succeeded"
    tokens = _tokens(cluster, "alice", repaired["id"])
    assert np.array_equal(tokens[:, :5], extended[:, :5])
    assert np.array_equal(tokens[:, 15:], extended[:, 15:])


def test_transcribe_a_song_on_the_cpu_worker(local_cluster: Cluster) -> None:
    cluster = local_cluster
    song = cluster.submit("alice", "generate", {**SHORT, "duration_s": 1.0})
    assert cluster.wait("alice", song["id"])["state"] == "succeeded"
    job = cluster.submit("alice", "transcribe", {"source_job_id": song["id"], "language": "en"})
    final = cluster.wait("alice", job["id"])
    assert final["state"] == "succeeded", final["error"]
    assert {"transcript.json", "lyrics.lrc", "lyrics.srt"} <= set(final["artifacts"])
    transcript = cluster.artifact("alice", job["id"], "transcript.json").json()
    assert transcript["duration_s"] == pytest.approx(0.96)  # 12 frames
    segments = transcript["segments"]
    assert segments, "the tiny model always writes some text"
    assert all(0 <= s["start"] <= s["end"] <= transcript["duration_s"] + 1e-6 for s in segments)
    bob = cluster.http("bob").get(f"{cluster.url}/v1/jobs/{job['id']}", timeout=10)
    assert bob.status_code == 404
