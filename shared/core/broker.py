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

It also writes a task message the way this transport stores one (`stored_message`), so that a
Redis script can put it on the queue in the same atomic step as the state it wakes up for.
"""

from __future__ import annotations

import base64
import functools
import json
import uuid
from typing import Any

import redis
from celery import Celery
from kombu.serialization import dumps
from kombu.transport import redis as kombu_redis

# Builds Celery's own task messages (protocol 2); never connects anywhere.
_PROTOCOL = Celery("heartcluster-messages", set_as_current=False).amqp


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


def stored_message(queue: str, task_name: str, task_id: str, args: list[Any]) -> str:
    """A task message for `queue` exactly as this transport stores it: the list entry that
    `LPUSH queue <entry>` puts where a worker consuming `queue` takes it.

    Celery builds the message (headers, properties, body); around it goes kombu's envelope, as
    the virtual channel's publish adds it (base64 body, a delivery tag of its own, the queue as
    routing key on the default exchange, priority 0, persistent). Only the ids change from one
    message to the next, so the rest is built once per (queue, task, args). A test checks it
    against what Celery's `send_task` stores.
    """
    message = _template(queue, task_name, tuple(args))
    return json.dumps(
        {
            **message,
            "headers": {**message["headers"], "id": task_id, "root_id": task_id},
            "properties": {
                **message["properties"],
                "correlation_id": task_id,
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


@functools.cache
def _template(queue: str, task_name: str, args: tuple[Any, ...]) -> dict[str, Any]:
    message = _PROTOCOL.as_task_v2("", task_name, args=list(args), ignore_result=True)
    content_type, encoding, body = dumps(message.body, serializer="json")
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": encoding,
        "content-type": content_type,
        "headers": message.headers,
        "properties": {
            **message.properties,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
        },
    }
