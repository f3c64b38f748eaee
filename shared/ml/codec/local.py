"""Local one-shot codec runs in this process, no cluster (the `heartcluster encode` CLI)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared.core.audio import read_audio
from shared.core.progress import percent_bar
from shared.ml.codec.encoder import load_encoder


def encode_file(
    model_dir: Path, audio_path: Path, device: str | None = None, dtype: str | None = None
) -> np.ndarray:
    """Tokenize an audio file with a progress bar: int32 [8, frames]."""
    audio, rate = read_audio(audio_path, name=str(audio_path))
    encoder = load_encoder(model_dir, device, dtype)
    with tqdm(total=100, unit="%", desc="encode", file=sys.stderr) as bar:
        return encoder.tokenize(audio, rate, on_progress=percent_bar(bar))
