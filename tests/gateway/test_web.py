"""The web page's routes: served without a key, only the repo's own files, nothing remote."""

from __future__ import annotations

import re

import pytest

from api.gateway import create_app
from api.gateway.routes.web import STATIC_DIR
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


def test_the_page_is_served_without_a_key_and_loads_only_its_own_files(client) -> None:
    reply = client.get("/")
    assert reply.status_code == 200 and reply.mimetype == "text/html"
    assert "default-src 'self'" in reply.headers["Content-Security-Policy"]
    page = reply.get_data(as_text=True)
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert "/web/app.js" in referenced and "/web/style.css" in referenced
    for path in referenced:
        asset = client.get(path)
        assert asset.status_code == 200, path
    script = client.get("/web/app.js")
    assert script.mimetype in ("text/javascript", "application/javascript")


def test_no_static_file_points_at_another_host() -> None:
    """No CDN: the machines that run this have no internet."""
    for path in STATIC_DIR.iterdir():
        text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://", text), path.name
        assert "//cdn" not in text, path.name


def test_a_missing_asset_is_the_api_404_and_paths_cannot_leave_the_folder(client) -> None:
    reply = client.get("/web/nothing.js")
    assert reply.status_code == 404 and reply.json["error"]["code"] == "not_found"
    assert client.get("/web/../routes/web.py").status_code == 404
    assert client.get("/web/%2e%2e/app.py").status_code == 404


def test_the_api_still_needs_a_key(client) -> None:
    reply = client.get("/v1/jobs")
    assert reply.status_code == 401 and reply.json["error"]["message"]
