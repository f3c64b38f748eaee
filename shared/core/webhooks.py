"""Signed webhooks: tenant secrets and endpoints, the target check, and the delivery outbox.

Signing follows Standard Webhooks: headers `webhook-id`, `webhook-timestamp` and
`webhook-signature` = `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`, keyed with the bytes of
the tenant's `whsec_`-prefixed base64 secret. After a rotation the previous secret signs too
(space-separated signatures) for ROTATION_GRACE_S, so receivers can switch without losing events.

The outbox lives in Redis so any worker process can deliver: `webhook-due` is a sorted set of
delivery ids scored by when each is due; a claim (one Lua script) moves the first due id to
now + a lease, so a worker that dies mid-delivery only delays it until the lease runs out.
Events are emitted by a sweep over `webhook-watch` (the jobs and batches that have a target,
added at submit before anything is queued): one script removes the subject from the watch set
and writes its delivery, so each event is created exactly once however many workers sweep, and
a worker dying anywhere leaves the subject watched for the next sweep. No torch.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import redis

from shared.core.jobs import run_script

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
ROTATION_GRACE_S = 24 * 3600
TIMESTAMP_TOLERANCE_S = 5 * 60  # receivers refuse older or newer timestamps (replays)
RECORD_TTL_S = 30 * 24 * 3600  # a settled delivery stays visible this long
MAX_ATTEMPTS_SHOWN = 20  # the attempts list keeps the last ones; `attempt_count` counts all
MAX_URL_CHARS = 2000
EVENTS = ("job.succeeded", "job.failed", "job.cancelled", "batch.completed")

WATCH_KEY = "webhook-watch"
DUE_KEY = "webhook-due"


def secret_key(tenant: str) -> str:
    return f"webhook-secret:{tenant}"


def endpoint_key(tenant: str) -> str:
    return f"webhook-endpoint:{tenant}"


def target_key(subject: str) -> str:
    return f"webhook-target:{subject}"


def delivery_key(delivery_id: str) -> str:
    return f"webhook-delivery:{delivery_id}"


def tenant_deliveries_key(tenant: str) -> str:
    return f"tenant-webhook-deliveries:{tenant}"


def subject_deliveries_key(subject: str) -> str:
    return f"webhook-deliveries:{subject}"


def job_subject(job_id: str) -> str:
    return f"job:{job_id}"


def batch_subject(batch_id: str) -> str:
    return f"batch:{batch_id}"


# ----- signing ----------------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of `msg_id.timestamp.body`."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    content = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def signed_headers(signing: list[str], msg_id: str, body: bytes, now: float) -> dict[str, str]:
    timestamp = int(now)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in signing),
        "content-type": "application/json",
    }


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """What a receiver does: a fresh timestamp and one matching `v1` signature."""
    lower = {name.lower(): value for name, value in headers.items()}
    try:
        msg_id, timestamp = lower["webhook-id"], int(lower["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > TIMESTAMP_TOLERANCE_S:
        return False
    expected = sign(secret, msg_id, timestamp, body)
    return any(
        hmac.compare_digest(expected, candidate)
        for candidate in lower.get("webhook-signature", "").split()
    )


# ----- targets ----------------------------------------------------------------------------------


class TargetRefused(ValueError):
    """A webhook URL that is malformed or points inside the operator's network."""


def check_target(url: str, allow_private: bool) -> None:
    """Refuse non-HTTP URLs and, unless allowed, hosts resolving to a non-global address
    (loopback, private, link-local, ...): a webhook must not reach inside the cluster."""
    parsed = urlparse(url)
    if len(url) > MAX_URL_CHARS:
        raise TargetRefused(f"at most {MAX_URL_CHARS} characters")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise TargetRefused("expected an http:// or https:// URL with a host")
    if allow_private:
        return
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        addresses = {info[4][0] for info in socket.getaddrinfo(parsed.hostname, port)}
    except (OSError, ValueError) as error:
        raise TargetRefused(f"cannot resolve {parsed.hostname!r}: {error}") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not ip.is_global or ip.is_multicast:
            raise TargetRefused(
                f"{parsed.hostname} resolves to {ip}, a loopback, private or link-local "
                "address (HEARTCLUSTER_WEBHOOK_ALLOW_PRIVATE allows those)"
            )


# ----- deliveries -------------------------------------------------------------------------------


@dataclass
class Delivery:
    """One event for one URL; `attempts` holds {"at", "status", "error", "duration_s"}."""

    id: str
    tenant: str
    event: str
    subject: str
    url: str
    body: str
    created_at: float
    state: str = "pending"  # pending → delivered | failed
    next_attempt_at: float | None = None
    attempt_count: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    claim: str = ""

    def out(self) -> dict[str, Any]:
        """As the API shows it (the body is the job or batch as the API returned it then)."""
        kind, _, subject_id = self.subject.partition(":")
        return {
            "id": self.id,
            "event": self.event,
            f"{kind}_id": subject_id,
            "url": self.url,
            "state": self.state,
            "created_at": self.created_at,
            "next_attempt_at": self.next_attempt_at,
            "attempt_count": self.attempt_count,
            "attempts": self.attempts,
        }


def _encode(values: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in values.items():
        flat += [name, json.dumps(value)]
    return flat


def _decode(raw: dict | list) -> Delivery:
    if isinstance(raw, list):
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    data = {_text(k): json.loads(v) for k, v in raw.items()}
    return Delivery(**data)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# KEYS: watch set, delivery, due set, tenant index, subject list, target. ARGV: subject, id, now,
# fields. The target URL is read (and dropped) here, in the same step that unwatches.
_EMIT = """
local url = redis.call('GET', KEYS[6])
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 or not url then return 0 end
redis.call('HSET', KEYS[2], 'url', cjson.encode(url), unpack(ARGV, 4))
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
redis.call('RPUSH', KEYS[5], ARGV[2])
redis.call('DEL', KEYS[6])
return 1
"""

# KEYS: due set. ARGV: now, lease deadline, claim token. Returns the delivery id or false.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', KEYS[1], ARGV[2], due[1])
redis.call('HSET', 'webhook-delivery:' .. due[1], 'claim', ARGV[3])
return due[1]
"""

# KEYS: delivery, due set. ARGV: id, claim token, next due ('' when settled), ttl, fields.
# Applies only while the claim is still this worker's (a lease that ran out went to another).
_SETTLE = """
if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
else
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
return 1
"""

# KEYS: endpoint, target, watch set. ARGV: subject. Watches the subject at the endpoint, if set.
_WATCH_ENDPOINT = """
local url = redis.call('GET', KEYS[1])
if not url then return 0 end
redis.call('SET', KEYS[2], url)
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""


class WebhookStore:
    """Tenant secrets and endpoints, watched subjects and the delivery outbox in Redis."""

    def __init__(self, redis_client: redis.Redis) -> None:
        self._redis = redis_client
        self._emit = redis_client.register_script(_EMIT)
        self._claim = redis_client.register_script(_CLAIM)
        self._settle = redis_client.register_script(_SETTLE)
        self._watch_endpoint = redis_client.register_script(_WATCH_ENDPOINT)

    # -- tenant configuration ---------------------------------------------------------------

    def rotate_secret(self, tenant: str, now: float | None = None) -> str:
        """A new signing secret (the only time it is shown); the previous one keeps signing
        alongside it for ROTATION_GRACE_S."""
        now = time.time() if now is None else now
        current = self._secrets(tenant).get("current")
        secret = new_secret()
        record = {"current": secret, "previous": current, "previous_until": now + ROTATION_GRACE_S}
        self._redis.set(secret_key(tenant), json.dumps(record))
        return secret

    def _secrets(self, tenant: str) -> dict[str, Any]:
        raw = self._redis.get(secret_key(tenant))
        return json.loads(raw) if raw else {}

    def has_secret(self, tenant: str) -> bool:
        return bool(self._secrets(tenant).get("current"))

    def signing_secrets(self, tenant: str, now: float) -> list[str]:
        record = self._secrets(tenant)
        keys = [record["current"]] if record.get("current") else []
        if record.get("previous") and now < record.get("previous_until", 0):
            keys.append(record["previous"])
        return keys

    def endpoint(self, tenant: str) -> str | None:
        raw = self._redis.get(endpoint_key(tenant))
        return _text(raw) if raw else None

    def set_endpoint(self, tenant: str, url: str | None) -> None:
        if url is None:
            self._redis.delete(endpoint_key(tenant))
        else:
            self._redis.set(endpoint_key(tenant), url)

    # -- watched subjects ---------------------------------------------------------------------

    def watch(
        self, subject: str, url: str, transaction: redis.client.Pipeline | None = None
    ) -> None:
        """Deliver this job's or batch's final event to `url` once it ends: set before a job
        is queued (in the transaction that queues it, when given), so it cannot be missed."""
        pipe = self._redis.pipeline(transaction=True) if transaction is None else transaction
        pipe.set(target_key(subject), url)
        pipe.sadd(WATCH_KEY, subject)
        if transaction is None:
            pipe.execute()

    def watch_endpoint(self, tenant: str, subject: str, transaction: redis.client.Pipeline) -> None:
        """`watch` at the tenant's endpoint, if it has one: read inside the transaction, so a
        submit needs no round trip of its own for it."""
        run_script(
            self._watch_endpoint,
            [endpoint_key(tenant), target_key(subject), WATCH_KEY],
            [subject],
            transaction,
        )

    def watched(self) -> Iterator[str]:
        """Every subject still waiting for its event."""
        for member in self._redis.sscan_iter(WATCH_KEY, count=1000):
            yield _text(member)

    def unwatch(self, subject: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.srem(WATCH_KEY, subject)
        pipe.delete(target_key(subject))
        pipe.execute()

    def emit(self, tenant: str, subject: str, event: str, payload: dict[str, Any]) -> str | None:
        """Create the subject's delivery to its target if it is still watched; its id, or None
        when another sweep already did (or it was deleted)."""
        now = time.time()
        body = json.dumps({"type": event, "timestamp": now, "data": payload}, separators=(",", ":"))
        delivery = Delivery(
            id=f"msg_{uuid.uuid4().hex}",
            tenant=tenant,
            event=event,
            subject=subject,
            url="",
            body=body,
            created_at=now,
            next_attempt_at=now,
        )
        values = {k: v for k, v in delivery.__dict__.items() if k != "url"}
        created = self._emit(
            keys=[
                WATCH_KEY,
                delivery_key(delivery.id),
                DUE_KEY,
                tenant_deliveries_key(tenant),
                subject_deliveries_key(subject),
                target_key(subject),
            ],
            args=[subject, delivery.id, repr(now), *_encode(values)],
        )
        return delivery.id if created else None

    # -- delivery -----------------------------------------------------------------------------

    def claim(self, lease_s: float, now: float | None = None) -> tuple[Delivery, str] | None:
        """The first due delivery, leased to the caller until now + lease_s, and its token."""
        now = time.time() if now is None else now
        token = uuid.uuid4().hex
        claimed = self._claim(
            keys=[DUE_KEY], args=[repr(now), repr(now + lease_s), json.dumps(token)]
        )
        if not claimed:
            return None
        delivery = self.get(_text(claimed))
        if delivery is None:  # its record expired or was deleted: drop the id
            self._redis.zrem(DUE_KEY, claimed)
            return None
        return delivery, token

    def settle(
        self,
        delivery: Delivery,
        token: str,
        attempt: dict[str, Any],
        state: str,
        next_attempt_at: float | None,
    ) -> bool:
        """Record one attempt: delivered, failed for good, or due again at next_attempt_at.
        False when the lease was lost (another worker holds the delivery now)."""
        attempts = [*delivery.attempts, attempt][-MAX_ATTEMPTS_SHOWN:]
        values = {
            "state": state,
            "attempts": attempts,
            "attempt_count": delivery.attempt_count + 1,
            "next_attempt_at": next_attempt_at,
            "claim": "",
        }
        applied = self._settle(
            keys=[delivery_key(delivery.id), DUE_KEY],
            args=[
                delivery.id,
                json.dumps(token),
                "" if next_attempt_at is None else repr(next_attempt_at),
                RECORD_TTL_S,
                *_encode(values),
            ],
        )
        return bool(applied)

    def get(self, delivery_id: str) -> Delivery | None:
        raw = self._redis.hgetall(delivery_key(delivery_id))
        return _decode(raw) if raw else None

    def for_subject(self, subject: str) -> list[Delivery]:
        ids = [_text(i) for i in self._redis.lrange(subject_deliveries_key(subject), 0, -1)]
        return [d for d in map(self.get, ids) if d is not None]

    def for_tenant(self, tenant: str, limit: int) -> list[Delivery]:
        """Newest first; ids whose records expired are pruned from the index."""
        ids = [_text(i) for i in self._redis.zrevrange(tenant_deliveries_key(tenant), 0, limit)]
        found = []
        for delivery_id in ids:
            delivery = self.get(delivery_id)
            if delivery is None:
                self._redis.zrem(tenant_deliveries_key(tenant), delivery_id)
            else:
                found.append(delivery)
        return found[:limit]

    def forget(self, subject: str) -> None:
        """A deleted job or batch: no event any more and no delivery list (deliveries already
        under way still finish, with the body they were created with)."""
        self.unwatch(subject)
        self._redis.delete(subject_deliveries_key(subject))


def backoff_s(attempt: int, first_s: float, max_s: float) -> float:
    """The delay after the `attempt`-th failure (1-based): first_s, doubling, capped at max_s."""
    return min(first_s * 2 ** (attempt - 1), max_s)
