"""What each tenant may take of the cluster, and what it has taken: quotas and usage in Redis.

The operator sets a tenant's quotas (`heartcluster tenants set`); a quota it never set follows
the cluster default (`HEARTCLUSTER_TENANT_*`); 0 means unlimited. Usage:

- running and queued jobs: the tenant's job sets, kept exact by the job store's scripts;
- audio seconds per UTC day: reserved at submit from the requested length (`duration_s`, or
  `end_s - start_s` of an inpaint) and given back when the job ends failed or cancelled, so a
  tenant can never queue more than its day's budget, and pays only for what it got;
- fine-tune GPU-seconds per UTC day: counted when a train-queue job ends (its run time); a
  train-queue submit is refused once the day's total reached the limit;
- storage bytes: uploads and succeeded jobs' artifacts, counted when written, given back when
  deleted;
- submits: a token bucket per tenant (capacity and refill per minute), one Lua step.

The gateway's checks and the reservation are separate steps, so submits racing on several
gateways can overshoot a limit by the submits in flight. No torch: the gateway imports this.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields, replace
from typing import Any

import redis

from shared.core.config import Settings
from shared.core.jobs import RESERVED_AUDIO_KEY, storage_key, tenant_queued_key, tenant_running_key

QUOTAS_PREFIX = "tenant-quotas:"  # hash per tenant: quota name -> value (only those set)
DAY_S = 24 * 3600


@dataclass(frozen=True)
class Quotas:
    """A tenant's limits; 0 is unlimited (weight: its share of contended queues, at least 1)."""

    weight: float = 1.0
    max_running: int = 0
    max_queued: int = 0
    audio_seconds_per_day: float = 0.0
    finetune_gpu_seconds_per_day: float = 0.0
    storage_bytes: int = 0
    submits_per_minute: float = 0.0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{item.name} must be a number >= 0, not {value!r}")
            if item.type == "int" and not float(value).is_integer():
                raise ValueError(f"{item.name} must be a whole number, not {value!r}")
        if self.weight < 1:
            raise ValueError(f"weight must be at least 1, not {self.weight!r}")


def default_quotas(settings: Settings) -> Quotas:
    """The quotas of a tenant the operator never set any for (HEARTCLUSTER_TENANT_*)."""
    return Quotas(
        weight=settings.tenant_weight,
        max_running=settings.tenant_max_running,
        max_queued=settings.tenant_max_queued,
        audio_seconds_per_day=settings.tenant_audio_seconds_per_day,
        finetune_gpu_seconds_per_day=settings.tenant_finetune_gpu_seconds_per_day,
        storage_bytes=settings.tenant_storage_bytes,
        submits_per_minute=settings.tenant_submits_per_minute,
    )


QUOTA_NAMES = tuple(item.name for item in fields(Quotas))


class QuotaExceeded(Exception):
    """A submit over a limit: `field` names the quota; `retry_after_s` when waiting helps."""

    def __init__(self, field: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.retry_after_s = retry_after_s


def quotas_key(tenant: str) -> str:
    return QUOTAS_PREFIX + tenant


def audio_key(tenant: str, day: str) -> str:
    return f"usage-audio:{tenant}:{day}"


def gpu_key(tenant: str, day: str) -> str:
    return f"usage-finetune-gpu:{tenant}:{day}"


def rate_key(tenant: str) -> str:
    return f"submit-bucket:{tenant}"


def today(now: float | None = None) -> str:
    return time.strftime("%Y%m%d", time.gmtime(time.time() if now is None else now))


def seconds_to_midnight(now: float | None = None) -> float:
    now = time.time() if now is None else now
    return DAY_S - now % DAY_S


def audio_seconds(params: dict[str, Any]) -> float:
    """Seconds of audio a job generates, from its params (0 for jobs that generate none)."""
    if "duration_s" in params:
        return float(params["duration_s"])
    if "start_s" in params and "end_s" in params:
        return max(0.0, float(params["end_s"]) - float(params["start_s"]))
    return 0.0


# KEYS: bucket. ARGV: capacity (= refill per minute). Takes one token; returns nil when taken,
# else the seconds until one is there (as text).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity = tonumber(ARGV[1])
local rate = capacity / 60
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local wait = nil
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at',
  string.format('%.6f', now))
redis.call('EXPIRE', KEYS[1], math.ceil(60 / math.max(rate * 60, 1)) + 60)
if wait then return string.format('%.3f', wait) end
return nil
"""


class QuotaStore:
    def __init__(self, redis_client: redis.Redis, defaults: Quotas) -> None:
        self._redis = redis_client
        self.defaults = defaults
        self._take = redis_client.register_script(_TAKE)

    def get(self, tenant: str) -> Quotas:
        """The tenant's quotas: those the operator set, the defaults for the rest."""
        return replace(self.defaults, **self.own(tenant))

    def own(self, tenant: str) -> dict[str, float]:
        """Only the quotas the operator set for this tenant."""
        return _own(self._redis.hgetall(quotas_key(tenant)))

    def standing(self, tenant: str) -> tuple[Quotas, dict[str, float]]:
        """The tenant's quotas and usage in one round trip: what every submit checks."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(quotas_key(tenant))
        _read_usage(pipe, tenant)
        own, *counts = pipe.execute()
        return replace(self.defaults, **_own(own)), _usage(counts)

    def set(self, tenant: str, values: dict[str, float | None]) -> Quotas:
        """Set (a number) or reset to the default (None) some quotas; ValueError naming a bad
        one, before anything is written."""
        unknown = set(values) - set(QUOTA_NAMES)
        if unknown:
            raise ValueError(f"unknown quota {sorted(unknown)[0]!r}; known: {list(QUOTA_NAMES)}")
        kept = {k: v for k, v in values.items() if v is not None}
        merged = replace(self.get(tenant), **_typed(kept))  # validates
        pipe = self._redis.pipeline(transaction=True)
        for name in kept:
            pipe.hset(quotas_key(tenant), name, repr(getattr(merged, name)))
        cleared = [name for name in values if values[name] is None]
        if cleared:
            pipe.hdel(quotas_key(tenant), *cleared)
        pipe.execute()
        return self.get(tenant)

    # -- usage ----------------------------------------------------------------------------

    def usage(self, tenant: str) -> dict[str, float]:
        pipe = self._redis.pipeline(transaction=False)
        _read_usage(pipe, tenant)
        return _usage(pipe.execute())

    @staticmethod
    def reserve_audio(
        tenant: str, job_id: str, seconds: float, transaction: redis.client.Pipeline
    ) -> None:
        """Count a submitted job's audio seconds today, in the transaction that records the job;
        given back if it fails or is cancelled (by the job store's scripts)."""
        if seconds <= 0:
            return
        key = audio_key(tenant, today())
        transaction.incrbyfloat(key, seconds)
        transaction.expire(key, 2 * DAY_S)
        transaction.hset(RESERVED_AUDIO_KEY, job_id, f"{key}|{seconds!r}")

    def add_gpu_seconds(self, tenant: str, seconds: float) -> None:
        key = gpu_key(tenant, today())
        pipe = self._redis.pipeline(transaction=True)
        pipe.incrbyfloat(key, max(0.0, seconds))
        pipe.expire(key, 2 * DAY_S)
        pipe.execute()

    def submits_held(self, tenant: str, quotas: Quotas) -> float:
        """How many submits the token bucket holds back now (0 when full or unlimited)."""
        if quotas.submits_per_minute <= 0:
            return 0.0
        tokens, at = self._redis.hmget(rate_key(tenant), "tokens", "at")
        if tokens is None or at is None:
            return 0.0
        seconds, micros = self._redis.time()
        refill = max(0.0, seconds + micros / 1e6 - float(at)) * quotas.submits_per_minute / 60
        full = quotas.submits_per_minute
        return round(max(0.0, full - min(full, float(tokens) + refill)), 3)

    # -- admission ------------------------------------------------------------------------

    def take_submit(self, tenant: str, quotas: Quotas) -> None:
        """One submit from the tenant's token bucket; QuotaExceeded when it is empty."""
        if quotas.submits_per_minute <= 0:
            return
        wait = self._take(keys=[rate_key(tenant)], args=[quotas.submits_per_minute])
        if wait is not None:
            raise QuotaExceeded(
                "submits_per_minute",
                f"more than {quotas.submits_per_minute:g} submits a minute "
                "(quota submits_per_minute)",
                float(wait),
            )

    @staticmethod
    def admit(
        quotas: Quotas, used: dict[str, float], jobs: int, audio_s: float, train_jobs: int
    ) -> None:
        """May a tenant with these quotas and usage (`standing`) queue `jobs` more jobs
        generating `audio_s` seconds of audio, of which `train_jobs` on the train queue?
        QuotaExceeded naming the first limit hit."""
        if quotas.max_queued and used["queued"] + jobs > quotas.max_queued:
            raise QuotaExceeded(
                "max_queued",
                f"{used['queued']} jobs queued and {jobs} more would pass the limit of "
                f"{quotas.max_queued} (quota max_queued)",
            )
        if quotas.storage_bytes and used["storage_bytes"] >= quotas.storage_bytes:
            raise QuotaExceeded(
                "storage_bytes",
                f"{used['storage_bytes']} bytes stored, the limit is {quotas.storage_bytes} "
                "(quota storage_bytes); delete jobs or uploads first",
            )
        limit = quotas.audio_seconds_per_day
        if limit and audio_s > 0 and used["audio_seconds_today"] + audio_s > limit:
            raise QuotaExceeded(
                "audio_seconds_per_day",
                f"{used['audio_seconds_today']:g} of {limit:g} audio seconds used today (UTC) "
                f"and this asks {audio_s:g} more (quota audio_seconds_per_day)",
                seconds_to_midnight(),
            )
        limit = quotas.finetune_gpu_seconds_per_day
        if limit and train_jobs and used["finetune_gpu_seconds_today"] >= limit:
            raise QuotaExceeded(
                "finetune_gpu_seconds_per_day",
                f"{used['finetune_gpu_seconds_today']:g} of {limit:g} fine-tune GPU-seconds used "
                "today (UTC) (quota finetune_gpu_seconds_per_day)",
                seconds_to_midnight(),
            )

    def admit_upload(self, tenant: str, quotas: Quotas, size: int) -> None:
        """May the tenant store `size` more bytes? QuotaExceeded otherwise."""
        used = self.usage(tenant)["storage_bytes"]
        if quotas.storage_bytes and used + size > quotas.storage_bytes:
            raise QuotaExceeded(
                "storage_bytes",
                f"{used} bytes stored and this upload's {size} would pass the limit of "
                f"{quotas.storage_bytes} (quota storage_bytes)",
            )


def _own(raw: dict[bytes, bytes]) -> dict[str, Any]:
    return _typed({_text(k): float(v) for k, v in raw.items() if _text(k) in QUOTA_NAMES})


def _read_usage(pipe: redis.client.Pipeline, tenant: str) -> None:
    """Queue the reads `_usage` turns into a tenant's usage."""
    day = today()
    pipe.scard(tenant_running_key(tenant))
    pipe.scard(tenant_queued_key(tenant))
    pipe.get(audio_key(tenant, day))
    pipe.get(gpu_key(tenant, day))
    pipe.get(storage_key(tenant))


def _usage(counts: list[Any]) -> dict[str, float]:
    running, queued, audio, gpu, storage = counts
    return {
        "running": int(running),
        "queued": int(queued),
        "audio_seconds_today": round(max(0.0, float(audio or 0)), 3),
        "finetune_gpu_seconds_today": round(float(gpu or 0), 3),
        "storage_bytes": max(0, int(storage or 0)),
    }


def _typed(values: dict[str, float]) -> dict[str, Any]:
    """Whole-number quotas as ints (their dataclass fields are ints)."""
    ints = {item.name for item in fields(Quotas) if item.type == "int"}
    return {k: int(v) if k in ints and float(v).is_integer() else v for k, v in values.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
