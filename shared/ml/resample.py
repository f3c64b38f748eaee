"""Sample-rate conversion with torchaudio's band-limited sinc filter (the model side only)."""

from __future__ import annotations

import numpy as np
import torch
import torchaudio.functional as AF


def resample(audio: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample [channels, samples] float audio (filters built on CPU)."""
    if orig_rate == new_rate:
        return audio.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    return AF.resample(tensor, orig_rate, new_rate).numpy()
