"""Both object-store backends behave the same: S3 through moto's server, local in a tmp dir."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3
import pytest
import requests

from shared.core.config import Settings
from shared.core.storage import (
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StorageError,
    artifact_key,
    content_type_for,
    job_prefix,
    store_from_settings,
    upload_key,
)


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Store(request.getfixturevalue("bucket"), "pre/fix/", endpoint_url=endpoint)


def test_key_layout() -> None:
    assert artifact_key("acme", "j1", "audio.flac") == "tenants/acme/jobs/j1/audio.flac"
    assert job_prefix("acme", "j1") == "tenants/acme/jobs/j1/"
    assert upload_key("acme", "u1", "a.wav") == "tenants/acme/uploads/u1/a.wav"


def test_put_get_exists_open(store: ObjectStore, tmp_path: Path) -> None:
    key = artifact_key("acme", "j1", "tokens.npy")
    assert not store.exists(key)
    store.put_bytes(key, b"first", content_type="application/octet-stream")
    store.put_bytes(key, b"second")  # a retried job overwrites its own key
    assert store.exists(key)
    assert store.get_bytes(key) == b"second"
    source = tmp_path / "audio.flac"
    source.write_bytes(b"x" * 100_000)
    store.put_file(artifact_key("acme", "j1", "audio.flac"), source, content_type="audio/flac")
    with store.open(artifact_key("acme", "j1", "audio.flac")) as stream:
        assert stream.read() == source.read_bytes()
    store.check()


def test_missing_objects_raise(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.get_bytes("tenants/acme/jobs/none/audio.flac")
    with pytest.raises(ObjectNotFound):
        store.open("tenants/acme/jobs/none/audio.flac")


def test_delete_prefix_removes_only_that_job(store: ObjectStore) -> None:
    for job_id in ("j1", "j10", "j2"):
        for name in ("a", "b"):
            store.put_bytes(artifact_key("acme", job_id, name), b"data")
    assert store.delete_prefix(job_prefix("acme", "j1")) == 2
    assert not store.exists(artifact_key("acme", "j1", "a"))
    assert store.exists(artifact_key("acme", "j10", "a"))
    assert store.exists(artifact_key("acme", "j2", "b"))
    assert store.delete_prefix(job_prefix("acme", "nothing")) == 0


def test_local_store_streams_and_has_no_url(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("tenants/a/jobs/j/x", b"1")
    assert store.presigned_url("tenants/a/jobs/j/x") is None
    assert (tmp_path / "tenants/a/jobs/j/x").read_bytes() == b"1"
    assert [p.name for p in (tmp_path / "tenants/a/jobs/j").iterdir()] == ["x"]  # no temp left


@pytest.mark.parametrize("key", ["../escape", "tenants/../../x", "/abs", "a//b", "a/", ""])
def test_local_store_rejects_keys_outside_its_root(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        LocalStore(tmp_path).put_bytes(key, b"x")


def test_s3_keys_carry_the_prefix_and_presigned_urls_work(s3_endpoint: str, bucket: str) -> None:
    store = S3Store(bucket, "/pre/fix/", endpoint_url=s3_endpoint)
    store.put_bytes("tenants/a/jobs/j/audio.flac", b"song", content_type="audio/flac")
    raw = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    listed = raw.list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"] for item in listed] == ["pre/fix/tenants/a/jobs/j/audio.flac"]
    url = store.presigned_url("tenants/a/jobs/j/audio.flac", expires_s=60)
    assert url.startswith(s3_endpoint) and "X-Amz-Signature" in url
    reply = requests.get(url, timeout=10)
    assert reply.status_code == 200 and reply.content == b"song"
    assert reply.headers["Content-Type"] == "audio/flac"


def test_s3_check_reports_a_missing_bucket(s3_endpoint: str) -> None:
    with pytest.raises(StorageError, match="no-such-bucket"):
        S3Store("no-such-bucket", endpoint_url=s3_endpoint).check()


def test_store_from_settings(tmp_path: Path, s3_endpoint: str) -> None:
    local = store_from_settings(Settings.from_env({"HEARTCLUSTER_DATA_DIR": str(tmp_path)}))
    assert isinstance(local, LocalStore) and local.root == tmp_path / "artifacts"
    s3 = store_from_settings(
        Settings.from_env(
            {
                "HEARTCLUSTER_STORAGE_URL": "s3://bkt/p",
                "HEARTCLUSTER_S3_ENDPOINT_URL": s3_endpoint,
            }
        )
    )
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bkt", "p")


def test_content_types() -> None:
    assert content_type_for("audio.FLAC") == "audio/flac"
    assert content_type_for("audio.mp3") == "audio/mpeg"
    assert content_type_for("metadata.json") == "application/json"
    assert content_type_for("weird") == "application/octet-stream"
