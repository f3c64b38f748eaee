"""Batches, signed webhooks and deletion through real processes: the CLI and HTTP → gateway →
Redis/Celery → workers (whose background threads emit and deliver webhooks) → a real HTTP
receiver on loopback, and the object store.

Tiny random-weight models: short songs (2 frames) and small decode/encode jobs keep it quick.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from api.client.cli import main
from shared.core.storage import artifact_key
from shared.core.webhooks import verify
from tests.integration.conftest import Cluster
from tests.support.receiver import Receiver

# seed 11 samples no EOS in its first frames (see test_cluster.SHORT)
TINY_SONG = {"tags": "piano,happy", "lyrics": "[verse] hi", "duration_s": 0.16, "seed": 11}
LONG = {"tags": "rock", "duration_s": 120.0, "cfg_scale": 1.0, "seed": 17}
WAIT_S = 90
# Five of each kind (generate, decode, encode): each item costs about a second of CPU.
BATCH_ITEMS = 15


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def upload(cluster: Cluster, tenant: str, data: bytes, name: str) -> dict[str, Any]:
    reply = cluster.http(tenant).post(
        f"{cluster.url}/v1/uploads", files={"file": (name, io.BytesIO(data))}, timeout=30
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def wav(seconds: float = 0.4, rate: int = 48000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((int(seconds * rate), 2), np.float32), rate, format="WAV")
    return buffer.getvalue()


def tokens(frames: int = 4) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((8, frames), np.int32))
    return buffer.getvalue()


def cli(cluster: Cluster, tenant: str, *args: str) -> int:
    return main([*args, "--url", cluster.url, "--api-key", cluster.keys[tenant]])


def batch(cluster: Cluster, tenant: str, batch_id: str) -> dict[str, Any]:
    reply = cluster.http(tenant).get(f"{cluster.url}/v1/batches/{batch_id}", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_mixed_batch_through_the_cli(local_cluster: Cluster, tmp_path: Path, capsys):
    cluster = local_cluster
    codes = upload(cluster, "alice", tokens(), "codes.npy")["id"]
    song = upload(cluster, "alice", wav(), "song.wav")["id"]
    kinds = [
        ("generate", TINY_SONG),
        ("decode", {"tokens_upload_id": codes, "steps": 1}),
        ("encode", {"upload_id": song}),
    ]
    items = [
        {"custom_id": f"item-{i}", "type": kinds[i % 3][0], "params": kinds[i % 3][1]}
        for i in range(BATCH_ITEMS)
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    assert cli(cluster, "alice", "batch", "submit", str(path), "--watch") == 0
    batch_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli(cluster, "alice", "batch", "results", batch_id) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["custom_id"] for line in lines] == [f"item-{i}" for i in range(BATCH_ITEMS)]
    assert {line["state"] for line in lines} == {"succeeded"}
    assert len({line["job_id"] for line in lines}) == BATCH_ITEMS
    assert all("metadata.json" in line["artifacts"] for line in lines)
    final = batch(cluster, "alice", batch_id)
    assert final["state"] == "completed" and final["counts"]["succeeded"] == BATCH_ITEMS
    assert cluster.http("bob").get(f"{cluster.url}/v1/batches/{batch_id}").status_code == 404


def test_cancelling_a_batch_midway_leaves_nothing_running(local_cluster: Cluster) -> None:
    cluster = local_cluster
    short = [{"type": "generate", "params": TINY_SONG} for _ in range(2)]
    items = short + [{"type": "generate", "params": {**LONG, "seed": 17 + i}} for i in range(4)]
    reply = cluster.http("alice").post(f"{cluster.url}/v1/batches", json={"items": items})
    assert reply.status_code == 202, reply.text
    batch_id = reply.json()["id"]

    def midway() -> bool:
        counts = batch(cluster, "alice", batch_id)["counts"]
        return counts["succeeded"] == 2 and counts["running"] > 0

    wait_for("the short items to end and a long one to run", midway)
    cancelled = cluster.http("alice").post(f"{cluster.url}/v1/batches/{batch_id}/cancel")
    # a running item stops within a frame: it may have ended before the reply was built
    assert cancelled.status_code == 200 and cancelled.json()["state"] in ("cancelling", "cancelled")
    assert cancelled.json()["cancel_requested"] is True
    final = wait_for(
        "the batch to end",
        lambda: (b := batch(cluster, "alice", batch_id))["state"] == "cancelled" and b,
    )
    assert final["counts"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 2,
        "failed": 0,
        "cancelled": 4,
        "deleted": 0,
    }
    states = [cluster.job("alice", job_id)["state"] for job_id in _job_ids(cluster, batch_id)]
    assert states == ["succeeded"] * 2 + ["cancelled"] * 4


def _job_ids(cluster: Cluster, batch_id: str) -> list[str]:
    reply = cluster.http("alice").get(f"{cluster.url}/v1/batches/{batch_id}/results")
    return [json.loads(line)["job_id"] for line in reply.text.splitlines()]


def test_webhooks_are_signed_and_delivered_at_least_once(local_cluster: Cluster) -> None:
    cluster = local_cluster
    http = cluster.http("alice")
    secret = http.post(f"{cluster.url}/v1/webhooks/secret").json()["secret"]
    receiver = Receiver(status=500)  # broken for a while
    down = Receiver()
    down.close()  # and one that is down: nothing listens on its port
    back: Receiver | None = None
    try:
        song = cluster.submit("alice", "generate", TINY_SONG, webhook_url=receiver.url)
        long = cluster.submit("alice", "generate", LONG, webhook_url=receiver.url)
        late = cluster.submit("alice", "generate", TINY_SONG, webhook_url=down.url)
        items = [{"custom_id": "a", "type": "generate", "params": TINY_SONG}]
        body = {"items": items, "webhook_url": receiver.url}
        batch_id = http.post(f"{cluster.url}/v1/batches", json=body).json()["id"]
        cluster.wait("alice", long["id"], until=lambda job: job["state"] == "running")
        cluster.cancel("alice", long["id"])
        for job in (song, late):
            cluster.wait("alice", job["id"])

        def attempts(**subject: str) -> list[dict[str, Any]]:
            reply = http.get(f"{cluster.url}/v1/webhooks/deliveries", params=subject)
            return [a for d in reply.json()["deliveries"] for a in d["attempts"]]

        wait_for("failed attempts", lambda: len(attempts(job_id=song["id"])) >= 2)
        assert attempts(job_id=song["id"])[0]["error"] == "HTTP 500"
        wait_for("an attempt on the closed port", lambda: attempts(job_id=late["id"]))
        assert "ConnectionError" in attempts(job_id=late["id"])[0]["error"]
        receiver.status = 200  # recovers
        back = Receiver(port=down.port)  # comes back up
        expected = {
            ("job.succeeded", song["id"]),
            ("job.cancelled", long["id"]),
            ("batch.completed", batch_id),
        }

        def unique_events(rcv: Receiver) -> dict[str, Any]:
            """By webhook-id, as a receiver dedupes; only answered-200 ones once recovered."""
            return {r.headers["webhook-id"]: r for r in rcv.requests()}

        def seen(rcv: Receiver) -> set[tuple[str, str]]:
            events = unique_events(rcv).values()
            return {(r.payload["type"], r.payload["data"]["id"]) for r in events}

        wait_for("every event", lambda: seen(receiver) == expected)
        wait_for("the late event", lambda: seen(back) == {("job.succeeded", late["id"])})
        for rcv in (receiver, back):
            for request in rcv.requests():
                assert verify(secret, request.headers, request.body)
                tampered = request.body.replace(b'"state"', b'"State"')
                assert not verify(secret, request.headers, tampered)

        def deliveries() -> list[dict[str, Any]]:
            reply = http.get(f"{cluster.url}/v1/webhooks/deliveries", params={"job_id": song["id"]})
            return reply.json()["deliveries"]

        wait_for("the delivery to be recorded", lambda: deliveries()[0]["state"] == "delivered")
        (delivered,) = deliveries()
        assert delivered["event"] == "job.succeeded" and delivered["attempt_count"] >= 3
        assert delivered["attempts"][-1]["status"] == 200
    finally:
        receiver.close()
        if back is not None:
            back.close()


def test_deleted_jobs_and_uploads_are_gone_from_api_and_store(cluster: Cluster) -> None:
    job = cluster.submit("alice", "generate", TINY_SONG)
    assert cluster.wait("alice", job["id"])["state"] == "succeeded"
    key = artifact_key("alice", job["id"], "metadata.json")
    assert cluster.store.exists(key)
    url = f"{cluster.url}/v1/jobs/{job['id']}"
    assert cluster.http("bob").delete(url).status_code == 404
    assert cluster.http("alice").delete(url).status_code == 204
    assert cluster.http("alice").get(url).status_code == 404
    assert not cluster.store.exists(key)
    running = cluster.submit("alice", "generate", LONG)
    cluster.wait("alice", running["id"], until=lambda j: j["state"] in ("running", "succeeded"))
    refused = cluster.http("alice").delete(f"{cluster.url}/v1/jobs/{running['id']}")
    assert refused.status_code == 409 and "cancel" in refused.json()["error"]["message"]
    cluster.cancel("alice", running["id"])
    made = upload(cluster, "alice", wav(), "gone.wav")
    upload_key = f"tenants/alice/uploads/{made['id']}/gone.wav"
    assert cluster.store.exists(upload_key)
    upload_url = f"{cluster.url}/v1/uploads/{made['id']}"
    assert cluster.http("bob").delete(upload_url).status_code == 404
    assert cluster.http("alice").delete(upload_url).status_code == 204
    assert cluster.http("alice").get(upload_url).status_code == 404
    assert not cluster.store.exists(upload_key)
    cluster.wait("alice", running["id"])
