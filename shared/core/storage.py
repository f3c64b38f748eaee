"""The object store for artifacts and uploads: S3 (any endpoint) or a local directory.

Both backends take keys like `tenants/{tenant}/jobs/{job_id}/audio.flac`; a configured prefix
is applied inside the store. Writes replace a whole object at once (S3 does that natively, the
local backend renames a finished temp file), so a reader never sees a half-written artifact.
No torch: the gateway imports this.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

from shared.core.config import Settings


class ObjectNotFound(KeyError):
    """No object under this key."""


class StorageError(RuntimeError):
    """The store cannot be reached or refused an operation; the message says which."""


CONTENT_TYPES = {
    ".flac": "audio/flac",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".json": "application/json",
    ".npy": "application/octet-stream",
    ".lrc": "text/plain; charset=utf-8",
    ".srt": "application/x-subrip; charset=utf-8",
    ".png": "image/png",
}


def content_type_for(name: str) -> str:
    """The Content-Type to store and serve an artifact or upload with, by its extension."""
    return CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


TOKENS = "tokens.npy"  # a song's codes, [8, T]
PREVIEW = "preview.png"  # a song's waveform over its spectrogram (shared/core/preview.py)
METADATA = "metadata.json"  # written last by every job: its presence marks the job complete


def artifact_key(tenant: str, job_id: str, name: str) -> str:
    return f"tenants/{tenant}/jobs/{job_id}/{name}"


def job_prefix(tenant: str, job_id: str) -> str:
    """Everything a job wrote (for delete_prefix after a cancel or failure)."""
    return f"tenants/{tenant}/jobs/{job_id}/"


def upload_key(tenant: str, upload_id: str, filename: str) -> str:
    return f"tenants/{tenant}/uploads/{upload_id}/{filename}"


class ObjectStore(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None: ...

    def put_file(self, key: str, path: str | Path, content_type: str | None = None) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def open(self, key: str) -> BinaryIO: ...

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None: ...

    def check(self) -> None: ...


class LocalStore:
    """Objects as files under `root` (the embedded default for one machine)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if key.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"invalid object key {key!r}")
        return self.root.joinpath(*parts)

    def _write(self, key: str, source: BinaryIO) -> None:
        """Copy into a temp file beside the target, then rename it into place."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-", delete=False) as tmp:
            try:
                shutil.copyfileobj(source, tmp)
            except BaseException:
                os.unlink(tmp.name)
                raise
        os.replace(tmp.name, target)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        self._write(key, io.BytesIO(data))

    def put_file(self, key: str, path: str | Path, content_type: str | None = None) -> None:
        with open(path, "rb") as source:
            self._write(key, source)

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as stream:
            return stream.read()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix`; returns how many."""
        if any(part in (".", "..") for part in prefix.split("/")):
            raise ValueError(f"invalid key prefix {prefix!r}")
        folder = self.root.joinpath(*prefix.split("/")[:-1])
        if not folder.is_dir():
            return 0
        deleted = 0
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.relative_to(self.root).as_posix().startswith(prefix):
                path.unlink()
                deleted += 1
        return deleted

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(key) from None

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        """Local files have no URL: the gateway streams them."""
        return None

    def check(self) -> None:
        """Raise StorageError unless the root directory exists and is writable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"local store {self.root}: {error}") from None
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"local store {self.root} is not writable")


class S3Store:
    """Objects in an S3 bucket through boto3 (AWS, MinIO, R2, Ceph, moto: any endpoint URL).

    Credentials come from boto3's usual chain (environment, config files, instance roles).
    The bucket must exist: nothing is created implicitly.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                signature_version="s3v4",
                # custom endpoints rarely resolve virtual-host bucket names
                s3={"addressing_style": "path" if endpoint_url else "auto"},
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def _key(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise ValueError(f"invalid object key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)

    def put_file(self, key: str, path: str | Path, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self._client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs=extra or None)

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as stream:
            return stream.read()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if error.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix`; returns how many."""
        deleted = 0
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix)
        )
        for page in pages:
            objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if objects:  # a listing page holds at most 1000 keys, the delete_objects limit
                self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
                )
                deleted += len(objects)
        return deleted

    def open(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            reply = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if error.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                raise ObjectNotFound(key) from None
            raise
        return reply["Body"]

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        return self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_s,
        )

    def check(self) -> None:
        """Raise StorageError unless the bucket answers with these credentials."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as error:
            raise StorageError(f"S3 bucket {self.bucket!r}: {error}") from None


def store_from_settings(settings: Settings) -> ObjectStore:
    """The store HEARTCLUSTER_STORAGE_URL names."""
    if settings.storage_scheme == "s3":
        return S3Store(
            settings.s3_bucket,
            settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
        )
    return LocalStore(settings.local_root)
