"""Tenants and their API keys in Redis.

A key is shown once when created and only its SHA-256 is stored (`apikey:{sha256}` → tenant),
so a leaked Redis dump holds no usable key. Keys are 256-bit random, so a fast hash is enough.
No torch: the gateway imports this.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time

import redis

KEY_PREFIX = "hc_"
KEY_ID_CHARS = 12  # a key's id: the start of its hash (safe to show, log and type)
RETENTION_KEY = "tenant-retention"  # tenant → days, overriding HEARTCLUSTER_RETENTION_DAYS
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def validate_tenant(name: str) -> str:
    """Tenant names become parts of Redis and object keys: lowercase letters, digits, - and _."""
    if not _TENANT.fullmatch(name):
        raise ValueError(
            f"invalid tenant name {name!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantStore:
    def __init__(self, redis_client: redis.Redis) -> None:
        self._redis = redis_client

    def create_key(self, tenant: str) -> str:
        """A new API key for `tenant` (created on first use); the only time it is visible."""
        validate_tenant(tenant)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(key)
        pipe = self._redis.pipeline()
        pipe.set(f"apikey:{digest}", tenant)
        pipe.sadd(f"tenant-keys:{tenant}", digest)
        pipe.hset(f"tenant-key-created:{tenant}", digest, repr(time.time()))
        pipe.execute()
        return key

    def list_keys(self, tenant: str) -> list[dict[str, object]]:
        """The tenant's keys as {"id", "created_at"} (never the keys themselves), oldest first."""
        digests = sorted(_text(d) for d in self._redis.smembers(f"tenant-keys:{tenant}"))
        created = self._redis.hmget(f"tenant-key-created:{tenant}", digests) if digests else []
        keys = [
            {"id": digest[:KEY_ID_CHARS], "created_at": float(at) if at else None}
            for digest, at in zip(digests, created, strict=True)
        ]
        return sorted(keys, key=lambda key: (key["created_at"] or 0.0, key["id"]))

    def revoke_key(self, tenant: str, key_id: str) -> None:
        """Stop a key working at once; KeyError naming the id when the tenant has no such key."""
        digest = self._digest(tenant, key_id)
        pipe = self._redis.pipeline()
        pipe.delete(f"apikey:{digest}")
        pipe.srem(f"tenant-keys:{tenant}", digest)
        pipe.hdel(f"tenant-key-created:{tenant}", digest)
        pipe.execute()

    def rotate_key(self, tenant: str, key_id: str) -> str:
        """A new key for the tenant, and the old one revoked; the new key is shown once."""
        self._digest(tenant, key_id)  # refuse an unknown id before creating anything
        key = self.create_key(tenant)
        self.revoke_key(tenant, key_id)
        return key

    def _digest(self, tenant: str, key_id: str) -> str:
        matches = [
            _text(d)
            for d in self._redis.smembers(f"tenant-keys:{tenant}")
            if key_id and _text(d).startswith(key_id)
        ]
        if len(matches) != 1:
            raise KeyError(f"tenant {tenant!r} has no key with id {key_id!r}")
        return matches[0]

    def retention_days(self, tenant: str) -> float | None:
        """The tenant's own retention in days, or None for the cluster default."""
        raw = self._redis.hget(RETENTION_KEY, tenant)
        return float(raw) if raw is not None else None

    def set_retention_days(self, tenant: str, days: float | None) -> None:
        """Days >= 0 (0 keeps everything), or None to follow the cluster default."""
        validate_tenant(tenant)
        if days is None:
            self._redis.hdel(RETENTION_KEY, tenant)
        elif days < 0:
            raise ValueError(f"retention must be 0 or more days, not {days}")
        else:
            self._redis.hset(RETENTION_KEY, tenant, repr(float(days)))

    def tenant_for_key(self, key: str) -> str | None:
        """The tenant a presented key belongs to, or None for an unknown key."""
        if not key.startswith(KEY_PREFIX):
            return None
        tenant = self._redis.get(f"apikey:{hash_key(key)}")
        return None if tenant is None else _text(tenant)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
