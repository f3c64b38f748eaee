"""`heartcluster models download`: official repositories land in the layout the loaders read.

A local stand-in plays the hub (copying the session's tiny models under the official names);
no test reaches a real hub.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from api.client.cli import main
from api.client.models_download import OFFICIAL, DownloadError, download_models, hub_fetch

TINY_FOLDER_OF = {
    "HeartMuLa/HeartMuLa-oss-3B-happy-new-year": "HeartMuLa-oss-tiny",
    "HeartMuLa/HeartCodec-oss-20260123": "HeartCodec-oss",
    "HeartMuLa/HeartCodec-oss-encoder": "HeartCodec-oss-encoder",
    "HeartMuLa/HeartTranscriptor-oss": "HeartTranscriptor-oss",
}


class StandInHub:
    """Copies a repository's files into local_dir, skipping files already there (as the hub
    client does); `fail_on` makes one repository fail once, as a dropped connection would."""

    def __init__(self, tiny_dir: Path, fail_on: str | None = None) -> None:
        self.tiny_dir = tiny_dir
        self.fail_on = fail_on
        self.copied: list[str] = []

    def __call__(self, repo_id: str, local_dir: Path, patterns: list[str] | None) -> None:
        source = self.tiny_dir / TINY_FOLDER_OF.get(repo_id, ".")
        local_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir()):
            if not path.is_file() or (patterns and path.name not in patterns):
                continue
            if (local_dir / path.name).exists():
                continue
            if repo_id == self.fail_on:
                self.fail_on = None
                raise ConnectionError("connection reset by peer")
            shutil.copy(path, local_dir / path.name)
            self.copied.append(f"{repo_id}/{path.name}")


def test_download_lays_out_what_the_loaders_read(tiny_model_dir: Path, tmp_path: Path) -> None:
    from shared.ml.generation.engine import GenerationEngine

    lines: list[str] = []
    download_models(tmp_path, fetch=StandInHub(tiny_model_dir), report=lines.append)
    for spec in OFFICIAL:
        assert (tmp_path / spec.folder).is_dir()
    assert sum(line.startswith("  ok:") for line in lines) == len(OFFICIAL)
    engine = GenerationEngine.from_model_dir(tmp_path, "3B", device="cpu", max_rows=2)
    assert engine.model is not None


def test_an_interrupted_download_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    hub = StandInHub(tiny_model_dir, fail_on="HeartMuLa/HeartCodec-oss-20260123")
    with pytest.raises(DownloadError, match="HeartCodec-oss-20260123 failed.*run the command"):
        download_models(tmp_path, fetch=hub, report=lambda line: None)
    first = list(hub.copied)
    download_models(tmp_path, fetch=hub, report=lambda line: None)
    assert not set(first) & set(hub.copied[len(first) :])  # finished files are not fetched again


def test_a_missing_shard_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    def lossy(repo_id: str, local_dir: Path, patterns: list[str] | None) -> None:
        StandInHub(tiny_model_dir)(repo_id, local_dir, patterns)
        for shard in local_dir.glob("model-00002-*.safetensors"):
            shard.unlink()

    with pytest.raises(DownloadError, match=r"HeartMuLa-oss-3B lacks model-00002-of-00002"):
        download_models(tmp_path, fetch=lossy, report=lambda line: None)


def test_the_cli_reports_a_failed_download_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the real client: tests/conftest.py sets HF_HUB_OFFLINE, so it refuses before any network
    assert main(["models", "download", str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: downloading HeartMuLa/HeartMuLaGen failed") and "\n" not in err


def test_hub_fetch_uses_the_hub_client_offline(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="(?i)offline|cannot find|local"):
        hub_fetch("HeartMuLa/HeartMuLaGen", tmp_path, ["tokenizer.json"])
