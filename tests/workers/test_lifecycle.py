"""The runner's lease rules in-process, with stand-in pipelines (no models): a worker that lost
its lease neither finishes the job nor writes its artifacts, a stopping worker hands its job
back, and a Redis error while finishing never costs a succeeded job its artifacts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from shared.core.config import Settings
from shared.core.jobs import Job, JobStore, UploadStore, job_key
from shared.core.progress import Aborted
from shared.core.queueing import enqueue
from shared.core.quotas import Quotas, QuotaStore
from shared.core.scheduler import FairScheduler
from shared.core.storage import LocalStore, artifact_key
from workers.handlers import HANDLERS, Output
from workers.lease import LeaseKeeper
from workers.runner import JobRunner

Pipeline = Callable[[Job, object, Callable[[], bool]], Output]


@pytest.fixture
def runner(
    redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[JobRunner]:
    settings = Settings.from_env(
        {
            "HEARTCLUSTER_LEASE_S": "30",
            "HEARTCLUSTER_HEARTBEAT_S": "10",
            "HEARTCLUSTER_REDIS_RETRY_S": "5",
        }
    )
    sent: list[Job] = []
    runner = JobRunner(
        settings,
        JobStore(redis_client),
        LocalStore(tmp_path / "artifacts"),
        SimpleNamespace(model_version="test", tiny=True),  # no pipeline here loads a model
        UploadStore(redis_client),
        enqueue=sent.append,
        scheduler=FairScheduler(redis_client, Quotas()),
        wake=lambda queue: None,
        worker="w1",
    )
    runner.sent = sent  # type: ignore[attr-defined]
    # generate jobs run a stand-in pipeline that each test sets (no model is loaded)
    monkeypatch.setitem(
        HANDLERS,
        "generate",
        lambda ctx: runner.stand_in(ctx.job, ctx.progress, ctx.should_abort),  # type: ignore[attr-defined]
    )
    yield runner
    runner.close()


def _submit(runner: JobRunner, pipeline: Pipeline) -> Job:
    runner.stand_in = pipeline  # type: ignore[attr-defined]
    return runner.jobs.create(Job.new("acme", "generate", {"tags": "piano"}))


def _output() -> Output:
    """What a song job declares (registry): tokens, audio, preview."""
    return Output(
        files={"tokens.npy": b"tokens", "audio.flac": b"audio", "preview.png": b"png"}, metadata={}
    )


def _stored(runner: JobRunner, job: Job) -> bool:
    return runner.objects.exists(artifact_key(job.tenant, job.id, "audio.flac"))


def test_a_worker_whose_lease_was_taken_over_writes_and_finishes_nothing(
    runner: JobRunner,
) -> None:
    def taken_over(job: Job, progress: object, should_abort: Callable[[], bool]) -> Output:
        runner.jobs._redis.hset(job_key(job.id), "lease_expires_at", "0")  # it looked dead
        outcome, _, _ = runner.jobs.acquire(job.id, "w2", 30, 3)
        assert outcome == "started"
        return _output()

    job = _submit(runner, taken_over)
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "running" and final.worker == "w2" and final.attempts == 2
    assert not _stored(runner, job)


def test_a_stopping_worker_hands_its_running_job_back(runner: JobRunner) -> None:
    def long_song(job: Job, progress: object, should_abort: Callable[[], bool]) -> Output:
        runner.stop(grace_s=0.0)
        while not should_abort():
            pass
        raise Aborted("stand-in aborted")

    job = _submit(runner, long_song)
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "queued" and final.attempts == 0 and final.lease_id is None
    assert [sent.id for sent in runner.sent] == [job.id]  # its message is sent again
    assert not _stored(runner, job)


def test_a_stopped_worker_passes_new_deliveries_on(runner: JobRunner) -> None:
    job = _submit(runner, lambda *_: _output())
    runner.stop(grace_s=60.0)
    runner.run(job.id)
    assert runner.jobs.get(job.id).state == "queued"
    assert [sent.id for sent in runner.sent] == [job.id]


def test_a_redis_error_while_succeeding_is_retried_and_keeps_the_artifacts(
    runner: JobRunner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_succeed = runner.jobs.succeed
    failures = iter([redis.ConnectionError("Redis restarting"), redis.TimeoutError("slow")])

    def blinking(*args: object, **kwargs: object) -> Job | None:
        error = next(failures, None)
        if error is not None:
            raise error
        return real_succeed(*args, **kwargs)

    monkeypatch.setattr(runner.jobs, "succeed", blinking)
    job = _submit(runner, lambda *_: _output())
    with caplog.at_level(logging.WARNING):
        runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "succeeded"
    assert sorted(final.artifacts) == sorted([*_output().files, "metadata.json"])
    assert _stored(runner, job)
    outage_lines = [r.getMessage() for r in caplog.records if "Redis" in r.getMessage()]
    assert len(outage_lines) == 2  # once away, once back: not a line per retry
    assert outage_lines[0].startswith("Redis away") and outage_lines[1].startswith("Redis back")


def test_a_lost_worker_job_is_reaped_and_sent_again(runner: JobRunner) -> None:
    job = _submit(runner, lambda *_: _output())
    runner.jobs.acquire(job.id, "dead-worker", 30, 3)
    runner.jobs._redis.hset(job_key(job.id), "lease_expires_at", "0")
    runner.jobs._redis.zadd("job-leases", {job.id: 0})
    runner.leases.beat()
    assert runner.jobs.get(job.id).state == "queued"
    assert [sent.id for sent in runner.sent] == [job.id]
    runner.run(job.id)
    final = runner.jobs.get(job.id)
    assert final.state == "succeeded" and final.attempts == 2 and final.worker == "w1"


def test_an_idle_worker_reaps_a_lost_workers_job(redis_client: redis.Redis) -> None:
    settings = Settings.from_env({"HEARTCLUSTER_LEASE_S": "0.5", "HEARTCLUSTER_HEARTBEAT_S": "0.1"})
    jobs = JobStore(redis_client)
    job = jobs.create(Job.new("acme", "generate", {"tags": "piano"}))
    jobs.acquire(job.id, "dead-worker", settings.lease_s, settings.max_attempts)
    reaped: list[tuple[str, str]] = []
    keeper = LeaseKeeper(jobs, settings, "idle", lambda outcome, j: reaped.append((outcome, j.id)))
    keeper.start()  # holds no lease of its own
    deadline = time.monotonic() + 10
    while not reaped and time.monotonic() < deadline:
        time.sleep(0.05)
    keeper.close()
    assert reaped == [("requeued", job.id)]
    assert jobs.get(job.id).state == "queued"


def test_run_next_runs_the_schedulers_choice_and_resends_a_parked_wake_up(
    runner: JobRunner, redis_client
) -> None:
    woken: list[str] = []
    runner.wake = woken.append
    QuotaStore(redis_client, Quotas()).set("acme", {"max_running": 1})
    first, second = (_submit(runner, lambda *_: _output()) for _ in range(2))
    for job in (first, second):
        assert enqueue(runner.scheduler, job)

    def blocked_meanwhile(job: Job, progress: object, should_abort: Callable[[], bool]) -> Output:
        # another slot's wake-up while this one runs: the tenant is at its limit
        assert runner.scheduler.next("gpu", "w2", 30, 3).outcome == "blocked"
        return _output()

    runner.stand_in = blocked_meanwhile  # type: ignore[attr-defined]
    runner.run_next("gpu")
    assert runner.jobs.get(first.id).state == "succeeded"
    assert woken == ["gpu"]  # its slot freed: the parked wake-up goes out again
    runner.stand_in = lambda *_: _output()  # type: ignore[attr-defined]
    runner.run_next("gpu")
    assert runner.jobs.get(second.id).state == "succeeded"
    runner.run_next("gpu")  # nothing left: a no-op
    runner.stop(grace_s=60.0)
    runner.run_next("gpu")
    assert woken == ["gpu", "gpu"]  # a stopping worker passes a wake-up on
