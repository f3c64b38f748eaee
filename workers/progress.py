"""Throttled progress reporting: pipelines call it every frame, Redis sees it twice a second.

A ProgressReporter is a shared.core.progress.Progress: the pipelines call it directly with the
fraction (0–1) of the job done. Calls only record the latest state in memory; a background
thread writes it to the job store as a percentage every `interval` seconds (even when nothing
moved, so watchers see the job alive at least once a second), and a stage change is written at
once.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from shared.core.jobs import JobStore

log = logging.getLogger(__name__)


@dataclass
class _State:
    percent: float = 0.0
    stage: str = "running"
    frames_done: int | None = None
    frames_total: int | None = None
    message: str = ""


class ProgressReporter:
    def __init__(self, store: JobStore, job_id: str, interval: float = 0.5) -> None:
        self.store = store
        self.job_id = job_id
        self.interval = interval
        self._state = _State()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # writes in order: a stale one never lands last
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{job_id}", daemon=True)

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def __call__(
        self,
        stage: str,
        fraction: float,
        frames_done: int | None = None,
        frames_total: int | None = None,
        message: str = "",
    ) -> None:
        """Record the latest progress (0–1 of the job); a new stage is written at once."""
        percent = min(max(100.0 * fraction, 0.0), 100.0)
        with self._lock:
            new_stage = stage != self._state.stage
            self._state = _State(percent, stage, frames_done, frames_total, message)
        if new_stage:
            self._write()

    def _write(self) -> None:
        with self._write_lock:
            with self._lock:
                s = self._state
            self._store_write(s)

    def _store_write(self, s: _State) -> None:
        try:
            self.store.progress(
                self.job_id,
                round(s.percent, 2),
                s.stage,
                message=s.message,
                frames_done=s.frames_done,
                frames_total=s.frames_total,
            )
        except Exception:  # noqa: BLE001 (a lost progress write must not fail the job)
            log.exception("progress write for job %s failed", self.job_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()
