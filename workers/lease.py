"""This worker process's leases: one heartbeat thread renews them all and reaps lost workers'.

Every `heartbeat_s` the thread extends the lease of each job the process runs (one Lua call),
flags the jobs whose lease was taken over (their runs stop and never finish them), then reaps
expired leases of any worker: no coordinator, every worker reaps and the script picks one
winner per job. After Redis was away it waits a full lease period before reaping, so leases
that only lapsed because nobody could renew them are renewed first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from shared.core.config import Settings
from shared.core.jobs import Job, JobStore, Lease
from shared.core.outage import REDIS_ERRORS, Outage

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        jobs: JobStore,
        settings: Settings,
        worker: str,
        on_reaped: Callable[[str, Job], None],
        outage: Outage | None = None,
    ) -> None:
        self.jobs = jobs
        self.settings = settings
        self.worker = worker
        self.on_reaped = on_reaped  # sends a requeued job's message, cleans up an ended one
        self.outage = outage or Outage(log)
        self._held: dict[str, tuple[Lease, threading.Event]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the heartbeat (at worker start: an idle worker reaps too). Idempotent."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="leases", daemon=True)
                self._thread.start()

    def hold(self, lease: Lease) -> threading.Event:
        """Keep `lease` renewed until `release`; the event is set if the lease is lost."""
        lost = threading.Event()
        with self._lock:
            self._held[lease.job_id] = (lease, lost)
        self.start()
        return lost

    def release(self, lease: Lease) -> None:
        with self._lock:
            held = self._held.get(lease.job_id)
            if held is not None and held[0] == lease:
                del self._held[lease.job_id]

    def held(self) -> list[Lease]:
        with self._lock:
            return [lease for lease, _ in self._held.values()]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.redis_timeout_s * 2)

    def beat(self) -> None:
        """One round: renew, flag lost leases, reap (unless Redis only just came back)."""
        with self._lock:
            held = dict(self._held)
        try:
            lost = self.jobs.renew([lease for lease, _ in held.values()], self.settings.lease_s)
            for job_id in lost:
                log.warning("job %s: lease lost (another worker took it over); stopping it", job_id)
                held[job_id][1].set()
            self.outage.ok()
            recovered = self.outage.recovered_at
            if recovered is None or time.monotonic() - recovered >= self.settings.lease_s:
                for outcome, job in self.jobs.reap(self.settings.max_attempts):
                    log.warning("job %s: its worker's lease expired; %s", job.id, outcome)
                    self.on_reaped(outcome, job)
        except REDIS_ERRORS as error:
            self.outage.failed(error)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 (the heartbeat must outlive any one failure)
                log.exception("lease heartbeat failed")
