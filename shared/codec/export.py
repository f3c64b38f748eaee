"""Tokens → audio file, the one path the CLI and the workers share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.audio import encode_audio, format_for_path
from shared.codec.decoder import AbortCheck, HeartCodecDecoder, ProgressCallback


def decode_to_bytes(
    decoder: HeartCodecDecoder,
    codes: np.ndarray | torch.Tensor,
    fmt: str = "flac",
    *,
    steps: int = 10,
    guidance: float = 1.25,
    seed: int = 0,
    loop_padding: bool = True,
    on_progress: ProgressCallback | None = None,
    should_abort: AbortCheck | None = None,
) -> bytes:
    """Decode codes [8, T] and encode the 48 kHz stereo audio as a FLAC/WAV/MP3 file's bytes."""
    audio = decoder.detokenize(
        codes,
        steps=steps,
        guidance=guidance,
        seed=seed,
        loop_padding=loop_padding,
        on_progress=on_progress,
        should_abort=should_abort,
    )
    return encode_audio(audio.numpy(), fmt, decoder.sample_rate)


def decode_to_file(
    decoder: HeartCodecDecoder,
    codes: np.ndarray | torch.Tensor,
    out: Path | str,
    *,
    steps: int = 10,
    guidance: float = 1.25,
    seed: int = 0,
    loop_padding: bool = True,
    on_progress: ProgressCallback | None = None,
    should_abort: AbortCheck | None = None,
) -> Path:
    """Decode codes [8, T] into `out`; the suffix (.flac, .wav, .mp3) picks the format.

    The format is checked before decoding, so a bad name fails at once, not after minutes.
    """
    out = Path(out)
    data = decode_to_bytes(
        decoder,
        codes,
        format_for_path(out),
        steps=steps,
        guidance=guidance,
        seed=seed,
        loop_padding=loop_padding,
        on_progress=on_progress,
        should_abort=should_abort,
    )
    out.write_bytes(data)
    return out
