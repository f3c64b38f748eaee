"""Cluster settings: every `HEARTCLUSTER_*` environment variable is read and validated here.

Gateway, workers and the CLI all build one `Settings` at start-up, so a typo or a bad value
stops the process at once with the variable named, instead of failing on the first job.
No torch: the gateway imports this.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from shared.core.lora_targets import LORA_PROJECTIONS, LORA_TARGETS

PREFIX = "HEARTCLUSTER_"
DTYPES = ("auto", "bf16", "fp16", "fp32")
LEASE_HEARTBEATS = 3  # heartbeats per lease period, at least

T = TypeVar("T")


class SettingsError(ValueError):
    """A `HEARTCLUSTER_*` variable is missing or invalid; the message names it."""


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str = ""  # empty: file://{data_dir}/artifacts (filled in by from_env)
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    model_dir: Path | None = None
    model_version: str | None = None
    device: str | None = None
    dtype: str | None = None
    engine_max_rows: int = 16
    # the engine's frame step: torch.compile'd (one variant per step shape, compiled when first
    # met), and on CUDA replayed as one CUDA graph per shape; off until measured on a GPU
    engine_compile: bool = False
    engine_cuda_graphs: bool = False
    # LoRA adapters a GPU worker keeps on the device (one batch mixes them), the highest rank
    # it serves (smaller ranks are zero-padded) and the projections it can adapt
    adapter_slots: int = 8
    adapter_max_rank: int = 64
    adapter_targets: tuple[str, ...] = LORA_PROJECTIONS
    max_duration_s: float = 600.0
    max_lyrics_chars: int = 6000
    max_tags: int = 32
    max_tag_bytes: int = 100  # one tag, UTF-8
    max_tags_bytes: int = 1000  # all tags with their commas, UTF-8
    max_json_bytes: int = 256 * 1024  # a JSON request body (6,000 escaped emoji is ~72 KiB)
    max_json_depth: int = 32  # nesting of a JSON request body
    max_filename_chars: int = 200  # an upload's file name (file systems stop at 255 bytes)
    max_upload_channels: int = 2
    max_upload_sample_rate: int = 96_000
    max_decoded_bytes: int = 512 * 1024 * 1024  # an upload decoded to float32, from its header
    max_upload_bytes: int = 50 * 1024 * 1024
    max_upload_seconds: float = 600.0
    max_attempts: int = 3
    job_time_limit_s: int = 3600
    train_time_limit_s: int = 72 * 3600  # a fine-tune (train queue) runs overnight or longer
    # A running job's lease lasts lease_s and its worker renews it every heartbeat_s, so a lost
    # worker's jobs go back to the queue within about lease_s + heartbeat_s.
    lease_s: float = 15.0
    heartbeat_s: float = 3.0
    # A stopping worker lets running jobs finish this long, then hands them back to the queue.
    stop_grace_s: float = 5.0
    # Socket timeout of every Redis client, and how long a finished job's state write is retried
    # while Redis is away (past it, the lease expires and the job runs again).
    redis_timeout_s: float = 5.0
    redis_retry_s: float = 120.0
    data_dir: Path = Path("heartcluster-data")
    # batches, webhooks and retention
    max_batch_items: int = 10_000
    max_batch_bytes: int = 64 * 1024 * 1024  # a batch body (JSON or JSONL)
    webhook_backoff_s: float = 5.0  # the first retry's delay; each retry doubles it
    webhook_backoff_max_s: float = 3600.0  # the longest delay between two attempts
    webhook_retry_for_s: float = 3 * 24 * 3600.0  # retried for this long, then failed
    webhook_timeout_s: float = 10.0  # one delivery attempt
    webhook_allow_private: bool = False  # targets on loopback/private/link-local addresses
    background_poll_s: float = 1.0  # workers look for finished jobs and due deliveries
    retention_days: float = 0.0  # finished jobs, uploads and batches older go; 0 keeps all
    retention_sweep_s: float = 3600.0
    # A worker's Prometheus /metrics port; taken, the next free of METRICS_PORT_SPAN ports (a
    # machine runs several workers); 0 turns worker metrics off.
    metrics_port: int = 9464
    # fine-tune datasets: items per dataset, seconds per item (longer ones are refused; those
    # longer than the context are cut into pieces at training time), seconds in all
    max_dataset_items: int = 1000
    max_dataset_item_seconds: float = 1200.0
    max_dataset_seconds: float = 200 * 3600.0
    # each tenant's quotas unless the operator set its own (`heartcluster tenants set`); 0 is
    # unlimited (shared/core/quotas.py)
    tenant_weight: float = 1.0
    tenant_max_running: int = 0
    tenant_max_queued: int = 0
    tenant_audio_seconds_per_day: float = 0.0
    tenant_finetune_gpu_seconds_per_day: float = 0.0
    tenant_storage_bytes: int = 0
    tenant_submits_per_minute: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from `HEARTCLUSTER_*` variables (default: os.environ); raises SettingsError."""
        reader = _Reader(os.environ if env is None else env)
        data_dir = Path(reader.get("DATA_DIR", str(cls.data_dir), str)).expanduser().resolve()
        settings = cls(
            redis_url=reader.get("REDIS_URL", cls.redis_url, _redis_url),
            storage_url=reader.get("STORAGE_URL", (data_dir / "artifacts").as_uri(), _storage_url),
            s3_endpoint_url=reader.get("S3_ENDPOINT_URL", None, _http_url),
            s3_region=reader.get("S3_REGION", cls.s3_region, str),
            model_dir=reader.get("MODEL_DIR", None, lambda v: Path(v).expanduser().resolve()),
            model_version=reader.get("MODEL_VERSION", None, str),
            device=reader.get("DEVICE", None, str),
            dtype=reader.get("DTYPE", None, _dtype),
            engine_max_rows=reader.get("ENGINE_MAX_ROWS", cls.engine_max_rows, _positive(int)),
            engine_compile=reader.get("ENGINE_COMPILE", cls.engine_compile, _bool),
            engine_cuda_graphs=reader.get("ENGINE_CUDA_GRAPHS", cls.engine_cuda_graphs, _bool),
            adapter_slots=reader.get("ADAPTER_SLOTS", cls.adapter_slots, _non_negative_int),
            adapter_max_rank=reader.get("ADAPTER_MAX_RANK", cls.adapter_max_rank, _positive(int)),
            adapter_targets=reader.get("ADAPTER_TARGETS", cls.adapter_targets, _lora_targets),
            max_duration_s=reader.get("MAX_DURATION_S", cls.max_duration_s, _positive(float)),
            max_lyrics_chars=reader.get("MAX_LYRICS_CHARS", cls.max_lyrics_chars, _positive(int)),
            max_tags=reader.get("MAX_TAGS", cls.max_tags, _positive(int)),
            max_tag_bytes=reader.get("MAX_TAG_BYTES", cls.max_tag_bytes, _positive(int)),
            max_tags_bytes=reader.get("MAX_TAGS_BYTES", cls.max_tags_bytes, _positive(int)),
            max_json_bytes=reader.get("MAX_JSON_BYTES", cls.max_json_bytes, _positive(int)),
            max_json_depth=reader.get("MAX_JSON_DEPTH", cls.max_json_depth, _positive(int)),
            max_filename_chars=reader.get(
                "MAX_FILENAME_CHARS", cls.max_filename_chars, _positive(int)
            ),
            max_upload_channels=reader.get(
                "MAX_UPLOAD_CHANNELS", cls.max_upload_channels, _positive(int)
            ),
            max_upload_sample_rate=reader.get(
                "MAX_UPLOAD_SAMPLE_RATE", cls.max_upload_sample_rate, _positive(int)
            ),
            max_decoded_bytes=reader.get(
                "MAX_DECODED_BYTES", cls.max_decoded_bytes, _positive(int)
            ),
            max_upload_bytes=reader.get("MAX_UPLOAD_BYTES", cls.max_upload_bytes, _positive(int)),
            max_upload_seconds=reader.get(
                "MAX_UPLOAD_SECONDS", cls.max_upload_seconds, _positive(float)
            ),
            max_attempts=reader.get("MAX_ATTEMPTS", cls.max_attempts, _positive(int)),
            job_time_limit_s=reader.get("JOB_TIME_LIMIT_S", cls.job_time_limit_s, _positive(int)),
            train_time_limit_s=reader.get(
                "TRAIN_TIME_LIMIT_S", cls.train_time_limit_s, _positive(int)
            ),
            lease_s=reader.get("LEASE_S", cls.lease_s, _positive(float)),
            heartbeat_s=reader.get("HEARTBEAT_S", cls.heartbeat_s, _positive(float)),
            stop_grace_s=reader.get("STOP_GRACE_S", cls.stop_grace_s, _non_negative),
            redis_timeout_s=reader.get("REDIS_TIMEOUT_S", cls.redis_timeout_s, _positive(float)),
            redis_retry_s=reader.get("REDIS_RETRY_S", cls.redis_retry_s, _positive(float)),
            metrics_port=reader.get("METRICS_PORT", cls.metrics_port, _port),
            data_dir=data_dir,
            max_batch_items=reader.get("MAX_BATCH_ITEMS", cls.max_batch_items, _positive(int)),
            max_batch_bytes=reader.get("MAX_BATCH_BYTES", cls.max_batch_bytes, _positive(int)),
            webhook_backoff_s=reader.get(
                "WEBHOOK_BACKOFF_S", cls.webhook_backoff_s, _positive(float)
            ),
            webhook_backoff_max_s=reader.get(
                "WEBHOOK_BACKOFF_MAX_S", cls.webhook_backoff_max_s, _positive(float)
            ),
            webhook_retry_for_s=reader.get(
                "WEBHOOK_RETRY_FOR_S", cls.webhook_retry_for_s, _positive(float)
            ),
            webhook_timeout_s=reader.get(
                "WEBHOOK_TIMEOUT_S", cls.webhook_timeout_s, _positive(float)
            ),
            webhook_allow_private=reader.get(
                "WEBHOOK_ALLOW_PRIVATE", cls.webhook_allow_private, _bool
            ),
            max_dataset_items=reader.get(
                "MAX_DATASET_ITEMS", cls.max_dataset_items, _positive(int)
            ),
            max_dataset_item_seconds=reader.get(
                "MAX_DATASET_ITEM_SECONDS", cls.max_dataset_item_seconds, _positive(float)
            ),
            max_dataset_seconds=reader.get(
                "MAX_DATASET_SECONDS", cls.max_dataset_seconds, _positive(float)
            ),
            background_poll_s=reader.get(
                "BACKGROUND_POLL_S", cls.background_poll_s, _positive(float)
            ),
            retention_days=reader.get("RETENTION_DAYS", cls.retention_days, _non_negative),
            retention_sweep_s=reader.get(
                "RETENTION_SWEEP_S", cls.retention_sweep_s, _positive(float)
            ),
            tenant_weight=reader.get("TENANT_WEIGHT", cls.tenant_weight, _at_least_one),
            tenant_max_running=reader.get(
                "TENANT_MAX_RUNNING", cls.tenant_max_running, _non_negative_int
            ),
            tenant_max_queued=reader.get(
                "TENANT_MAX_QUEUED", cls.tenant_max_queued, _non_negative_int
            ),
            tenant_audio_seconds_per_day=reader.get(
                "TENANT_AUDIO_SECONDS_PER_DAY", cls.tenant_audio_seconds_per_day, _non_negative
            ),
            tenant_finetune_gpu_seconds_per_day=reader.get(
                "TENANT_FINETUNE_GPU_SECONDS_PER_DAY",
                cls.tenant_finetune_gpu_seconds_per_day,
                _non_negative,
            ),
            tenant_storage_bytes=reader.get(
                "TENANT_STORAGE_BYTES", cls.tenant_storage_bytes, _non_negative_int
            ),
            tenant_submits_per_minute=reader.get(
                "TENANT_SUBMITS_PER_MINUTE", cls.tenant_submits_per_minute, _non_negative
            ),
        )
        if settings.lease_s < LEASE_HEARTBEATS * settings.heartbeat_s:
            raise SettingsError(
                f"{PREFIX}LEASE_S={settings.lease_s} must be at least {LEASE_HEARTBEATS} x "
                f"{PREFIX}HEARTBEAT_S={settings.heartbeat_s}: a lease must outlive a missed beat"
            )
        if settings.s3_endpoint_url and settings.storage_scheme != "s3":
            raise SettingsError(
                f"{PREFIX}S3_ENDPOINT_URL is set but {PREFIX}STORAGE_URL is not an s3:// URL"
            )
        return settings

    @property
    def storage_scheme(self) -> str:
        """`s3` or `file`."""
        return urlparse(self.storage_url).scheme

    @property
    def s3_bucket(self) -> str:
        return urlparse(self.storage_url).netloc

    @property
    def s3_prefix(self) -> str:
        """Key prefix inside the bucket, without slashes at either end ('' for none)."""
        return urlparse(self.storage_url).path.strip("/")

    @property
    def local_root(self) -> Path:
        """The directory of a file:// store."""
        return Path(urlparse(self.storage_url).path)


class _Reader:
    """Reads one variable at a time and turns any parse failure into a SettingsError."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self._env.get(PREFIX + name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except (ValueError, TypeError) as error:
            raise SettingsError(f"{PREFIX}{name}={raw!r}: {error}") from None


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(value: str) -> T:
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"expected a positive {kind.__name__}") from None
        if not number > 0:  # type: ignore[operator]
            raise ValueError(f"expected a positive {kind.__name__}")
        return number

    return parse


def _non_negative(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("expected a number >= 0")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("expected a TCP port, 0-65535 (0: off)")
    return number


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("expected a whole number >= 0") from None
    if number < 0:
        raise ValueError("expected a whole number >= 0")
    return number


def _at_least_one(value: str) -> float:
    number = float(value)
    if not number >= 1:
        raise ValueError("expected a number >= 1")
    return number


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _lora_targets(value: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"expected a comma list of {', '.join(LORA_TARGETS)}; got {unknown}")
    return targets


def _redis_url(value: str) -> str:
    if urlparse(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return value


def _http_url(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("expected an http:// or https:// URL")
    return value


def _storage_url(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError("expected s3://BUCKET/PREFIX (the bucket is missing)")
        return value
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError("expected file:///ABSOLUTE/PATH")
        return value
    raise ValueError("expected s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH")


def _dtype(value: str) -> str:
    if value not in DTYPES:
        raise ValueError(f"expected one of {', '.join(DTYPES)}")
    return value
