"""/docs (Swagger UI from the gateway's own files) and /metrics (requests, queue depth)."""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.gateway import create_app
from shared.core.config import Settings
from shared.core.storage import LocalStore
from tests.support.fakes import RecordingCelery


@pytest.fixture
def client(redis_url: str, redis_client, tmp_path):
    settings = Settings.from_env(
        {"HEARTCLUSTER_REDIS_URL": redis_url, "HEARTCLUSTER_DATA_DIR": str(tmp_path)}
    )
    app = create_app(
        settings,
        redis_client=redis_client,
        store=LocalStore(tmp_path / "artifacts"),
        celery_app=RecordingCelery(),
    )
    return app.test_client()


def test_docs_page_loads_swagger_ui_from_the_gateway_only(client) -> None:
    reply = client.get("/docs")
    assert reply.status_code == 200 and reply.mimetype == "text/html"
    assert "default-src 'self'" in reply.headers["Content-Security-Policy"]
    referenced = re.findall(r'(?:src|href)="([^"]+)"', reply.get_data(as_text=True))
    assert "/docs/assets/swagger-ui-bundle.js" in referenced
    assert "/docs/assets/docs.js" in referenced
    for path in referenced:
        assert path.startswith("/"), f"{path} is not the gateway's own"
        assert client.get(path).status_code == 200, path
    start = client.get("/docs/assets/docs.js").get_data(as_text=True)
    assert '"/openapi.json"' in start
    assert client.get("/docs/assets/../app.py").status_code == 404


def _samples(client) -> dict[tuple[str, frozenset], float]:
    reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.mimetype == "text/plain"
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(reply.get_data(as_text=True))
        for s in family.samples
    }


def test_metrics_count_requests_by_route_and_read_queue_depth(client, redis_client) -> None:
    key = ("heartcluster_http_requests_total", "/v1/jobs/<job_id>", "GET", "401")
    before = _samples(client)

    def count(samples: dict, name: str, route: str, method: str, status: str) -> float:
        labels = frozenset({"route": route, "method": method, "status": status}.items())
        return samples.get((name, labels), 0.0)

    for _ in range(3):
        assert client.get("/v1/jobs/nope").status_code == 401
    redis_client.rpush("gpu", "a", "b")
    after = _samples(client)
    assert count(after, *key) - count(before, *key) == 3
    assert after[("heartcluster_queue_depth", frozenset({"queue": "gpu"}.items()))] == 2
    assert after[("heartcluster_queue_depth", frozenset({"queue": "train"}.items()))] == 0
    unmatched = ("heartcluster_http_requests_total", "unmatched", "GET", "404")
    client.get("/no/such/route")
    assert count(_samples(client), *unmatched) >= 1
