"""Fair sharing of every queue between tenants: which queued job a freed worker slot runs next.

Celery's Redis lists are first-in first-out, so they no longer carry job ids. A queued job waits
in its tenant's pending set for its queue and priority (`push`); a Celery message is only a
wake-up for a queue ("a job may be ready"), and the worker thread that takes one asks `next`,
one Lua script, which picks the job and starts it under a lease in the same atomic step:

- deficit round robin over the tenants with pending jobs (a ring per queue): the tenant at the
  head gets its weight as a quantum when its turn comes, runs one job per unit and moves to the
  back when the quantum is spent, so backlogged tenants share slots in proportion to their
  weights and a newcomer waits for at most one job of each tenant ahead of it;
- within a tenant, interactive jobs before batch jobs, each oldest first;
- a tenant at its running limit is skipped; when only such tenants wait, the wake-up is
  "parked" and sent again when a running job ends (`unpark`).

Choosing and starting are one step, so a job is never chosen and then lost: from then on it is
a running job under a lease, which the reaper puts back here when its worker dies. A wake-up
that finds nothing (its job was cancelled, or a duplicate) costs one script call; a lost one is
replaced by `wanted` (each worker's heartbeat sends one for a queue that has startable jobs and
no wake-up waiting). Any number of gateways push and any number of workers pick: Redis runs
each script atomically, and there is no coordinator to lose. No torch: the gateway imports this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from shared.core.jobs import (
    LEASES_KEY,
    LUA_PRELUDE,
    PENDING_AT_KEY,
    PRIORITIES,
    Job,
    Lease,
    _decode_hash,
    _text,
    job_key,
    new_id,
    run_script,
    tenant_queued_key,
)
from shared.core.jobtypes import QUEUES, job_type
from shared.core.quotas import QUOTAS_PREFIX, Quotas


def pending_key(queue: str, tenant: str, priority: str) -> str:
    """A tenant's queued jobs of one queue and priority: job id -> created_at (oldest first)."""
    return f"sched-pending:{queue}:{tenant}:{priority}"


def ring_key(queue: str) -> str:
    """The tenants with pending jobs in this queue, in round-robin order (the head's turn)."""
    return f"sched-ring:{queue}"


def members_key(queue: str) -> str:
    return f"sched-ring-members:{queue}"


def deficit_key(queue: str) -> str:
    """Tenant -> what is left of its quantum in this queue."""
    return f"sched-deficit:{queue}"


def parked_key(queue: str) -> str:
    """Wake-ups dropped because every waiting tenant was at its running limit."""
    return f"sched-parked:{queue}"


# KEYS: job, pending set, ring, ring members, pending-at index, broker list. ARGV: job id,
# tenant, score, wake-up message. Only a queued job is added, and only once, and then with its
# wake-up; returns 1 when added.
_PUSH = """
if redis.call('HGET', KEYS[1], 'state') ~= '"queued"' then return 0 end
if redis.call('HEXISTS', KEYS[5], ARGV[1]) == 1 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], KEYS[2])
if redis.call('SADD', KEYS[4], ARGV[2]) == 1 then redis.call('RPUSH', KEYS[3], ARGV[2]) end
redis.call('LPUSH', KEYS[6], ARGV[4])
return 1
"""

# Shared by `next` and `wanted`: the tenant's pending sets, weight and whether it is at its
# running limit (ARGV[1] is the queue, ARGV[2] and ARGV[3] the default weight and limit).
_TENANT = f"""
local function buckets(tenant)
  local base = 'sched-pending:' .. ARGV[1] .. ':' .. tenant .. ':'
  return base .. '{PRIORITIES[0]}', base .. '{PRIORITIES[1]}'
end
local function quota(tenant, name, default)
  local v = redis.call('HGET', '{QUOTAS_PREFIX}' .. tenant, name)
  if v then return tonumber(v) end
  return tonumber(default)
end
local function at_limit(tenant)
  local limit = quota(tenant, 'max_running', ARGV[3])
  return limit > 0 and redis.call('SCARD', 'tenant-running:' .. tenant) >= limit
end
"""

# KEYS: ring, ring members, deficits, parked, leases, pending-at index. ARGV: queue, default
# weight, default running limit, worker (JSON), lease id (JSON), lease seconds, attempt cap,
# job key prefix. Returns {outcome, started job's HGETALL or false, {ended HGETALLs}} where
# outcome is 'started', 'blocked' (parked) or 'empty'.
_NEXT = (
    LUA_PRELUDE
    + _TENANT
    + """
local function rotate() redis.call('RPUSH', KEYS[1], redis.call('LPOP', KEYS[1])) end
local ended = {}
local blocked = false
local budget = 2 * redis.call('LLEN', KEYS[1]) + 100
while budget > 0 do
  budget = budget - 1
  local tenant = redis.call('LINDEX', KEYS[1], 0)
  if not tenant then break end
  local first, second = buckets(tenant)
  local bucket = first
  if redis.call('ZCARD', first) == 0 then bucket = second end
  if redis.call('ZCARD', bucket) == 0 then
    redis.call('LPOP', KEYS[1])
    redis.call('SREM', KEYS[2], tenant)
    redis.call('HDEL', KEYS[3], tenant)
  elseif at_limit(tenant) then
    blocked = true
    rotate()
  else
    local deficit = tonumber(redis.call('HGET', KEYS[3], tenant) or '0')
    if deficit < 1 then deficit = deficit + quota(tenant, 'weight', ARGV[2]) end
    local id = redis.call('ZPOPMIN', bucket)[1]
    redis.call('HDEL', KEYS[6], id)
    local got = acquire(ARGV[8] .. id, KEYS[5], id, ARGV[4], ARGV[5], tonumber(ARGV[6]),
      tonumber(ARGV[7]))
    if got and got[1] == 'started' then
      deficit = deficit - 1
      redis.call('HSET', KEYS[3], tenant, deficit)
      if deficit < 1 then rotate() end
      return {'started', got[2], ended}
    end
    redis.call('HSET', KEYS[3], tenant, deficit)
    if got and (got[1] == 'cancelled' or got[1] == 'too_many_attempts') then
      table.insert(ended, got[2])
    end
  end
end
if blocked then
  redis.call('INCR', KEYS[4])
  return {'blocked', false, ended}
end
return {'empty', false, ended}
"""
)

# KEYS: ring. ARGV: queue, default weight, default running limit. 1 when some tenant has a
# pending job in this queue and is below its running limit.
_STARTABLE = (
    _TENANT
    + """
for _, tenant in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local first, second = buckets(tenant)
  if redis.call('ZCARD', first) + redis.call('ZCARD', second) > 0 and not at_limit(tenant) then
    return 1
  end
end
return 0
"""
)

# KEYS: a tenant's queued set, pending-at index. ARGV: job key prefix. The queued jobs that are
# in no pending set and wait for no other job: requeued or handed back by a process that died
# before it pushed them, or batch items not sent yet.
_ADRIFT = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('HEXISTS', KEYS[2], id) == 0
      and redis.call('HGET', ARGV[1] .. id, 'stage') ~= '"waiting"' then
    table.insert(out, id)
  end
end
return out
"""

# KEYS: parked counter per queue. Returns the indexes (1-based) of those that were above 0,
# each now one less: a wake-up to send again on each.
_UNPARK = """
local out = {}
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') > 0 then
    redis.call('DECR', key)
    table.insert(out, i)
  end
end
return out
"""


@dataclass(frozen=True)
class Picked:
    """What `next` did: `job` and `lease` when it started one; `ended` are queued jobs it found
    cancelled or out of attempts (their clean-up is the caller's); `outcome` as in _NEXT."""

    outcome: str
    job: Job | None
    lease: Lease | None
    ended: list[Job]


class FairScheduler:
    def __init__(self, redis_client: redis.Redis, defaults: Quotas) -> None:
        self.redis = redis_client
        self.defaults = defaults
        self._push = redis_client.register_script(_PUSH)
        self._next = redis_client.register_script(_NEXT)
        self._startable = redis_client.register_script(_STARTABLE)
        self._unpark = redis_client.register_script(_UNPARK)
        self._adrift = redis_client.register_script(_ADRIFT)

    def push(
        self, job: Job, wake: tuple[str, str], transaction: redis.client.Pipeline | None = None
    ) -> bool | None:
        """Put a queued job in its tenant's pending set and `wake` (broker list, message) on
        the broker, in one atomic step; False when it is not queued (cancelled meanwhile) or
        already pending, and nothing is sent. With `transaction` it joins the caller's
        transaction instead (None; the answer comes when that runs)."""
        queue = job_type(job.type).queue
        wake_list, message = wake
        added = run_script(
            self._push,
            [
                job_key(job.id),
                pending_key(queue, job.tenant, job.priority),
                ring_key(queue),
                members_key(queue),
                PENDING_AT_KEY,
                wake_list,
            ],
            [job.id, job.tenant, repr(job.created_at), message],
            self.redis if transaction is None else transaction,
        )
        return None if transaction is not None else bool(added)

    def next(self, queue: str, worker: str, lease_s: float, max_attempts: int) -> Picked:
        """Choose the next job of `queue` and start it under a new lease held by `worker`."""
        lease_id = new_id()
        outcome, raw, ended = self._next(
            keys=[
                ring_key(queue),
                members_key(queue),
                deficit_key(queue),
                parked_key(queue),
                LEASES_KEY,
                PENDING_AT_KEY,
            ],
            args=[
                queue,
                self.defaults.weight,
                self.defaults.max_running,
                json.dumps(worker),
                json.dumps(lease_id),
                lease_s,
                max_attempts,
                job_key(""),
            ],
        )
        job = _decode_hash(raw) if raw else None
        lease = Lease(job.id, lease_id, worker) if job is not None else None
        return Picked(_text(outcome), job, lease, [_decode_hash(r) for r in ended])

    def startable(self, queue: str) -> bool:
        """Whether some tenant has a job of `queue` waiting that it may start now."""
        args = [queue, self.defaults.weight, self.defaults.max_running]
        return bool(self._startable(keys=[ring_key(queue)], args=args))

    def unpark(self) -> list[str]:
        """After a running job ended (a tenant's slot freed): the queues that parked a wake-up,
        each to be sent one again."""
        indexes = self._unpark(keys=[parked_key(queue) for queue in QUEUES])
        return [QUEUES[int(i) - 1] for i in indexes]

    def adrift(self) -> list[str]:
        """Queued jobs of any tenant that nothing would start: to be pushed again."""
        found: list[str] = []
        for key in self.redis.scan_iter(match=tenant_queued_key("*"), count=1000):
            found += [
                _text(i) for i in self._adrift(keys=[key, PENDING_AT_KEY], args=[job_key("")])
            ]
        return found

    def pending(self, queue: str, tenant: str) -> dict[str, list[str]]:
        """The tenant's pending job ids of `queue` per priority, in the order they would run."""
        return {
            priority: [
                _text(m) for m in self.redis.zrange(pending_key(queue, tenant, priority), 0, -1)
            ]
            for priority in PRIORITIES
        }
