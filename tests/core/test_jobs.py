"""The Redis job store against a real redis-server: states, index, events, idempotency."""

from __future__ import annotations

import threading

import pytest

from shared.core.jobs import Job, JobStore, Upload, UploadStore


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
