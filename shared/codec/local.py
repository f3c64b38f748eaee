"""Local one-shot codec runs in this process, no cluster (the `heartcluster encode` CLI)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile
from tqdm import tqdm

from shared.codec.encoder import load_encoder


def _read_audio(path: Path) -> tuple[np.ndarray, int]:
    """[channels, samples] float32 and the sample rate; a file soundfile cannot decode is an
    error naming it."""
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise ValueError(f"cannot read audio file {path}: {error}") from error
    return data.T, rate


def encode_file(
    model_dir: Path, audio_path: Path, device: str | None = None, dtype: str | None = None
) -> np.ndarray:
    """Tokenize an audio file with a progress bar per 29.76 s chunk: int32 [8, frames]."""
    audio, rate = _read_audio(audio_path)
    encoder = load_encoder(model_dir, device, dtype)
    with tqdm(unit="chunk", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return encoder.tokenize(audio, rate, on_progress=progress)
