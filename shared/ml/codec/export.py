"""Tokens → audio file (the local `decode` and `generate --out song.flac` commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.core.audio import encode_audio, format_for_path
from shared.ml.codec.decoder import HeartCodecDecoder


def decode_to_file(
    decoder: HeartCodecDecoder,
    codes: np.ndarray | torch.Tensor,
    out: Path | str,
    **detokenize_options: Any,
) -> Path:
    """Decode codes [8, T] into `out`; the suffix (.flac, .wav, .mp3) picks the format.

    The format is checked before decoding, so a bad name fails at once, not after minutes.
    Options (steps, guidance, seed, loop_padding, on_progress, should_abort) go to
    `HeartCodecDecoder.detokenize`.
    """
    out = Path(out)
    fmt = format_for_path(out)
    audio = decoder.detokenize(codes, **detokenize_options)
    out.write_bytes(encode_audio(audio.numpy(), fmt, decoder.sample_rate))
    return out
