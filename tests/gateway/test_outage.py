"""The gateway while Redis is away: 503 with Retry-After as JSON, never a 500 or a hang, and
one log line when Redis goes and one when it is back."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from api.gateway import create_app
from shared.core.config import Settings
from shared.core.storage import LocalStore
from shared.core.tenants import TenantStore
from tests.support.fakes import RecordingCelery


class Blinking(redis.Redis):
    """A client whose Redis can be switched off."""

    away = False

    def execute_command(self, *args, **options):
        if self.away:
            raise redis.ConnectionError("Error 111 connecting to redis. Connection refused.")
        return super().execute_command(*args, **options)


def test_requests_while_redis_is_away_get_503_with_retry_after(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.from_env(
        {"HEARTCLUSTER_REDIS_URL": redis_url, "HEARTCLUSTER_DATA_DIR": str(tmp_path)}
    )
    client = Blinking.from_url(redis_url, retry=Retry(NoBackoff(), 0))
    key = TenantStore(redis_client).create_key("acme")
    app = create_app(settings, client, LocalStore(settings.local_root), RecordingCelery())
    http = app.test_client()
    auth = {"Authorization": f"Bearer {key}"}
    with caplog.at_level(logging.WARNING):
        client.away = True
        replies = [
            http.get("/v1/jobs", headers=auth),
            http.post("/v1/jobs", headers=auth, json={"type": "generate", "params": {"tags": "x"}}),
            http.get("/v1/jobs/some-id", headers=auth),
        ]
        ready = http.get("/readyz")
        client.away = False
        back = http.get("/v1/jobs", headers=auth)
    for reply in replies:
        assert reply.status_code == 503, reply.get_json()
        assert reply.headers["Retry-After"] == "5"
        assert reply.get_json()["error"]["code"] == "unavailable"
    assert ready.status_code == 503 and not ready.get_json()["checks"]["redis"]["ok"]
    assert back.status_code == 200
    lines = [r.getMessage() for r in caplog.records if "Redis" in r.getMessage()]
    assert (
        len(lines) == 2 and lines[0].startswith("Redis away") and lines[1].startswith("Redis back")
    )
