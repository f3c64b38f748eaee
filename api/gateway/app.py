"""The gateway's app factory: wires settings, Redis, the object store and Celery into Flask.

Every dependency can be injected, so tests run the real app against a real redis-server with a
recording stand-in for Celery, and deployments build everything from HEARTCLUSTER_* variables.
Never imports torch or workers/: jobs are sent to Celery by task name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from flask import Flask, current_app

from api.gateway.errors import register_error_handlers
from shared.core.config import Settings
from shared.core.inputs import InputResolver
from shared.core.jobs import JobStore, UploadStore
from shared.core.queueing import make_celery
from shared.core.storage import ObjectStore, store_from_settings
from shared.core.tenants import TenantStore

# multipart framing around an upload of the maximum size
UPLOAD_OVERHEAD_BYTES = 64 * 1024
# Redis connections per gateway process: an open SSE stream holds one (its subscription) and its
# thread may take another; redis-py's default of 100 refused the 101st stream.
REDIS_CONNECTIONS = 1024


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    uploads: UploadStore
    tenants: TenantStore
    store: ObjectStore
    celery: Any  # celery.Celery, or a stand-in with send_task / control in tests

    @property
    def inputs(self) -> InputResolver:
        """Resolves the jobs and uploads a submit refers to (the workers use the same rules)."""
        return InputResolver(self.jobs, self.uploads, self.store)


def services() -> Services:
    """The current app's services (inside a request)."""
    return current_app.extensions["heartcluster"]


def create_app(
    settings: Settings | None = None,
    redis_client: redis.Redis | None = None,
    store: ObjectStore | None = None,
    celery_app: Any = None,
) -> Flask:
    """The gateway. Anything not given is built from `settings` (default: the environment)."""
    from api.gateway.limits import limit_body
    from api.gateway.metrics import register_metrics
    from api.gateway.openapi import bp as openapi_bp
    from api.gateway.routes.batches import bp as batches_bp
    from api.gateway.routes.datasets import bp as datasets_bp
    from api.gateway.routes.docs import bp as docs_bp
    from api.gateway.routes.health import bp as health_bp
    from api.gateway.routes.jobs import bp as jobs_bp
    from api.gateway.routes.uploads import bp as uploads_bp
    from api.gateway.routes.usage import bp as usage_bp
    from api.gateway.routes.web import bp as web_bp
    from api.gateway.routes.webhooks import bp as webhooks_bp

    settings = settings or Settings.from_env()
    redis_client = redis_client or redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,  # no request hangs while Redis is away
        health_check_interval=30,
        max_connections=REDIS_CONNECTIONS,
    )
    app = Flask("heartcluster")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + UPLOAD_OVERHEAD_BYTES
    app.json.sort_keys = False
    app.extensions["heartcluster"] = Services(
        settings=settings,
        redis=redis_client,
        jobs=JobStore(redis_client),
        uploads=UploadStore(redis_client),
        tenants=TenantStore(redis_client),
        store=store or store_from_settings(settings),
        celery=celery_app or make_celery(settings),
    )
    register_error_handlers(app)
    register_metrics(app)
    app.before_request(limit_body)
    for blueprint in (
        health_bp,
        openapi_bp,
        jobs_bp,
        uploads_bp,
        batches_bp,
        datasets_bp,
        webhooks_bp,
        usage_bp,
        web_bp,
        docs_bp,
    ):
        app.register_blueprint(blueprint)
    return app
