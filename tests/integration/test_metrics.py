"""/metrics of the real gunicorn gateway and of a real worker, after a job ran, read with the
Prometheus text parser."""

from __future__ import annotations

import requests
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.integration.conftest import Cluster

SONG = {"tags": "piano,happy", "duration_s": 1.0, "seed": 11}


def _families(url: str) -> list[Metric]:
    reply = requests.get(url, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.headers["Content-Type"].startswith("text/plain")
    return list(text_string_to_metric_families(reply.text))


def _samples(url: str) -> list[Sample]:
    return [sample for family in _families(url) for sample in family.samples]


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    matching = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert matching, f"no sample {name} {labels}"
    return sum(matching)


def test_gateway_and_worker_metrics_after_a_job(local_cluster: Cluster) -> None:
    job = local_cluster.submit("alice", "generate", SONG)
    final = local_cluster.wait("alice", job["id"])
    assert final["state"] == "succeeded", final

    gateway = _samples(f"{local_cluster.url}/metrics")
    posts = _value(
        gateway, "heartcluster_http_requests_total", route="/v1/jobs", method="POST", status="202"
    )
    assert posts >= 1
    latency = "heartcluster_http_request_duration_seconds_count"
    assert _value(gateway, latency, route="/v1/jobs/<job_id>", method="GET") >= 1
    for queue in ("gpu", "cpu", "train"):
        assert _value(gateway, "heartcluster_queue_depth", queue=queue) >= 0

    worker_url = f"http://127.0.0.1:{local_cluster.metrics_ports['gpu-worker']}/metrics"
    worker = _samples(worker_url)
    ended = {"type": "generate", "tenant": "alice", "state": "succeeded"}
    assert _value(worker, "heartcluster_jobs_total", **ended) >= 1
    assert _value(worker, "heartcluster_job_queue_wait_seconds_count", type="generate") >= 1
    run_count = "heartcluster_job_run_seconds_count"
    assert _value(worker, run_count, type="generate", state="succeeded") >= 1
    assert _value(worker, "heartcluster_engine_frames_total") >= 1
    assert _value(worker, "heartcluster_engine_admissions_total") >= 1
    assert _value(worker, "heartcluster_codec_decoded_seconds_total") > 0
    rows = _value(worker, "heartcluster_engine_rows", use="busy") + _value(
        worker, "heartcluster_engine_rows", use="free"
    )
    assert rows == local_cluster.settings.engine_max_rows

    # No fine-tune ran, but the trainer's metrics are declared (a dashboard finds them).
    names = {family.name for family in _families(worker_url)}
    assert {"heartcluster_finetune_steps", "heartcluster_finetune_loss"} <= names
