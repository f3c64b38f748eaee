"""Resampling keeps length and pitch."""

from __future__ import annotations

import numpy as np

from shared.core.constants import SAMPLE_RATE
from shared.ml.resample import resample


def _tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)])


def test_resample_changes_rate_and_keeps_pitch() -> None:
    audio = _tone(1.0, 44_100).astype(np.float32)
    out = resample(audio, 44_100, SAMPLE_RATE)
    assert out.shape == (2, SAMPLE_RATE)
    spectrum = np.abs(np.fft.rfft(out[0]))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 s of audio → 1 Hz bins
