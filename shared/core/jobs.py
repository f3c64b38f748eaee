"""Job and upload records in Redis: the one place where a job's state lives.

The gateway creates and cancels jobs; workers move them through their states and report
progress. Every state change is a Lua script that checks the current state and writes in one
atomic step, so a terminal state (succeeded, failed, cancelled) can never be overwritten, however
the gateway and redelivered workers interleave. Each change is also published on the job's
event channel, which the gateway serves as Server-Sent Events. No torch: the gateway imports this.

A running job holds a lease: the worker that runs it, a lease id (the fencing token) and an
expiry in Redis server time, renewed by the worker's heartbeat. Every change a worker makes
names its lease id and is refused once the lease was taken over, so a worker that lost its job
can never finish it. Expired leases are reaped by any process (one Lua script decides who wins):
the job goes back to its queue with the attempt counted, or fails at the attempt cap. Records
without an expiry (written with no lease) keep the older redelivery rules.

The same scripts keep each tenant's queued and running sets exact (the quotas and the fair
scheduler count them), take a job that stops being queued out of the scheduler's pending set,
and count the storage and audio seconds a job's end settles (see `_TRACK`).
"""

from __future__ import annotations

import base64
import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import redis

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
IDEMPOTENCY_TTL_S = 24 * 3600


def job_key(job_id: str) -> str:
    return f"job:{job_id}"


def tenant_jobs_key(tenant: str) -> str:
    return f"tenant-jobs:{tenant}"


def events_channel(job_id: str) -> str:
    return f"job-events:{job_id}"


def idempotency_key(tenant: str, key: str) -> str:
    return f"idem:{tenant}:{key}"


def dependents_key(job_id: str) -> str:
    return f"job-dependents:{job_id}"


LEASES_KEY = "job-leases"  # sorted set: job id -> lease expiry (Redis server time)
# Where a queued job waits in the fair scheduler (shared/core/scheduler.py): job id -> the key of
# its pending set. A job that leaves `queued` leaves its pending set in the same script.
PENDING_AT_KEY = "sched-pending-at"
# Audio seconds reserved at submit (shared/core/quotas.py): job id -> "day key|seconds",
# given back when the job ends failed or cancelled.
RESERVED_AUDIO_KEY = "usage-audio-reserved"
PRIORITIES = ("interactive", "batch")  # the scheduler serves a tenant's interactive jobs first


def tenant_queued_key(tenant: str) -> str:
    """The tenant's queued job ids; kept exact by every script that changes a state."""
    return f"tenant-queued:{tenant}"


def tenant_running_key(tenant: str) -> str:
    return f"tenant-running:{tenant}"


def storage_key(tenant: str) -> str:
    """Bytes the tenant stores: its uploads and its succeeded jobs' artifacts."""
    return f"usage-storage:{tenant}"


def upload_record_key(upload_id: str) -> str:
    return f"upload:{upload_id}"


def tenant_uploads_key(tenant: str) -> str:
    return f"tenant-uploads:{tenant}"


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Job:
    """One unit of work. Times are unix seconds; `error` is None or {"code", "message"}."""

    id: str
    tenant: str
    type: str
    params: dict[str, Any]
    state: str = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    stage: str = "queued"
    message: str = ""
    frames_done: int | None = None
    frames_total: int | None = None
    attempts: int = 0
    error: dict[str, str] | None = None
    artifacts: list[str] = field(default_factory=list)
    parent_job_id: str | None = None
    priority: str = "interactive"  # one of PRIORITIES
    artifact_bytes: int = 0  # what its artifacts take in the object store (storage quota)
    cancel_requested: bool = False
    worker: str | None = None  # the worker holding the lease while it runs
    lease_id: str | None = None  # fencing token of the current run
    lease_expires_at: float | None = None  # Redis server time; None: no lease

    @classmethod
    def new(
        cls,
        tenant: str,
        type: str,
        params: dict[str, Any],
        parent_job_id: str | None = None,
        priority: str = "interactive",
    ) -> Job:
        return cls(
            id=new_id(),
            tenant=tenant,
            type=type,
            params=params,
            parent_job_id=parent_job_id,
            priority=priority,
        )

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        """The fields by name, shallow (params shared with the job): for encoding, which every
        submit and event does, so no deep copy."""
        return {f.name: getattr(self, f.name) for f in _JOB_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        """Known fields only, so a record written by a newer version still loads."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_JOB_FIELDS = fields(Job)

# Each hash field holds the JSON of one Job field, so types survive the round trip and states
# compare as their JSON text ('"queued"') inside the scripts.

# Every script that changes a state ends with track(): the tenant's queued and running sets
# follow the job's state (so quotas count exactly, whatever dies when), a job that is no longer
# queued leaves the scheduler's pending set, and on the step into a final state the storage its
# artifacts take is counted (succeeded) or its reserved audio seconds are given back.
_TRACK = f"""
local function track(key, id, before)
  local tenant = cjson.decode(redis.call('HGET', key, 'tenant'))
  local state = redis.call('HGET', key, 'state')
  local queued, running = 'tenant-queued:' .. tenant, 'tenant-running:' .. tenant
  if state == '"queued"' then
    redis.call('SADD', queued, id)
    redis.call('SREM', running, id)
  else
    redis.call('SREM', queued, id)
    local pending = redis.call('HGET', '{PENDING_AT_KEY}', id)
    if pending then
      redis.call('ZREM', pending, id)
      redis.call('HDEL', '{PENDING_AT_KEY}', id)
    end
    if state == '"running"' then
      redis.call('SADD', running, id)
    else
      redis.call('SREM', running, id)
    end
  end
  if state == before then return end
  if state == '"succeeded"' then
    local bytes = tonumber(redis.call('HGET', key, 'artifact_bytes') or '0')
    if bytes > 0 then redis.call('INCRBY', 'usage-storage:' .. tenant, bytes) end
    redis.call('HDEL', '{RESERVED_AUDIO_KEY}', id)
  elseif state == '"failed"' or state == '"cancelled"' then
    local reserved = redis.call('HGET', '{RESERVED_AUDIO_KEY}', id)
    if reserved then
      local sep = string.find(reserved, '|', 1, true)
      local day, seconds = string.sub(reserved, 1, sep - 1), string.sub(reserved, sep + 1)
      if redis.call('EXISTS', day) == 1 then
        redis.call('INCRBYFLOAT', day, '-' .. seconds)
      end
      redis.call('HDEL', '{RESERVED_AUDIO_KEY}', id)
    end
  end
end
"""

# KEYS: job, the tenant's job index, idempotency key (optional). ARGV: job id, created at, the
# key's TTL, the record's fields (`_encoded_record`). Returns the id of the job the key names.
_CREATE = (
    _TRACK
    + """
if KEYS[3] then
  local existing = redis.call('GET', KEYS[3])
  if existing then return existing end
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[3])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('job ' .. ARGV[1] .. ' already exists')
end
local fields = {}
for name, value in pairs(cjson.decode(ARGV[4])) do
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
track(KEYS[1], ARGV[1], nil)
return ARGV[1]
"""
)

# Shared by the scripts below. Times are Redis server time (one clock for every process); hash
# fields hold JSON, so strings are written quoted and numbers as text.
LUA_PRELUDE = (
    _TRACK
    + """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(t) return string.format('%.6f', t) end
local function expiry(key)
  local v = redis.call('HGET', key, 'lease_expires_at')
  if not v or v == 'null' then return nil end
  return tonumber(v)
end
-- A job whose run is over without an outcome (start or an expired lease) ends here when it
-- was cancelled meanwhile or used up its attempts; nil means it may run (again).
local function settle(key, leases, id, t, max_attempts)
  if redis.call('HGET', key, 'cancel_requested') == 'true' then
    local before = redis.call('HGET', key, 'state')
    redis.call('HSET', key, 'state', '"cancelled"', 'finished_at', fmt(t), 'stage', '"cancelled"')
    redis.call('ZREM', leases, id)
    track(key, id, before)
    return 'cancelled'
  end
  local attempts = tonumber(redis.call('HGET', key, 'attempts'))
  if max_attempts > 0 and attempts >= max_attempts then
    local message = 'gave up after ' .. attempts .. ' attempts (HEARTCLUSTER_MAX_ATTEMPTS=' ..
      max_attempts .. '); the worker running it was lost each time'
    local before = redis.call('HGET', key, 'state')
    redis.call('HSET', key, 'state', '"failed"', 'finished_at', fmt(t), 'stage', '"failed"',
      'message', cjson.encode(message),
      'error', cjson.encode({code = 'too_many_attempts', message = message}))
    redis.call('ZREM', leases, id)
    track(key, id, before)
    return 'too_many_attempts'
  end
  return nil
end
-- Take a job under a new lease (see JobStore.acquire): {outcome, HGETALL}, false when missing.
local function acquire(key, leases, id, worker, lease_id, lease_s, max_attempts)
  if redis.call('EXISTS', key) == 0 then return false end
  local t = now()
  local state = redis.call('HGET', key, 'state')
  local e = expiry(key)
  if state == '"running"' and e ~= nil and e > t then
    return {'busy', redis.call('HGETALL', key)}
  end
  if state ~= '"queued"' and state ~= '"running"' then
    return {'terminal', redis.call('HGETALL', key)}
  end
  local settled = settle(key, leases, id, t, max_attempts)
  if settled then return {settled, redis.call('HGETALL', key)} end
  redis.call('HINCRBY', key, 'attempts', 1)
  local expires = 'null'
  if lease_s > 0 then
    expires = fmt(t + lease_s)
    redis.call('ZADD', leases, t + lease_s, id)
  else
    redis.call('ZREM', leases, id)
  end
  redis.call('HSET', key, 'state', '"running"', 'started_at', fmt(t), 'stage', '"starting"',
    'progress', '0.0', 'worker', worker, 'lease_id', lease_id, 'lease_expires_at', expires)
  track(key, id, state)
  return {'started', redis.call('HGETALL', key)}
end
"""
)

# KEYS: job, leases. ARGV: job id, worker (JSON), lease id (JSON), lease seconds (0: no lease),
# attempt cap (0: none). Returns false when missing, else {outcome, HGETALL}.
_ACQUIRE = (
    LUA_PRELUDE
    + """
return acquire(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
"""
)

# KEYS: leases, then one job key per lease. ARGV: lease seconds, then (job id, lease id JSON)
# per job. Extends every lease still held; returns the ids of the jobs whose lease is gone.
_RENEW = (
    LUA_PRELUDE
    + """
local t = now()
local until_t = t + tonumber(ARGV[1])
local lost = {}
for i = 2, #KEYS do
  local id, lease = ARGV[2 * i - 2], ARGV[2 * i - 1]
  if redis.call('HGET', KEYS[i], 'state') == '"running"'
      and redis.call('HGET', KEYS[i], 'lease_id') == lease then
    redis.call('HSET', KEYS[i], 'lease_expires_at', fmt(until_t))
    redis.call('ZADD', KEYS[1], until_t, id)
  else
    table.insert(lost, id)
  end
end
return lost
"""
)

# KEYS: leases. ARGV: attempt cap, most jobs per call, job key prefix. Every running job whose
# lease expired goes back to the queue (or ends: cancelled, too_many_attempts). Returns
# {outcome, HGETALL} per job; concurrent reapers never both take one job.
_REAP = (
    LUA_PRELUDE
    + """
local t = now()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(due) do
  local key = ARGV[3] .. id
  local e = expiry(key)
  if redis.call('HGET', key, 'state') ~= '"running"' or e == nil then
    redis.call('ZREM', KEYS[1], id)
  elseif e > t then
    redis.call('ZADD', KEYS[1], e, id)
  else
    local outcome = settle(key, KEYS[1], id, t, tonumber(ARGV[1]))
    if not outcome then
      outcome = 'requeued'
      redis.call('HSET', key, 'state', '"queued"', 'stage', '"queued"', 'progress', '0.0',
        'message', '"its worker stopped renewing the lease; back in the queue"',
        'worker', 'null', 'lease_id', 'null', 'lease_expires_at', 'null')
      redis.call('ZREM', KEYS[1], id)
      track(key, id, '"running"')
    end
    table.insert(out, {outcome, redis.call('HGETALL', key)})
  end
end
return out
"""
)

# KEYS: job, leases. ARGV: job id. Queued, or running with an expired lease (its worker is
# gone): cancelled now. Running under a live lease: flagged for its worker.
_CANCEL = (
    LUA_PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local t = now()
local state = redis.call('HGET', KEYS[1], 'state')
local e = expiry(KEYS[1])
if state == '"queued"' or (state == '"running"' and e ~= nil and e <= t) then
  redis.call('HSET', KEYS[1], 'state', '"cancelled"', 'finished_at', fmt(t),
    'stage', '"cancelled"', 'cancel_requested', 'true')
  redis.call('ZREM', KEYS[2], ARGV[1])
  track(KEYS[1], ARGV[1], state)
  return {'cancelled', redis.call('HGETALL', KEYS[1])}
end
if state == '"running"' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
  return {'flagged', redis.call('HGETALL', KEYS[1])}
end
return {'unchanged', redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: job, leases. ARGV: job id, n, n allowed states, increment field ('' for none), its
# delta, lease id (JSON; '' for no fencing), field/value pairs. A fenced change applies only
# while that lease holds the job. Returns false when the job is missing, else {applied (0/1),
# HGETALL after the change}.
_TRANSITION = (
    _TRACK
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local n = tonumber(ARGV[2])
local state = redis.call('HGET', KEYS[1], 'state')
local allowed = false
for i = 3, n + 2 do
  if ARGV[i] == state then allowed = true end
end
local lease = ARGV[n + 5]
if lease ~= '' and redis.call('HGET', KEYS[1], 'lease_id') ~= lease then allowed = false end
if not allowed then return {0, redis.call('HGETALL', KEYS[1])} end
local incr = ARGV[n + 3]
if incr ~= '' then redis.call('HINCRBY', KEYS[1], incr, tonumber(ARGV[n + 4])) end
if #ARGV > n + 5 then redis.call('HSET', KEYS[1], unpack(ARGV, n + 6)) end
if redis.call('HGET', KEYS[1], 'state') ~= '"running"' then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
track(KEYS[1], ARGV[1], state)
return {1, redis.call('HGETALL', KEYS[1])}
"""
)

# What acquire() found.
STARTED = "started"  # the caller holds the lease and runs the job
BUSY = "busy"  # another worker holds a live lease: drop this delivery
TERMINAL = "terminal"  # already finished: nothing to do
ENDED = frozenset({"cancelled", "too_many_attempts"})  # ended now instead of running


@dataclass(frozen=True)
class Lease:
    """The right of one worker to run one job until it stops renewing it."""

    job_id: str
    lease_id: str
    worker: str


# KEYS: job, tenant index, dependents, tenant storage. ARGV: id, terminal states. Checked and
# removed in one step (a succeeded job's artifacts leave the tenant's storage), so a job that
# is still queued or running can never lose its record.
_DELETE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
for i = 2, #ARGV do
  if ARGV[i] == state then
    local bytes = tonumber(redis.call('HGET', KEYS[1], 'artifact_bytes') or '0')
    if state == '"succeeded"' and bytes > 0 then
      redis.call('DECRBY', KEYS[4], bytes)
    end
    redis.call('DEL', KEYS[1], KEYS[3])
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 1
  end
end
return 0
"""


def run_script(
    script: Any, keys: list[Any], args: list[Any], client: redis.Redis | redis.client.Pipeline
) -> Any:
    """Run a registered script on `client`. On a pipeline it goes by its source (EVAL): with
    EVALSHA redis-py first asks SCRIPT EXISTS, a round trip more, and inside a transaction a
    script missing after a Redis restart would fail alone while the rest was applied."""
    if isinstance(client, redis.client.Pipeline):
        return client.eval(script.script, len(keys), *keys, *args)
    return script(keys=keys, args=args, client=client)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode_hash(raw: dict | list) -> Job:
    if isinstance(raw, list):  # HGETALL reply from a script: flat [field, value, ...]
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    return Job.from_dict({_text(k): json.loads(v) for k, v in raw.items()})


def _encoded_record(job: Job) -> str:
    """A new job's hash fields (each value JSON, as `_encode_fields` writes them) in one JSON
    object: one script argument instead of two per field, which redis-py packs in Python."""
    return json.dumps({name: json.dumps(value) for name, value in job.to_dict().items()})


def _encode_fields(values: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in values.items():
        flat += [name, json.dumps(value)]
    return flat


class JobStore:
    """Job records (`job:{id}` hashes), per-tenant index and event channels in Redis."""

    def __init__(self, redis_client: redis.Redis) -> None:
        self._redis = redis_client
        self._create = redis_client.register_script(_CREATE)
        self._transition = redis_client.register_script(_TRANSITION)
        self._acquire = redis_client.register_script(_ACQUIRE)
        self._renew = redis_client.register_script(_RENEW)
        self._reap = redis_client.register_script(_REAP)
        self._cancel = redis_client.register_script(_CANCEL)
        self._delete = redis_client.register_script(_DELETE)

    @property
    def redis(self) -> redis.Redis:
        """The client, for stores of records that refer to jobs (datasets)."""
        return self._redis

    # -- creation and reading -------------------------------------------------------------

    def create(self, job: Job, transaction: redis.client.Pipeline | None = None) -> Job:
        """Record a new job (in the caller's `transaction`, when given)."""
        run_script(
            self._create,
            [job_key(job.id), tenant_jobs_key(job.tenant)],
            [job.id, repr(job.created_at), 0, _encoded_record(job)],
            self._redis if transaction is None else transaction,
        )
        return job

    def create_idempotent(self, job: Job, key: str) -> tuple[Job, bool]:
        """Create `job` unless this tenant already used `key`; then return that job instead."""
        created_id = _text(
            self._create(
                keys=[
                    job_key(job.id),
                    tenant_jobs_key(job.tenant),
                    idempotency_key(job.tenant, key),
                ],
                args=[job.id, repr(job.created_at), IDEMPOTENCY_TTL_S, _encoded_record(job)],
            )
        )
        if created_id == job.id:
            return job, True
        existing = self.get(created_id)
        if existing is None:
            raise LookupError(f"idempotency key {key!r} names missing job {created_id}")
        return existing, False

    def get(self, job_id: str) -> Job | None:
        raw = self._redis.hgetall(job_key(job_id))
        return _decode_hash(raw) if raw else None

    def get_for_tenant(self, tenant: str, job_id: str) -> Job | None:
        """The job, or None when it does not exist or belongs to another tenant."""
        job = self.get(job_id)
        return job if job is not None and job.tenant == tenant else None

    def get_many(self, job_ids: list[str]) -> list[Job | None]:
        """Many jobs in one round trip (None where a job is gone)."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(job_key(job_id))
        return [_decode_hash(raw) if raw else None for raw in pipe.execute()]

    def states(self, job_ids: list[str]) -> list[str | None]:
        """Only the jobs' states, in one round trip (None where a job is gone): cheap enough to
        poll for many jobs."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(job_key(job_id), "state")
        return [json.loads(raw) if raw is not None else None for raw in pipe.execute()]

    def delete(self, job_id: str) -> bool | None:
        """Remove a finished job's record and index entry: True when deleted, False when it has
        not finished (cancel it first), None when there is no such job."""
        job = self.get(job_id)
        if job is None:
            return None
        deleted = self._delete(
            keys=[
                job_key(job_id),
                tenant_jobs_key(job.tenant),
                dependents_key(job_id),
                storage_key(job.tenant),
            ],
            args=[job_id, *(json.dumps(s) for s in sorted(TERMINAL_STATES))],
        )
        return None if deleted < 0 else bool(deleted)

    def list(
        self,
        tenant: str,
        state: str | None = None,
        type: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """A page of the tenant's jobs, newest first, and the cursor of the next page (or None).

        The cursor marks the last job returned (its created_at and id), so jobs created while a
        client pages through never shift or repeat entries. Raises ValueError for a bad cursor.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        max_score, after_id = "+inf", None
        if cursor is not None:
            after_score, after_id = _decode_cursor(cursor)
            max_score = repr(after_score)
        index = tenant_jobs_key(tenant)
        page: list[Job] = []
        offset, batch_size = 0, max(limit, 50)
        while True:
            scanned = self._redis.zrevrangebyscore(
                index, max_score, "-inf", start=offset, num=batch_size, withscores=True
            )
            offset += len(scanned)
            # Equal scores come in reverse lexicographic order of id: skip those already served.
            batch = [
                (_text(member), score)
                for member, score in scanned
                if after_id is None or score != after_score or _text(member) < after_id
            ]
            pipe = self._redis.pipeline(transaction=False)
            for job_id, _ in batch:
                pipe.hgetall(job_key(job_id))
            for (job_id, score), raw in zip(batch, pipe.execute(), strict=True):
                if not raw:
                    continue
                job = _decode_hash(raw)
                if (state is None or job.state == state) and (type is None or job.type == type):
                    page.append(job)
                    if len(page) == limit:
                        return page, _encode_cursor(score, job_id)
            if len(scanned) < batch_size:
                return page, None

    # -- state changes --------------------------------------------------------------------

    def _apply(
        self,
        job_id: str,
        allowed: tuple[str, ...],
        values: dict[str, Any],
        increment: str = "",
        event: str = "state",
        lease_id: str | None = None,
        delta: int = 1,
    ) -> tuple[Job | None, bool]:
        reply = self._transition(
            keys=[job_key(job_id), LEASES_KEY],
            args=[
                job_id,
                len(allowed),
                *(json.dumps(s) for s in allowed),
                increment,
                delta,
                "" if lease_id is None else json.dumps(lease_id),
                *_encode_fields(values),
            ],
        )
        if not reply:
            return None, False
        applied, raw = reply
        job = _decode_hash(raw)
        if applied:
            self._publish(job, event)
        return job, bool(applied)

    def _publish(self, job: Job, event: str) -> None:
        self._redis.publish(
            events_channel(job.id), json.dumps({"event": event, "job": job.to_dict()})
        )

    def acquire(
        self, job_id: str, worker: str, lease_s: float, max_attempts: int
    ) -> tuple[str, Job | None, Lease | None]:
        """Take a queued job (or a running one whose lease expired) under a new lease.

        Returns (outcome, job, lease): STARTED with the lease the caller now holds; BUSY when
        another worker's lease is live; TERMINAL; "cancelled" or "too_many_attempts" when it
        ended here instead of running; ("missing", None, None) when there is no record.
        """
        lease_id = new_id()
        reply = self._acquire(
            keys=[job_key(job_id), LEASES_KEY],
            args=[job_id, json.dumps(worker), json.dumps(lease_id), lease_s, max_attempts],
        )
        if not reply:
            return "missing", None, None
        outcome, raw = _text(reply[0]), reply[1]
        job = _decode_hash(raw)
        if outcome == STARTED or outcome in ENDED:
            self._publish(job, "state")
        lease = Lease(job_id, lease_id, worker) if outcome == STARTED else None
        return outcome, job, lease

    def start(self, job_id: str) -> Job | None:
        """Mark a queued (or redelivered running) job running without a lease, counting the
        attempt. Returns None when the job is missing, cancelled or otherwise terminal."""
        outcome, job, _ = self.acquire(job_id, "", 0, 0)
        return job if outcome == STARTED else None

    def renew(self, leases: list[Lease], lease_s: float) -> list[str]:
        """Extend the leases still held by one round trip; returns the ids of those lost."""
        if not leases:
            return []
        args: list[Any] = [lease_s]
        for lease in leases:
            args += [lease.job_id, json.dumps(lease.lease_id)]
        lost = self._renew(
            keys=[LEASES_KEY, *(job_key(lease.job_id) for lease in leases)], args=args
        )
        return [_text(job_id) for job_id in lost]

    def reap(self, max_attempts: int, limit: int = 100) -> list[tuple[str, Job]]:
        """Jobs whose lease expired, each requeued ("requeued": send its message again) or
        ended ("cancelled", "too_many_attempts"). Safe to call from any number of processes."""
        replies = self._reap(keys=[LEASES_KEY], args=[max_attempts, limit, job_key("")])
        reaped = [(_text(outcome), _decode_hash(raw)) for outcome, raw in replies]
        for _, job in reaped:
            self._publish(job, "state")
        return reaped

    def hand_back(self, lease: Lease) -> Job | None:
        """Running → queued by a stopping worker, the attempt not counted (it did not fail);
        None when the lease no longer holds the job. The caller sends its message again."""
        job, applied = self._apply(
            lease.job_id,
            ("running",),
            {
                "state": "queued",
                "stage": "queued",
                "progress": 0.0,
                "message": "handed back by a stopping worker",
                "worker": None,
                "lease_id": None,
                "lease_expires_at": None,
            },
            increment="attempts",
            delta=-1,
            lease_id=lease.lease_id,
        )
        return job if applied else None

    def progress(
        self,
        job_id: str,
        progress: float,
        stage: str,
        message: str = "",
        frames_done: int | None = None,
        frames_total: int | None = None,
    ) -> None:
        """Record and publish progress of a running job (ignored once it is terminal)."""
        values: dict[str, Any] = {
            "progress": round(max(0.0, min(100.0, progress)), 2),
            "stage": stage,
            "message": message,
        }
        if frames_done is not None:
            values["frames_done"] = frames_done
        if frames_total is not None:
            values["frames_total"] = frames_total
        self._apply(job_id, ("running",), values, event="progress")

    def succeed(
        self,
        job_id: str,
        artifacts: list[str],
        lease_id: str | None = None,
        artifact_bytes: int = 0,
    ) -> Job | None:
        """Running → succeeded with its artifact names and the bytes they take (counted in the
        tenant's storage); None if the job was not running (or, given a lease id, no longer held
        under it)."""
        job, applied = self._apply(
            job_id,
            ("running",),
            {
                "state": "succeeded",
                "finished_at": time.time(),
                "progress": 100.0,
                "stage": "done",
                "artifacts": list(artifacts),
                "artifact_bytes": artifact_bytes,
            },
            lease_id=lease_id,
        )
        return job if applied else None

    def fail(self, job_id: str, code: str, message: str, lease_id: str | None = None) -> Job | None:
        """Queued or running → failed with {"code", "message"}; None if already terminal (or,
        given a lease id, no longer held under it)."""
        job, applied = self._apply(
            job_id,
            ("queued", "running"),
            {
                "state": "failed",
                "finished_at": time.time(),
                "stage": "failed",
                "message": message,
                "error": {"code": code, "message": message},
            },
            lease_id=lease_id,
        )
        return job if applied else None

    def mark_cancelled(self, job_id: str, lease_id: str | None = None) -> Job | None:
        """Queued or running → cancelled (the worker has stopped); None if already terminal."""
        job, applied = self._apply(
            job_id, ("queued", "running"), _cancelled_values(), lease_id=lease_id
        )
        return job if applied else None

    def cancel(self, job_id: str) -> Job | None:
        """Cancel on a user's request: a queued job, or a running one whose worker is gone
        (lease expired), is cancelled at once; a running one is flagged for its worker to
        stop; a terminal one is left alone. None if missing."""
        reply = self._cancel(keys=[job_key(job_id), LEASES_KEY], args=[job_id])
        if not reply:
            return None
        outcome, job = _text(reply[0]), _decode_hash(reply[1])
        if outcome == "cancelled":
            self._publish(job, "state")
            for dependent in self.take_dependents(job_id):
                self.cancel(dependent)
        elif outcome == "flagged":
            self._publish(job, "progress")
        return job

    # -- dependencies (a job that waits for another, e.g. extend after encoding an upload) ----

    def add_dependent(
        self, job_id: str, dependent_id: str, transaction: redis.client.Pipeline | None = None
    ) -> None:
        """Record that `dependent_id` is enqueued only once `job_id` has succeeded."""
        (self._redis if transaction is None else transaction).sadd(
            dependents_key(job_id), dependent_id
        )

    def take_dependents(self, job_id: str) -> list[str]:
        """The jobs waiting on `job_id`, removed in one step so only one caller releases them."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.smembers(dependents_key(job_id))
        pipe.delete(dependents_key(job_id))
        members, _ = pipe.execute()
        return sorted(_text(m) for m in members)

    def cancel_requested(self, job_id: str) -> bool:
        """One HGET: cheap enough for the engine to ask every frame."""
        return self._redis.hget(job_key(job_id), "cancel_requested") in (b"true", "true")

    # -- events ---------------------------------------------------------------------------

    def events(self, job_id: str, idle_s: float = 15.0) -> Iterator[dict[str, Any] | None]:
        """The job's events, starting with its current snapshot, ending after a terminal state.

        Each event is {"event": "state" | "progress", "job": job dict}. After `idle_s` seconds
        without an event it yields None (so an SSE stream can send a keep-alive) after checking
        the record itself, so a missed publish cannot leave a client waiting forever. Yields
        nothing for an unknown job.
        """
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(events_channel(job_id))  # before reading, so nothing falls between
        try:
            job = self.get(job_id)
            if job is None:
                return
            yield {"event": "state", "job": job.to_dict()}
            if job.terminal:
                return
            while True:
                message = _next_message(pubsub, idle_s)
                if message is None:
                    job = self.get(job_id)
                    if job is None or job.terminal:
                        if job is not None:
                            yield {"event": "state", "job": job.to_dict()}
                        return
                    yield None
                    continue
                event = json.loads(message["data"])
                yield event
                if event["event"] == "state" and event["job"]["state"] in TERMINAL_STATES:
                    return
        finally:
            pubsub.close()


def _cancelled_values() -> dict[str, Any]:
    return {
        "state": "cancelled",
        "finished_at": time.time(),
        "stage": "cancelled",
        "cancel_requested": True,
    }


def _next_message(pubsub: redis.client.PubSub, timeout_s: float) -> dict | None:
    """The next published message within `timeout_s` (subscribe confirmations skipped)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=left)
        if message is not None and message["type"] == "message":
            return message
    return None


def _encode_cursor(score: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score!r}:{job_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        score, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split(":", 1)
        if math.isfinite(float(score)):  # nan or inf would reach Redis as a score range
            return float(score), job_id
    except (ValueError, UnicodeDecodeError):
        pass
    raise ValueError(f"invalid cursor {cursor!r}")


@dataclass
class Upload:
    """A validated input file in the object store, usable as job input by its id.

    `kind` is "audio" or "tokens" (a .npy [8, T] array); `duration_s` is its length in seconds.
    """

    id: str
    tenant: str
    key: str
    filename: str
    kind: str
    bytes: int
    duration_s: float
    sample_rate: int | None = None
    channels: int | None = None
    created_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Upload:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class UploadStore:
    """Upload records (`upload:{id}`, one JSON value each) in Redis."""

    def __init__(self, redis_client: redis.Redis) -> None:
        self._redis = redis_client

    def create(self, upload: Upload) -> Upload:
        if not self._redis.set(upload_record_key(upload.id), json.dumps(upload.to_dict()), nx=True):
            raise ValueError(f"upload {upload.id} already exists")
        pipe = self._redis.pipeline(transaction=True)
        pipe.zadd(tenant_uploads_key(upload.tenant), {upload.id: upload.created_at})
        pipe.incrby(storage_key(upload.tenant), upload.bytes)
        pipe.execute()
        return upload

    def list(
        self, tenant: str, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[Upload], str | None]:
        """A page of the tenant's uploads, newest first, and the next page's cursor (or None).
        Raises ValueError for a bad cursor."""
        max_score, after_id = "+inf", None
        if cursor is not None:
            after_score, after_id = _decode_cursor(cursor)
            max_score = repr(after_score)
        page: list[Upload] = []
        offset, batch_size = 0, limit + 1
        while True:
            scanned = self._redis.zrevrangebyscore(
                tenant_uploads_key(tenant),
                max_score,
                "-inf",
                start=offset,
                num=batch_size,
                withscores=True,
            )
            offset += len(scanned)
            for member, score in scanned:
                upload_id = _text(member)
                if after_id is not None and score == after_score and upload_id >= after_id:
                    continue  # served on an earlier page
                upload = self.get(upload_id)
                if upload is not None:
                    page.append(upload)
                    if len(page) == limit:
                        return page, _encode_cursor(score, upload_id)
            if len(scanned) < batch_size:
                return page, None

    def delete(self, upload: Upload) -> None:
        """The record and its index entry (the caller deletes the file); its bytes leave the
        tenant's storage once, however many callers race."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(upload_record_key(upload.id))
        pipe.zrem(tenant_uploads_key(upload.tenant), upload.id)
        deleted, _ = pipe.execute()
        if deleted:
            self._redis.decrby(storage_key(upload.tenant), upload.bytes)

    def get(self, upload_id: str) -> Upload | None:
        raw = self._redis.get(upload_record_key(upload_id))
        return Upload.from_dict(json.loads(raw)) if raw else None

    def get_for_tenant(self, tenant: str, upload_id: str) -> Upload | None:
        """The upload, or None when it does not exist or belongs to another tenant."""
        upload = self.get(upload_id)
        return upload if upload is not None and upload.tenant == tenant else None
