"""The Redis job store against a real redis-server: states, index, events, idempotency."""

from __future__ import annotations

import threading
import time

import pytest

from shared.core.jobs import BUSY, STARTED, TERMINAL, Job, JobStore, Upload, UploadStore, job_key


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client)


def make_job(tenant: str = "acme", type: str = "generate", created_at: float | None = None) -> Job:
    job = Job.new(tenant, type, {"tags": "piano"})
    if created_at is not None:
        job.created_at = created_at
    return job


def test_round_trip_keeps_types(store: JobStore) -> None:
    job = store.create(make_job())
    loaded = store.get(job.id)
    assert loaded == job
    assert loaded.to_dict() == job.to_dict()
    assert Job.from_dict({**job.to_dict(), "future_field": 1}) == job
    assert store.get("missing") is None


def test_get_for_tenant_hides_other_tenants(store: JobStore) -> None:
    job = store.create(make_job("acme"))
    assert store.get_for_tenant("acme", job.id) == job
    assert store.get_for_tenant("other", job.id) is None


def test_create_refuses_an_existing_id(store: JobStore) -> None:
    job = store.create(make_job())
    with pytest.raises(Exception, match="already exists"):
        store.create(job)


def test_lifecycle_to_success(store: JobStore) -> None:
    job = store.create(make_job())
    running = store.start(job.id)
    assert running.state == "running" and running.attempts == 1 and running.started_at
    store.progress(job.id, 42.5, "generating", "frame 10", frames_done=10, frames_total=24)
    got = store.get(job.id)
    assert (got.progress, got.stage, got.frames_done, got.frames_total) == (
        42.5,
        "generating",
        10,
        24,
    )
    done = store.succeed(job.id, ["tokens.npy", "audio.flac"])
    assert done.state == "succeeded" and done.progress == 100.0 and done.finished_at
    assert store.get(job.id).artifacts == ["tokens.npy", "audio.flac"]


def test_redelivered_running_job_counts_attempts(store: JobStore) -> None:
    job = store.create(make_job())
    store.start(job.id)
    assert store.start(job.id).attempts == 2


def test_terminal_states_never_change(store: JobStore) -> None:
    job = store.create(make_job())
    store.start(job.id)
    assert store.fail(job.id, "boom", "it broke").error == {"code": "boom", "message": "it broke"}
    assert store.start(job.id) is None
    assert store.succeed(job.id, ["x"]) is None
    assert store.mark_cancelled(job.id) is None
    store.progress(job.id, 50, "generating")
    assert store.cancel(job.id).state == "failed"
    final = store.get(job.id)
    assert final.state == "failed" and final.artifacts == [] and final.progress == 0.0


def test_cancel_queued_is_immediate_and_never_starts(store: JobStore) -> None:
    job = store.create(make_job())
    cancelled = store.cancel(job.id)
    assert cancelled.state == "cancelled" and cancelled.finished_at
    assert store.start(job.id) is None
    assert store.cancel(job.id).state == "cancelled"


def test_cancel_running_sets_the_flag_for_the_worker(store: JobStore) -> None:
    job = store.create(make_job())
    store.start(job.id)
    assert store.cancel_requested(job.id) is False
    flagged = store.cancel(job.id)
    assert flagged.state == "running" and flagged.cancel_requested
    assert store.cancel_requested(job.id) is True
    assert store.mark_cancelled(job.id).state == "cancelled"
    assert store.succeed(job.id, ["audio.flac"]) is None


def test_unknown_job_operations(store: JobStore) -> None:
    assert store.cancel("nope") is None
    assert store.start("nope") is None
    assert store.cancel_requested("nope") is False
    store.progress("nope", 1, "generating")
    assert store.get("nope") is None


def test_concurrent_finishers_leave_one_terminal_state(store: JobStore) -> None:
    job = store.create(make_job())
    store.start(job.id)
    results: list[object] = []
    barrier = threading.Barrier(3)

    def run(action) -> None:
        barrier.wait()
        results.append(action())

    threads = [
        threading.Thread(target=run, args=(lambda: store.succeed(job.id, ["a"]),)),
        threading.Thread(target=run, args=(lambda: store.fail(job.id, "x", "y"),)),
        threading.Thread(target=run, args=(lambda: store.mark_cancelled(job.id),)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert store.get(job.id).state == winners[0].state


def test_list_newest_first_with_filters_and_cursor(store: JobStore) -> None:
    jobs = [store.create(make_job(created_at=1000.0 + i)) for i in range(7)]
    # two jobs with the same timestamp must both appear exactly once across pages
    same = [store.create(make_job(created_at=1003.0)) for _ in range(2)]
    encode = store.create(make_job(type="encode", created_at=2000.0))
    store.create(make_job(tenant="other", created_at=3000.0))
    store.start(jobs[1].id)

    everything, cursor = store.list("acme", limit=100)
    assert cursor is None
    assert [j.created_at for j in everything] == sorted(
        (j.created_at for j in everything), reverse=True
    )
    assert everything[0].id == encode.id and len(everything) == 10

    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = store.list("acme", limit=3, cursor=cursor)
        assert len(page) <= 3
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == [j.id for j in everything]
    assert {s.id for s in same} <= set(seen)

    assert [j.id for j in store.list("acme", type="encode")[0]] == [encode.id]
    assert [j.id for j in store.list("acme", state="running")[0]] == [jobs[1].id]
    assert store.list("acme", state="failed") == ([], None)
    assert [j.tenant for j in store.list("other")[0]] == ["other"]
    # a job created after paging began does not shift the next page
    first, cursor = store.list("acme", limit=2)
    store.create(make_job(created_at=5000.0))
    second, _ = store.list("acme", limit=2, cursor=cursor)
    assert [j.id for j in first + second] == [j.id for j in everything[:4]]


def test_list_rejects_a_bad_cursor(store: JobStore) -> None:
    with pytest.raises(ValueError, match="cursor"):
        store.list("acme", cursor="!!not-a-cursor")


def test_idempotent_create_returns_the_first_job(store: JobStore) -> None:
    first, created = store.create_idempotent(make_job(), "key-1")
    assert created
    again, created_again = store.create_idempotent(make_job(), "key-1")
    assert not created_again and again.id == first.id
    other_tenant, created_other = store.create_idempotent(make_job("other"), "key-1")
    assert created_other and other_tenant.id != first.id
    assert len(store.list("acme")[0]) == 1


def test_events_stream_until_terminal(store: JobStore) -> None:
    job = store.create(make_job())
    events = store.events(job.id, idle_s=5.0)
    first = next(events)
    assert first["event"] == "state" and first["job"]["state"] == "queued"

    def work() -> None:
        store.start(job.id)
        store.progress(job.id, 50, "generating")
        store.succeed(job.id, ["audio.flac"])

    worker = threading.Thread(target=work)
    worker.start()
    rest = list(events)
    worker.join()
    assert [(e["event"], e["job"]["state"]) for e in rest] == [
        ("state", "running"),
        ("progress", "running"),
        ("state", "succeeded"),
    ]
    assert rest[1]["job"]["progress"] == 50


def test_events_of_finished_and_unknown_jobs(store: JobStore) -> None:
    job = store.create(make_job())
    store.cancel(job.id)
    assert [e["job"]["state"] for e in store.events(job.id)] == ["cancelled"]
    assert list(store.events("missing")) == []


def test_events_idle_keepalive_then_terminal_found_by_polling(
    store: JobStore, redis_client
) -> None:
    job = store.create(make_job())
    events = store.events(job.id, idle_s=0.2)
    next(events)
    assert next(events) is None  # idle: keep-alive
    # a state change whose publish was missed is found by re-reading the record
    redis_client.hset(f"job:{job.id}", "state", '"failed"')
    assert next(events)["job"]["state"] == "failed"
    assert list(events) == []


def test_uploads_are_per_tenant(redis_client) -> None:
    uploads = UploadStore(redis_client)
    upload = uploads.create(
        Upload(
            id="u1",
            tenant="acme",
            key="tenants/acme/uploads/u1/a.wav",
            filename="a.wav",
            kind="audio",
            bytes=100,
            duration_s=1.5,
            sample_rate=48000,
            channels=2,
        )
    )
    assert uploads.get_for_tenant("acme", "u1") == upload
    assert uploads.get_for_tenant("other", "u1") is None
    assert uploads.get("u2") is None
    with pytest.raises(ValueError, match="exists"):
        uploads.create(upload)


# -- leases ------------------------------------------------------------------------------------

SHORT_LEASE_S = 0.2


def expire(store: JobStore) -> None:
    """Let the leases of these jobs lapse (the worker holding them stopped renewing)."""
    time.sleep(SHORT_LEASE_S + 0.05)


def test_a_live_lease_keeps_other_workers_off(store: JobStore) -> None:
    job = store.create(make_job())
    outcome, running, lease = store.acquire(job.id, "w1", 30, 3)
    assert outcome == STARTED and lease is not None
    assert running.worker == "w1" and running.lease_id == lease.lease_id and running.attempts == 1
    assert store.acquire(job.id, "w2", 30, 3)[0] == BUSY
    assert store.get(job.id).attempts == 1
    assert store.succeed(job.id, ["a"], lease_id="someone-else") is None
    assert store.fail(job.id, "x", "y", lease_id="someone-else") is None
    assert store.mark_cancelled(job.id, lease_id="someone-else") is None
    assert store.succeed(job.id, ["a"], lease_id=lease.lease_id).state == "succeeded"
    assert store.acquire(job.id, "w2", 30, 3)[0] == TERMINAL
    assert store.reap(3) == []


def test_an_expired_lease_is_reaped_once_and_fences_its_worker_out(store: JobStore) -> None:
    job = store.create(make_job())
    _, _, old = store.acquire(job.id, "w1", SHORT_LEASE_S, 3)
    expire(store)
    assert store.renew([old], SHORT_LEASE_S) == []  # nobody took it yet: renewing is fine
    expire(store)
    [(outcome, requeued)] = store.reap(3)
    assert outcome == "requeued" and requeued.state == "queued" and requeued.attempts == 1
    assert requeued.lease_id is None and requeued.worker is None
    assert store.reap(3) == []
    _, _, new = store.acquire(job.id, "w2", 30, 3)
    assert store.get(job.id).attempts == 2
    assert store.renew([old, new], 30) == [job.id]  # the old worker learns it lost the job
    assert store.succeed(job.id, ["stale"], lease_id=old.lease_id) is None
    assert store.succeed(job.id, ["fresh"], lease_id=new.lease_id).artifacts == ["fresh"]


def test_the_attempt_cap_and_a_pending_cancel_end_reaped_jobs(store: JobStore) -> None:
    poison, flagged = store.create(make_job()), store.create(make_job())
    for _ in range(2):
        store.acquire(poison.id, "w", SHORT_LEASE_S, 2)
        expire(store)
        store.reap(2)
    store.acquire(flagged.id, "w", SHORT_LEASE_S, 2)
    store._redis.hset(job_key(flagged.id), "cancel_requested", "true")  # asked, worker dead
    expire(store)
    outcomes = {job.id: (outcome, job.state) for outcome, job in store.reap(2)}
    assert outcomes == {flagged.id: ("cancelled", "cancelled")}
    final = store.get(poison.id)
    assert final.state == "failed" and final.error["code"] == "too_many_attempts"
    assert final.attempts == 2
    assert store.acquire(poison.id, "w", 30, 2)[0] == TERMINAL


def test_acquire_at_the_cap_fails_the_job(store: JobStore) -> None:
    job = store.create(make_job())
    store.acquire(job.id, "w1", SHORT_LEASE_S, 1)
    expire(store)
    outcome, failed, lease = store.acquire(job.id, "w2", 30, 1)
    assert outcome == "too_many_attempts" and lease is None
    assert failed.error["code"] == "too_many_attempts" and "MAX_ATTEMPTS=1" in failed.message


def test_concurrent_reapers_take_each_job_once(store: JobStore) -> None:
    jobs = [store.create(make_job()) for _ in range(30)]
    for job in jobs:
        store.acquire(job.id, "dead", SHORT_LEASE_S, 3)
    expire(store)
    results: list[list[str]] = []
    barrier = threading.Barrier(4)

    def reaper() -> None:
        barrier.wait()
        results.append([job.id for _, job in store.reap(3, limit=7)] + reap_all(store))

    threads = [threading.Thread(target=reaper) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reaped = [job_id for result in results for job_id in result]
    assert sorted(reaped) == sorted(job.id for job in jobs)
    assert {store.get(job.id).state for job in jobs} == {"queued"}


def reap_all(store: JobStore) -> list[str]:
    reaped: list[str] = []
    while batch := store.reap(3, limit=7):
        reaped += [job.id for _, job in batch]
    return reaped


def test_cancel_ends_a_job_whose_worker_is_gone_at_once(store: JobStore) -> None:
    live, lost = store.create(make_job()), store.create(make_job())
    store.acquire(live.id, "w1", 30, 3)
    store.acquire(lost.id, "w2", SHORT_LEASE_S, 3)
    expire(store)
    assert store.cancel(live.id).state == "running"
    cancelled = store.cancel(lost.id)
    assert cancelled.state == "cancelled" and cancelled.finished_at
    assert store.reap(3) == []


def test_hand_back_requeues_without_counting_the_attempt(store: JobStore) -> None:
    job = store.create(make_job())
    _, _, lease = store.acquire(job.id, "w1", 30, 3)
    queued = store.hand_back(lease)
    assert queued.state == "queued" and queued.attempts == 0 and queued.lease_id is None
    assert store.hand_back(lease) is None  # no longer held
    _, _, again = store.acquire(job.id, "w2", 30, 3)
    assert store.get(job.id).attempts == 1
    assert store.hand_back(lease) is None and store.get(job.id).lease_id == again.lease_id
