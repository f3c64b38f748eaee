"""A worker process that runs one job through the real runner and models, without Celery:
`python -m tests.support.finetune_worker JOB_ID` (settings from HEARTCLUSTER_* variables).
Tests kill it with SIGKILL mid-run to play a worker that died."""

from __future__ import annotations

import sys

import redis

from shared.core.config import Settings
from shared.core.jobs import JobStore, UploadStore
from shared.core.quotas import Quotas
from shared.core.scheduler import FairScheduler
from shared.core.storage import store_from_settings
from workers.models import WorkerModels
from workers.runner import JobRunner


def main(job_id: str) -> None:
    settings = Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url)
    runner = JobRunner(
        settings,
        JobStore(client),
        store_from_settings(settings),
        WorkerModels(settings),
        UploadStore(client),
        enqueue=lambda job: None,
        scheduler=FairScheduler(client, Quotas()),
        wake=lambda queue: None,
        worker="doomed",
    )
    runner.run(job_id)


if __name__ == "__main__":
    main(sys.argv[1])
