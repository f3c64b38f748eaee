"""The local one-shot CLI: tiny models in, tokens out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from api.client.cli import main


def test_models_tiny_writes_the_official_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["models", "tiny", str(tmp_path)]) == 0
    assert "noise, not music" in capsys.readouterr().out
    for name in (
        "tokenizer.json",
        "gen_config.json",
        "HeartMuLa-oss-tiny/config.json",
        "HeartMuLa-oss-tiny/model.safetensors.index.json",
    ):
        assert (tmp_path / name).is_file()


def test_generate_writes_tokens_and_continues_history(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lyrics = tmp_path / "lyrics.txt"
    lyrics.write_text("[verse] hello world")
    out = tmp_path / "tokens.npy"
    args = [
        "generate",
        "--model-dir",
        str(tiny_model_dir),
        "--tags",
        "piano",
        "--lyrics",
        str(lyrics),
        "--duration",
        "0.8",
        "--seed",
        "4",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    tokens = np.load(out)
    assert tokens.shape == (8, 10)
    assert "reading lyrics from" in capsys.readouterr().err

    longer = tmp_path / "longer.npy"
    assert main([*args[:-1], str(longer), "--history", str(out)]) == 0
    extended = np.load(longer)
    assert extended.shape == (8, 20) and np.array_equal(extended[:, :10], tokens)


def test_generate_reports_requests_that_cannot_fit(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "generate",
            "--model-dir",
            str(tiny_model_dir),
            "--tags",
            "piano",
            "--duration",
            "700",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "t.npy"),
        ]
    )
    assert code == 2
    assert "duration_s" in capsys.readouterr().err
    assert not (tmp_path / "t.npy").exists()


@pytest.mark.parametrize("cfg", ["0.5", "0"])
def test_generate_refuses_a_guidance_scale_below_one(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, cfg: str
) -> None:
    out = tmp_path / "t.npy"
    code = main(
        [
            "generate",
            "--model-dir",
            str(tiny_model_dir),
            "--tags",
            "piano",
            "--cfg-scale",
            cfg,
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and err[0].startswith("error: --cfg-scale (cfg_scale): must be at least 1")
