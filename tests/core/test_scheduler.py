"""The fair scheduler's Lua scripts on a real redis-server: deficit round robin by weight,
priorities, running limits with parked wake-ups, and the job lifecycle kept whole."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from shared.core.jobs import Job, JobStore
from shared.core.queueing import enqueue
from shared.core.quotas import Quotas, QuotaStore
from shared.core.scheduler import FairScheduler

PARAMS = {"tags": "piano", "duration_s": 0.08}


@pytest.fixture
def jobs(redis_client) -> JobStore:
    return JobStore(redis_client)


@pytest.fixture
def scheduler(redis_client) -> FairScheduler:
    return FairScheduler(redis_client, Quotas())


@pytest.fixture
def quotas(redis_client) -> QuotaStore:
    return QuotaStore(redis_client, Quotas())


def queue_jobs(
    jobs: JobStore, scheduler: FairScheduler, tenant: str, n: int, priority: str = "interactive"
) -> list[str]:
    ids = []
    for _ in range(n):
        job = jobs.create(Job.new(tenant, "generate", PARAMS, priority=priority))
        assert enqueue(scheduler, job)
        ids.append(job.id)
    return ids


def pick(scheduler: FairScheduler, jobs: JobStore, finish: bool = True) -> Job | None:
    """Take the next gpu job as a worker would; finish it at once unless told not to."""
    picked = scheduler.next("gpu", "w1", 30, 3)
    if picked.job is not None and finish:
        jobs.succeed(picked.job.id, [], picked.lease.lease_id)
    return picked.job


def test_backlogged_tenants_share_by_weight(jobs, scheduler, quotas) -> None:
    quotas.set("big", {"weight": 2})
    queue_jobs(jobs, scheduler, "big", 40)
    queue_jobs(jobs, scheduler, "small", 40)
    served = Counter(pick(scheduler, jobs).tenant for _ in range(30))
    assert served == {"big": 20, "small": 10}


def test_a_newcomer_waits_for_at_most_one_job_of_a_backlogged_tenant(jobs, scheduler) -> None:
    queue_jobs(jobs, scheduler, "a", 200)
    for _ in range(5):
        assert pick(scheduler, jobs).tenant == "a"
    (newcomer,) = queue_jobs(jobs, scheduler, "b", 1)
    assert newcomer in [pick(scheduler, jobs).id for _ in range(2)]
    assert len(scheduler.pending("gpu", "a")["interactive"]) == 194  # one more of a, at most


def test_interactive_jobs_start_before_earlier_batch_jobs(jobs, scheduler) -> None:
    batch = queue_jobs(jobs, scheduler, "a", 3, priority="batch")
    interactive = queue_jobs(jobs, scheduler, "a", 2)
    order = [pick(scheduler, jobs).id for _ in range(5)]
    assert order == interactive + batch


def test_a_tenant_at_its_running_limit_waits_and_others_go_ahead(
    jobs, scheduler, quotas, redis_client
) -> None:
    quotas.set("a", {"max_running": 1})
    first, second = queue_jobs(jobs, scheduler, "a", 2)
    assert pick(scheduler, jobs, finish=False).id == first
    (other,) = queue_jobs(jobs, scheduler, "b", 1)
    assert pick(scheduler, jobs, finish=False).id == other  # a is skipped, not b
    blocked = scheduler.next("gpu", "w1", 30, 3)
    assert blocked.outcome == "blocked" and blocked.job is None
    assert not scheduler.startable("gpu") and scheduler.unpark() == ["gpu"]
    assert scheduler.unpark() == []  # one parked wake-up, sent again once
    running = jobs.get(first)
    jobs.succeed(first, [], running.lease_id)
    assert scheduler.startable("gpu")
    assert pick(scheduler, jobs).id == second
    assert quotas.usage("a")["running"] == 0 and quotas.usage("b")["running"] == 1


def test_a_cancelled_queued_job_leaves_the_scheduler(jobs, scheduler, quotas) -> None:
    keep, cancel = queue_jobs(jobs, scheduler, "a", 2)
    assert quotas.usage("a")["queued"] == 2
    jobs.cancel(cancel)
    assert scheduler.pending("gpu", "a")["interactive"] == [keep]
    assert quotas.usage("a")["queued"] == 1
    assert pick(scheduler, jobs).id == keep
    assert scheduler.next("gpu", "w1", 30, 3).outcome == "empty"
    assert jobs.get(cancel).state == "cancelled" and jobs.get(cancel).attempts == 0


def test_only_queued_jobs_are_pushed_and_only_once(jobs, scheduler) -> None:
    (job_id,) = queue_jobs(jobs, scheduler, "a", 1)
    job = jobs.get(job_id)
    assert not enqueue(scheduler, job)  # already pending (a duplicate send)
    jobs.cancel(job_id)
    assert not enqueue(scheduler, job)  # cancelled: never queued again


def test_a_reaped_job_comes_back_through_the_scheduler(jobs, scheduler, quotas) -> None:
    (job_id,) = queue_jobs(jobs, scheduler, "a", 1)
    assert scheduler.next("gpu", "w1", 0.05, 3).job.id == job_id
    assert quotas.usage("a") | {"running": 1, "queued": 0} == quotas.usage("a")
    time.sleep(0.1)  # the lease lapses (its worker died)
    ((outcome, job),) = jobs.reap(3)
    assert outcome == "requeued" and quotas.usage("a")["queued"] == 1
    assert quotas.usage("a")["running"] == 0
    assert enqueue(scheduler, job)
    again = scheduler.next("gpu", "w2", 30, 3)
    assert again.job.id == job_id and again.job.attempts == 2 and again.job.worker == "w2"


def test_a_job_past_the_attempt_cap_ends_instead_of_starting(jobs, scheduler, quotas) -> None:
    job = jobs.create(Job.new("a", "generate", PARAMS))
    jobs._redis.hset(f"job:{job.id}", "attempts", "3")
    assert enqueue(scheduler, job)
    (ok,) = queue_jobs(jobs, scheduler, "a", 1)
    picked = scheduler.next("gpu", "w1", 30, 3)
    assert picked.job.id == ok
    assert [ended.error["code"] for ended in picked.ended] == ["too_many_attempts"]
    assert quotas.usage("a") | {"running": 1, "queued": 0} == quotas.usage("a")


def test_queues_are_scheduled_apart(jobs, scheduler) -> None:
    gpu = queue_jobs(jobs, scheduler, "a", 1)
    encode = jobs.create(Job.new("a", "encode", {"upload_id": "x"}))
    assert enqueue(scheduler, encode)
    assert scheduler.next("cpu", "w1", 30, 3).job.id == encode.id
    assert scheduler.next("cpu", "w1", 30, 3).outcome == "empty"
    assert scheduler.next("gpu", "w1", 30, 3).job.id == gpu[0]


def test_queued_jobs_left_adrift_are_found_and_waiting_ones_are_not(jobs, scheduler) -> None:
    (pending,) = queue_jobs(jobs, scheduler, "a", 1)
    adrift = jobs.create(Job.new("a", "generate", PARAMS))  # its push never happened
    waiting = Job.new("b", "generate", PARAMS)
    waiting.stage = "waiting"  # on its encode step: pushed only when that succeeds
    jobs.create(waiting)
    assert scheduler.adrift() == [adrift.id]
    assert enqueue(scheduler, adrift) and scheduler.adrift() == []
    assert pending in scheduler.pending("gpu", "a")["interactive"]
