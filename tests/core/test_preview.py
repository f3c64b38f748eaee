"""preview.png: waveform over spectrogram, columns linear in time."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shared.core.preview import (
    BACKGROUND,
    SPECTRUM_HEIGHT,
    WAVE_COLOUR,
    WAVE_HEIGHT,
    WIDTH,
    column_starts,
    render_preview,
)

RATE = 48_000


def _tone(hz: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _image(audio: np.ndarray) -> np.ndarray:
    png = render_preview(audio, RATE)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    assert image.mode == "RGB" and image.size == (WIDTH, WAVE_HEIGHT + SPECTRUM_HEIGHT)
    return np.asarray(image)


def test_silent_then_loud_song_draws_only_the_loud_half() -> None:
    # silence for the first second, a loud tone for the second: stereo, identical channels
    mono = np.concatenate([np.zeros(RATE, np.float32), _tone(1000.0, 1.0, amplitude=0.9)])
    image = _image(np.stack([mono, mono]))
    wave = image[:WAVE_HEIGHT]
    drawn = (wave == WAVE_COLOUR).all(axis=-1).sum(axis=0)  # waveform pixels per column
    # a silent column is a one-pixel centre line; a 0.9 tone spans most of the height
    assert drawn[: WIDTH // 2 - 2].max() <= 2
    assert drawn[WIDTH // 2 + 2 :].min() >= 0.8 * WAVE_HEIGHT
    spectrum = image[WAVE_HEIGHT:].astype(np.int64).sum(axis=-1)
    # the FFT window (2048 samples) spans about 17 columns of this 2 s song
    assert spectrum[:, : WIDTH // 2 - 10].max() <= BACKGROUND.astype(np.int64).sum() + 3
    assert spectrum[:, WIDTH // 2 + 10 :].max(axis=0).min() > 500


def test_higher_pitch_is_drawn_higher_in_the_spectrogram() -> None:
    def peak_row(hz: float) -> int:
        spectrum = _image(_tone(hz, 1.0)[None, :])[WAVE_HEIGHT:].astype(np.int64).sum(axis=-1)
        return int(np.argmax(spectrum[:, WIDTH // 2]))

    low, middle, high = peak_row(110.0), peak_row(1000.0), peak_row(8000.0)
    assert high < middle < low  # row 0 is the top of the image


def test_a_song_shorter_than_the_image_is_wide_still_fills_it() -> None:
    image = _image(_tone(440.0, 0.01)[None, :])  # 480 samples for 800 columns
    assert (image[:WAVE_HEIGHT] == WAVE_COLOUR).all(axis=-1).any(axis=0).all()
    starts = column_starts(480)
    assert starts[0] == 0 and starts[-1] == 479 and (np.diff(starts) >= 0).all()


def test_no_samples_is_refused() -> None:
    with pytest.raises(ValueError, match="no samples"):
        render_preview(np.zeros((2, 0), np.float32), RATE)
