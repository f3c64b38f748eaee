"""The command line as a person meets it: `jobs`, `upload`, `--version`, the URL and key found
in the data directory, one-line errors, lyrics that name a missing file, defaults in help."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from api.client.cli import main
from api.client.client import Client
from api.client.cluster_cli import up_hint
from api.client.local_config import KEY_FILE, forget_url, save_url
from api.gateway import create_app
from shared.core.config import Settings
from shared.core.storage import LocalStore
from shared.core.tenants import TenantStore
from tests.support.fakes import RecordingCelery
from tests.support.live import serving


@pytest.fixture
def data_dir(redis_url: str, redis_client, tmp_path: Path, monkeypatch):
    """A data directory as `up` leaves it (URL and key saved) for a live gateway; no
    HEARTCLUSTER_URL / _API_KEY / _DATA_DIR in the environment."""
    for name in ("HEARTCLUSTER_URL", "HEARTCLUSTER_API_KEY", "HEARTCLUSTER_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env(
        {"HEARTCLUSTER_REDIS_URL": redis_url, "HEARTCLUSTER_DATA_DIR": str(tmp_path)}
    )
    app = create_app(settings, redis_client, LocalStore(tmp_path / "store"), RecordingCelery())
    root = tmp_path / "cluster"
    root.mkdir()
    with serving(app) as url:
        save_url(root, url)
        (root / KEY_FILE).write_text(TenantStore(redis_client).create_key("acme") + "\n")
        yield root


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_commands_find_url_and_key_in_the_data_dir(data_dir: Path, capsys, monkeypatch) -> None:
    assert main(["submit", "generate", "--tags", "piano", "--data-dir", str(data_dir)]) == 0
    job_id = capsys.readouterr().out.strip()
    monkeypatch.setenv("HEARTCLUSTER_DATA_DIR", str(data_dir))  # the same, from the environment
    assert main(["jobs"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:3] == ["ID", "TYPE", "STATE"]
    assert listing[1].split()[:3] == [job_id, "generate", "queued"]
    assert main(["jobs", "--state", "succeeded"]) == 0
    assert job_id not in capsys.readouterr().out


def test_upload_prints_the_upload_id(data_dir: Path, tmp_path: Path, capsys) -> None:
    wav = tmp_path / "take.wav"
    soundfile.write(wav, np.zeros((8000, 2), dtype=np.float32), 8000)
    assert main(["upload", str(wav), "--data-dir", str(data_dir)]) == 0
    upload_id = capsys.readouterr().out.strip()
    client = Client(
        (data_dir / "url").read_text().strip(), (data_dir / KEY_FILE).read_text().strip()
    )
    assert upload_id in [upload["id"] for upload in client.uploads()["uploads"]]


def test_user_errors_are_one_line(data_dir: Path, tmp_path: Path, capsys) -> None:
    where = ["--data-dir", str(data_dir)]
    assert main(["upload", str(tmp_path / "missing.wav"), *where]) == 1
    assert "missing.wav" in _one_line_error(capsys)
    assert main(["jobs", "--url", "localhost:8000", *where]) == 1
    assert "bad gateway URL 'localhost:8000'" in _one_line_error(capsys)
    assert main(["jobs", "--url", "http://127.0.0.1:1", *where]) == 1
    assert "no gateway answers at http://127.0.0.1:1" in _one_line_error(capsys)
    assert main(["jobs", "--data-dir", str(tmp_path / "nowhere")]) == 1
    assert "no API key" in _one_line_error(capsys)
    for lyrics in ("songs/verse.txt", "verse.lrc"):
        assert main(["submit", "generate", "--tags", "piano", "--lyrics", lyrics, *where]) == 1
        assert f"--lyrics {lyrics}: no such file" in _one_line_error(capsys)


def test_a_stopped_cluster_forgets_its_url_only(tmp_path: Path) -> None:
    save_url(tmp_path, "http://127.0.0.1:8001")
    forget_url(tmp_path, "http://127.0.0.1:8002")  # another `up` owns the file now
    assert (tmp_path / "url").read_text().strip() == "http://127.0.0.1:8001"
    forget_url(tmp_path, "http://127.0.0.1:8001")
    assert not (tmp_path / "url").exists()


def test_up_hint_names_a_data_dir_other_than_the_default(monkeypatch) -> None:
    monkeypatch.delenv("HEARTCLUSTER_DATA_DIR", raising=False)
    assert "--data-dir" not in up_hint("heartcluster-data")
    assert up_hint("/srv/my cluster").endswith("--data-dir '/srv/my cluster'")
    monkeypatch.setenv("HEARTCLUSTER_DATA_DIR", "/srv/hc")
    assert "--data-dir" not in up_hint("/srv/hc")


def test_version_and_defaults_in_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("heartcluster ")
    jobs_help = _help(["jobs", "--help"], capsys)
    assert "(default: 20)" in jobs_help
    assert "(default: 8000)" in _help(["up", "--help"], capsys)


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return " ".join(capsys.readouterr().out.split())
