"""A fine-tune through the whole cluster as `heartcluster up` starts it (its train worker):
a dataset from uploaded token files, the finetune job with its progress on SSE, the adapter
artifacts, and a song generated with the adapter."""

from __future__ import annotations

import io

import numpy as np

from tests.integration.conftest import Cluster
from tests.ml.finetune_support import TAG, pattern_song


def test_a_dataset_fine_tunes_and_its_adapter_generates(local_cluster: Cluster) -> None:
    http = local_cluster.http("alice")
    items = []
    for phase in range(4):
        buffer = io.BytesIO()
        np.save(buffer, pattern_song(frames=16, phase=phase))
        reply = http.post(
            f"{local_cluster.url}/v1/uploads",
            files={"file": (f"song{phase}.npy", buffer.getvalue())},
            timeout=30,
        )
        assert reply.status_code == 201, reply.text
        items.append({"upload_id": reply.json()["id"], "tags": TAG})
    dataset = http.post(
        f"{local_cluster.url}/v1/datasets", json={"name": "samba", "items": items}, timeout=30
    )
    assert dataset.status_code == 201, dataset.text
    assert dataset.json()["totals"]["ready"] == 4

    params = {"dataset_id": dataset.json()["id"], "steps": 6, "checkpoint_every": 3, "rank": 4}
    job = local_cluster.submit("alice", "finetune", params)
    events = list(local_cluster.events("alice", job["id"]))
    final = events[-1]["job"]
    assert final["state"] == "succeeded", final
    assert any("loss" in e["job"]["message"] for e in events if e["job"]["stage"] == "training")
    assert sorted(final["artifacts"]) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metadata.json",
        "metrics.jsonl",
    ]
    song = local_cluster.submit(
        "alice", "generate", {"tags": TAG, "duration_s": 0.8, "adapter_id": job["id"]}
    )
    assert local_cluster.wait("alice", song["id"])["state"] == "succeeded"
    theirs = local_cluster.http("bob").post(
        f"{local_cluster.url}/v1/jobs",
        json={"type": "generate", "params": {"tags": TAG, "adapter_id": job["id"]}},
        timeout=30,
    )
    assert theirs.status_code == 404 and theirs.json()["error"]["field"] == "params.adapter_id"
