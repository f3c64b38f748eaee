"""A real cluster per object store, started once per session by the code behind
`heartcluster up` (gateway, GPU-queue and CPU Celery workers as subprocesses) on the session
redis-server (one database per cluster) and moto's S3 server, with tiny models written once.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
import requests

from api.client.launcher import free_port
from api.client.local_cluster import LocalCluster
from shared.core.config import Settings
from shared.core.jobs import TERMINAL_STATES
from shared.core.storage import ObjectStore, store_from_settings
from shared.core.tenants import TenantStore

TENANTS = ("alice", "bob")
# Four engine rows: two task threads on the GPU-queue worker, so a third job waits in the queue.
ENGINE_ROWS = 4
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 120


@dataclass
class Cluster:
    url: str
    settings: Settings
    redis: redis.Redis
    store: ObjectStore
    keys: dict[str, str]
    gateway: subprocess.Popen[bytes]
    log_dir: Path
    metrics_ports: dict[str, int] = field(default_factory=dict)  # worker name → /metrics port
    sessions: dict[str, requests.Session] = field(default_factory=dict)

    def http(self, tenant: str) -> requests.Session:
        if tenant not in self.sessions:
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self.keys[tenant]}"
            self.sessions[tenant] = session
        return self.sessions[tenant]

    def submit(self, tenant: str, type: str, params: dict[str, Any], **extra: Any) -> dict:
        reply = self.http(tenant).post(
            f"{self.url}/v1/jobs", json={"type": type, "params": params, **extra}, timeout=10
        )
        assert reply.status_code in (200, 201, 202), reply.text
        return reply.json()

    def job(self, tenant: str, job_id: str) -> dict:
        reply = self.http(tenant).get(f"{self.url}/v1/jobs/{job_id}", timeout=10)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def cancel(self, tenant: str, job_id: str) -> requests.Response:
        return self.http(tenant).post(f"{self.url}/v1/jobs/{job_id}/cancel", timeout=10)

    def wait(self, tenant: str, job_id: str, until=lambda job: job["state"] in TERMINAL_STATES):
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            job = self.job(tenant, job_id)
            if until(job):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not get there in time: {job}; logs {self.log_dir}")

    def events(self, tenant: str, job_id: str) -> Iterator[dict]:
        """The job's Server-Sent Events as {"event", "job"} dicts, until the stream ends."""
        with self.http(tenant).get(
            f"{self.url}/v1/jobs/{job_id}/events", stream=True, timeout=JOB_TIMEOUT_S
        ) as reply:
            assert reply.status_code == 200, reply.text
            assert reply.headers["Content-Type"].startswith("text/event-stream")
            name = "message"
            for line in reply.iter_lines(decode_unicode=True):
                if line.startswith("event:"):
                    name = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data = json.loads(line.removeprefix("data:").strip())
                    yield data if "job" in data else {"event": name, "job": data}

    def artifact(self, tenant: str, job_id: str, name: str) -> requests.Response:
        """An artifact through the gateway, following a redirect to presigned S3 URLs."""
        return self.http(tenant).get(
            f"{self.url}/v1/jobs/{job_id}/artifacts/{name}", timeout=30, allow_redirects=True
        )


def _start_cluster(env_overrides: dict[str, str], root: Path) -> Iterator[Cluster]:
    """The cluster exactly as `heartcluster up` starts it, on the given services."""
    env = {**os.environ, **env_overrides}
    client = redis.Redis.from_url(env["HEARTCLUSTER_REDIS_URL"])
    client.flushdb()
    local = LocalCluster(root / "data", port=free_port(), env=env, log=lambda *_: None)
    try:
        local.start(timeout_s=START_TIMEOUT_S)
        tenants = TenantStore(client)
        yield Cluster(
            url=local.url,
            settings=local.settings,
            redis=client,
            store=store_from_settings(local.settings),
            keys={tenant: tenants.create_key(tenant) for tenant in TENANTS},
            gateway=local.processes["gateway"],
            log_dir=local.log_dir,
            metrics_ports=local.metrics_ports,
        )
    finally:
        local.stop()
        client.close()


def _base_env(redis_url: str, db: int, tiny_model_dir: Path) -> dict[str, str]:
    return {
        "HEARTCLUSTER_REDIS_URL": f"{redis_url.rsplit('/', 1)[0]}/{db}",
        "HEARTCLUSTER_MODEL_DIR": str(tiny_model_dir),
        "HEARTCLUSTER_DEVICE": "cpu",
        "HEARTCLUSTER_ENGINE_MAX_ROWS": str(ENGINE_ROWS),
        # webhooks to a receiver on loopback, retried within the tests' patience
        "HEARTCLUSTER_WEBHOOK_ALLOW_PRIVATE": "1",
        "HEARTCLUSTER_BACKGROUND_POLL_S": "0.1",
        "HEARTCLUSTER_WEBHOOK_BACKOFF_S": "0.2",
        "HEARTCLUSTER_WEBHOOK_BACKOFF_MAX_S": "0.5",
        "HEARTCLUSTER_WEBHOOK_TIMEOUT_S": "2",
    }


@pytest.fixture(scope="session")
def s3_cluster(
    redis_url: str, s3_endpoint: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Artifacts in S3 (moto)."""
    root = tmp_path_factory.mktemp("s3-cluster")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket="heartcluster-test"
    )
    env = _base_env(redis_url, 1, tiny_model_dir)
    env["HEARTCLUSTER_STORAGE_URL"] = "s3://heartcluster-test/artifacts"
    env["HEARTCLUSTER_S3_ENDPOINT_URL"] = s3_endpoint
    yield from _start_cluster(env, root)


@pytest.fixture(scope="session")
def local_cluster(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Artifacts in a local directory."""
    root = tmp_path_factory.mktemp("local-cluster")
    env = _base_env(redis_url, 2, tiny_model_dir)
    env["HEARTCLUSTER_STORAGE_URL"] = (root / "artifacts").as_uri()
    yield from _start_cluster(env, root)


@pytest.fixture(params=["s3", "local"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    return request.getfixturevalue(f"{request.param}_cluster")
