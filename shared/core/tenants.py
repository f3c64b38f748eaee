"""Tenants and their API keys in Redis.

A key is shown once when created and only its SHA-256 is stored (`apikey:{sha256}` → tenant),
so a leaked Redis dump holds no usable key. Keys are 256-bit random, so a fast hash is enough.
No torch: the gateway imports this.
"""

from __future__ import annotations

import hashlib
import re
import secrets

import redis

KEY_PREFIX = "hc_"
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
        pipe.execute()
        return key

    def tenant_for_key(self, key: str) -> str | None:
        """The tenant a presented key belongs to, or None for an unknown key."""
        if not key.startswith(KEY_PREFIX):
            return None
        tenant = self._redis.get(f"apikey:{hash_key(key)}")
        if tenant is None:
            return None
        return tenant.decode() if isinstance(tenant, bytes) else tenant
