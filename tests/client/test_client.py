"""api.client.client.Client against the gateway served over real HTTP on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import requests
import soundfile
from werkzeug.serving import make_server

from api.client.client import ApiError, Client, parse_sse
from api.gateway import create_app
from shared.core.config import Settings
from shared.core.jobs import JobStore
from shared.core.storage import LocalStore, S3Store, artifact_key
from shared.core.tenants import TenantStore
from tests.support.fakes import RecordingCelery
from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]


def serve(app) -> tuple[str, object]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings.from_env(
        {"HEARTCLUSTER_REDIS_URL": redis_url, "HEARTCLUSTER_DATA_DIR": str(tmp_path)}
    )


@pytest.fixture
def gateway(settings, redis_client, request):
    """(client of tenant acme, job store, object store) for the store named by the param."""
    if getattr(request, "param", "local") == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"client-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=bucket
        )
        store = S3Store(bucket, "p", endpoint_url=endpoint)
    else:
        store = LocalStore(settings.local_root)
    app = create_app(settings, redis_client, store, RecordingCelery())
    url, server = serve(app)
    key = TenantStore(redis_client).create_key("acme")
    yield Client(url, key, timeout_s=10), JobStore(redis_client), store
    server.shutdown()


def test_submit_get_list_cancel(gateway) -> None:
    client, _, _ = gateway
    job = client.submit("generate", {"tags": "piano", "seed": 1}, idempotency_key="once")
    assert job["state"] == "queued"
    assert client.submit("generate", {"tags": "piano", "seed": 1}, "once")["id"] == job["id"]
    assert client.get(job["id"]) == job
    page = client.list(state="queued", limit=10)
    assert [j["id"] for j in page["jobs"]] == [job["id"]] and page["next_cursor"] is None
    assert client.cancel(job["id"])["state"] == "cancelled"


def test_errors_carry_status_code_and_field(gateway) -> None:
    client, _, _ = gateway
    with pytest.raises(ApiError) as caught:
        client.submit("generate", {"tags": "piano", "temperature": 9})
    assert (caught.value.status, caught.value.code, caught.value.field) == (
        422,
        "invalid_params",
        "params.temperature",
    )
    with pytest.raises(ApiError) as caught:
        client.get("nope")
    assert caught.value.status == 404
    with pytest.raises(ApiError) as caught:
        Client(client.base_url, "hc_wrong").list()
    assert caught.value.status == 401 and "unknown API key" in str(caught.value)


def test_events_follow_the_job_to_its_end(gateway) -> None:
    client, jobs, _ = gateway
    job_id = client.submit("generate", {"tags": "piano"})["id"]
    events = client.events(job_id)
    assert next(events)["job"]["state"] == "queued"
    jobs.start(job_id)
    jobs.progress(job_id, 25.0, "generating")
    jobs.fail(job_id, "invalid_params", "prompt too long")
    rest = list(events)
    assert [(e["event"], e["job"]["state"]) for e in rest] == [
        ("state", "running"),
        ("progress", "running"),
        ("state", "failed"),
    ]
    assert rest[-1]["job"]["error"] == {"code": "invalid_params", "message": "prompt too long"}


@pytest.mark.parametrize("gateway", ["local", "s3"], indirect=True)
def test_upload_and_download(gateway, tmp_path: Path) -> None:
    client, jobs, store = gateway
    audio = tmp_path / "in.flac"
    soundfile.write(audio, np.zeros((4800, 2), dtype=np.float32), 48000)
    upload = client.upload(audio)
    assert upload["kind"] == "audio" and upload["duration_s"] == 0.1
    job_id = client.submit("encode", {"upload_id": upload["id"]})["id"]
    jobs.start(job_id)
    payload = os.urandom(300_000)
    store.put_bytes(artifact_key("acme", job_id, "tokens.npy"), payload)
    jobs.succeed(job_id, ["tokens.npy"])
    saved = client.download(job_id, "tokens.npy", tmp_path / "out" / "tokens.npy")
    assert saved.read_bytes() == payload
    assert not (tmp_path / "out" / "tokens.npy.part").exists()
    with pytest.raises(ApiError) as caught:
        client.download(job_id, "audio.flac", tmp_path / "x.flac")
    assert caught.value.status == 404 and not (tmp_path / "x.flac").exists()


def test_parse_sse_handles_comments_and_multiline_data() -> None:
    lines = [": keep-alive", "", "event: state", 'data: {"a":', "data: 1}", "", 'data: {"b": 2}']
    assert list(parse_sse(iter(lines))) == [{"a": 1}, {"b": 2}]


def test_python_m_api_serves_the_gateway(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HEARTCLUSTER_REDIS_URL": redis_url,
        "HEARTCLUSTER_DATA_DIR": str(tmp_path),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "api.gateway", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert reply.json() == {"status": "ok"}
        assert requests.get(f"http://127.0.0.1:{port}/openapi.json").json()["openapi"]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_cli_submit_sends_each_kinds_params(gateway, tmp_path: Path, capsys) -> None:
    from api.client.cli import main

    client, jobs, store = gateway
    common = ["--url", client.base_url, "--api-key", client.api_key]
    assert main(["submit", "generate", "--tags", "piano", "--duration", "2", *common]) == 0
    song_id = capsys.readouterr().out.strip()
    assert jobs.get(song_id).params["duration_s"] == 2.0

    wav = tmp_path / "take.wav"
    soundfile.write(wav, np.zeros((8000, 2), dtype=np.float32), 8000)
    assert main(["submit", "transcribe", "--audio", str(wav), "--language", "en", *common]) == 0
    transcribe = jobs.get(capsys.readouterr().out.strip())
    assert transcribe.type == "transcribe" and transcribe.params["language"] == "en"
    assert transcribe.params["upload_id"]

    args = ["submit", "inpaint", "--source-job-id", song_id, "--start", "0", "--end", "1"]
    assert main([*args, *common]) != 0  # the song has not finished: refused, field named
    assert "params.source_job_id" in capsys.readouterr().err
