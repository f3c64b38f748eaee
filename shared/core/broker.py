"""kombu's Redis transport, made to survive a Redis restart while a worker holds messages.

kombu 5.7 (pinned) reaches for a new Redis client through a channel whose connection Celery has
already closed after Redis went away, and fails with an AttributeError ('NoneType' object has no
attribute 'hostname' / 'client') that Celery treats as unrecoverable: every worker holding a
message exits. Two paths do it: the restore of unacknowledged messages when the broken channel
closes, and the acknowledgement of a task that finishes after the reconnect. Here the first is
off (the messages stay in Redis's unacked index, and every live worker sweeps them back into the
queue after the short visibility timeout; a redelivery is harmless, the job store's leases
decide who runs a job) and the second reaches Redis with the channel's last connection
parameters, so the task is acknowledged as usual. Used as Celery's `broker_transport`.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    do_restore = False  # the visibility-timeout sweep restores them instead
    _last_params: dict[str, Any] | None = None

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:  # closed by an outage
            if self._last_params is None:
                raise redis.ConnectionError("this broker channel was closed when Redis went away")
            return dict(self._last_params)
        params = super()._connparams(asynchronous=asynchronous)
        if not asynchronous:
            self._last_params = dict(params)
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
