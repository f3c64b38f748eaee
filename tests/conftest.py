"""Session-wide service fixtures: a private redis-server and an S3-compatible server on loopback.

Each service starts at most once per test session; tests isolate themselves with their own keys,
buckets or a flushed database (`redis_client`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.net import free_port

# Torch's second intra-op thread thrashes on CI's two cores under pytest (~2x slower suite).
# Set before torch is imported so worker subprocesses started by tests inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# No test may reach a model hub (huggingface_hub and transformers read this at import).
os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread in the test process itself (torch may already be imported by a plugin)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _wait_for_redis(url: str, process: subprocess.Popen, deadline_s: float = 10.0) -> bool:
    import redis

    client = redis.Redis.from_url(url)
    stop = time.monotonic() + deadline_s
    while time.monotonic() < stop and process.poll() is None:
        try:
            if client.ping():
                return True
        except redis.ConnectionError:
            time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a private redis-server (loopback, free port, temp dir, no persistence)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found on PATH (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="hc-redis-") as workdir:
        for _ in range(3):  # another process may grab the port between picking and binding
            port = free_port()
            process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    workdir,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "yes",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            url = f"redis://127.0.0.1:{port}/0"
            if _wait_for_redis(url, process):
                break
            process.kill()
            process.wait()
        else:
            pytest.fail("redis-server did not start on a free loopback port")
        try:
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def redis_client(redis_url: str):
    """A client of the session redis-server with its database flushed for this test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Endpoint URL of moto's S3-compatible server on loopback; creates no buckets.

    Sets dummy AWS credentials in the environment (inherited by worker subprocesses) so boto3
    never looks for real ones.
    """
    from moto.server import ThreadedMotoServer

    saved = {name: os.environ.get(name) for name in _AWS_ENV}
    os.environ.update(_AWS_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every tiny model (HeartMuLa, codec, encoder, transcriber), written once per session.

    Tests must not change it: copy a folder first to break it on purpose.
    """
    from shared.ml.models.tiny import write_tiny_models

    model_dir = tmp_path_factory.mktemp("tiny-models")
    write_tiny_models(model_dir, seed=0)
    return model_dir
