"""Prometheus metrics of the gateway: requests by route and status with their latency, and the
depth of every queue, read from Redis when scraped.

Under gunicorn (api/gateway/gunicorn_conf.py) prometheus-client runs in multiprocess mode and
/metrics sums the files every worker process writes; under Werkzeug it serves this process's
registry. Latency is the time to the response's first byte: an SSE stream counts until its
headers leave, not while it stays open.
"""

from __future__ import annotations

import os
import time

import redis
from flask import Blueprint, Flask, Response, g, request
from flask.typing import ResponseReturnValue
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from api.gateway.apidoc import Reply, documented
from api.gateway.app import services
from shared.core.queueing import QUEUES

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED = "unmatched"  # the route label of requests no route matched (bounded cardinality)

REQUESTS = Counter(
    "heartcluster_http_requests_total",
    "HTTP requests answered, by route template, method and status",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "heartcluster_http_request_duration_seconds",
    "Time to the response's first byte, by route template and method",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

bp = Blueprint("metrics", __name__)
_TEXT = {"schema": {"type": "string"}}


class QueueDepth(Collector):
    """Waiting messages per queue: Celery's Redis transport keeps each queue in a list named
    after it (the same lists KEDA scales the workers on)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self):  # type: ignore[no-untyped-def] (prometheus-client's own signature)
        family = GaugeMetricFamily(
            "heartcluster_queue_depth", "Jobs waiting in each queue", labels=["queue"]
        )
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for queue in QUEUES:
                    pipe.llen(queue)
                depths = pipe.execute()
        except redis.RedisError:
            return  # Redis away: no depth rather than a failed scrape
        for queue, depth in zip(QUEUES, depths, strict=True):
            family.add_metric([queue], depth)
        yield family


def register_metrics(app: Flask) -> None:
    """Time every request and serve /metrics (register before other request hooks)."""
    app.before_request(_start_timer)
    app.after_request(_record)
    app.register_blueprint(bp)


def _start_timer() -> None:
    g.metrics_start = time.perf_counter()


def _record(response: Response) -> Response:
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
    REQUESTS.labels(route, request.method, str(response.status_code)).inc()
    start = g.get("metrics_start")
    if start is not None:
        LATENCY.labels(route, request.method).observe(time.perf_counter() - start)
    return response


@bp.get("/metrics")
@documented({200: Reply("Prometheus text exposition", content={"text/plain": _TEXT})})
def metrics() -> ResponseReturnValue:
    """Prometheus metrics (no authentication: scrape it from inside the cluster)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    queues = CollectorRegistry(auto_describe=False)
    queues.register(QueueDepth(services().redis))
    body = generate_latest(registry) + generate_latest(queues)
    return Response(body, content_type=CONTENT_TYPE_LATEST)
