"""Redis outages: which errors mean "Redis is away", and one log line when it goes and comes.

A Redis restart makes every call fail for a while; logging each failure would print thousands
of tracebacks. Callers report each outcome to an `Outage`, which logs the change of state only.
No torch: the gateway imports this.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from kombu.exceptions import OperationalError

# Raised by redis-py (job store) and kombu (sending a task) while Redis cannot be reached.
REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    OperationalError,
)


class Outage:
    """Tracks whether Redis answers, logging once when it stops and once when it is back."""

    def __init__(self, log: logging.Logger, what: str = "Redis") -> None:
        self._log = log
        self._what = what
        self._lock = threading.Lock()
        self._since: float | None = None  # monotonic time of the first failure
        self.recovered_at: float | None = None  # monotonic time it answered again

    @property
    def away(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        self._log.warning("%s away (%s: %s); retrying", self._what, type(error).__name__, error)

    def ok(self) -> None:
        with self._lock:
            if self._since is None:
                return
            now = time.monotonic()
            down_s, self._since, self.recovered_at = now - self._since, None, now
        self._log.warning("%s back after %.1f s", self._what, down_s)
