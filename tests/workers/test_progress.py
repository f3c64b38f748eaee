"""The worker's ProgressReporter is a Progress: pipelines call it directly with fractions of the
job, the store sees percentages, stages and frame counts (real redis-server)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.core.jobs import Job, JobStore
from shared.core.progress import share_of
from workers.progress import ProgressReporter
from workers.runner import PIPELINE_SHARE


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client)


@pytest.fixture
def job(store: JobStore) -> Job:
    job = store.create(Job.new("acme", "generate", {"tags": "piano"}))
    return store.start(job.id)


@pytest.fixture
def reporter(store: JobStore, job: Job) -> Iterator[ProgressReporter]:
    # An interval no test outlives: only stage changes reach the store while a test runs.
    with ProgressReporter(store, job.id, interval=3600.0) as reporter:
        yield reporter


def _seen(store: JobStore, job: Job) -> tuple[float, str, int | None, int | None]:
    got = store.get(job.id)
    return got.progress, got.stage, got.frames_done, got.frames_total


def test_a_new_stage_is_written_at_once_as_a_percentage(
    store: JobStore, job: Job, reporter: ProgressReporter
) -> None:
    reporter("generating", 0.25, 10, 40)
    assert _seen(store, job) == (25.0, "generating", 10, 40)


def test_updates_within_a_stage_wait_for_the_writer(
    store: JobStore, job: Job, reporter: ProgressReporter
) -> None:
    reporter("generating", 0.1, 4, 40)
    reporter("generating", 0.2, 8, 40)  # recorded, written on the next tick (an hour away)
    assert _seen(store, job) == (10.0, "generating", 4, 40)
    reporter("decoding", 0.9)
    assert _seen(store, job)[:2] == (90.0, "decoding")


def test_fractions_outside_zero_to_one_are_clamped(
    store: JobStore, job: Job, reporter: ProgressReporter
) -> None:
    reporter("generating", -0.5)
    assert _seen(store, job)[:2] == (0.0, "generating")
    reporter("uploading", 1.5)
    assert _seen(store, job)[:2] == (100.0, "uploading")


def test_a_pipeline_share_reaches_the_store_scaled(
    store: JobStore, job: Job, reporter: ProgressReporter
) -> None:
    """What the runner hands a pipeline: its reports land in the first 95 % of the job, with
    their frame counts; generating then decoding within it (80 / 20) nest the same way."""
    pipeline = share_of(reporter, 0.0, PIPELINE_SHARE)
    share_of(pipeline, 0.0, 0.8)("generating", 0.5, 25, 50)
    assert _seen(store, job) == (38.0, "generating", 25, 50)
    share_of(pipeline, 0.8, 1.0)("decoding", 1.0, 50, 50)
    assert _seen(store, job) == (95.0, "decoding", 50, 50)
    reporter("uploading", PIPELINE_SHARE)
    assert _seen(store, job)[:2] == (95.0, "uploading")
