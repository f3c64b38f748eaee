"""A song's preview.png: its waveform over its spectrogram, small enough to show in a page.

Column x of the image covers the samples [x·n/W, (x+1)·n/W) of the song, in both halves, so a
client turns a position on the image into seconds as x / W · duration (the web page picks the
inpaint range this way). No margins, axes or text. numpy and Pillow only: workers render it,
and the gateway never imports this module (Pillow is not in its install).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

WIDTH = 800
WAVE_HEIGHT = 64
SPECTRUM_HEIGHT = 96
FFT_SIZE = 2048
MIN_HZ = 40.0
DYNAMIC_RANGE_DB = 80.0

BACKGROUND = np.array([17, 20, 28], dtype=np.uint8)
WAVE_COLOUR = np.array([94, 200, 255], dtype=np.uint8)
# quiet → loud: the spectrogram's colour ramp (dark blue, purple, orange, pale yellow)
RAMP_STOPS = np.array([0.0, 0.35, 0.7, 1.0])
RAMP_COLOURS = np.array([[17, 20, 28], [92, 38, 134], [236, 112, 44], [252, 240, 170]])


def render_preview(audio: np.ndarray, sample_rate: int) -> bytes:
    """PNG bytes of `audio` ([channels, samples] float, any channel count, at least one sample)."""
    mono = np.asarray(audio, dtype=np.float32).mean(axis=0)
    if mono.size == 0:
        raise ValueError("audio: no samples to draw")
    image = np.concatenate([_waveform(mono), _spectrogram(mono, sample_rate)], axis=0)
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def column_starts(samples: int, width: int = WIDTH) -> np.ndarray:
    """The first sample of each image column (columns may share a sample when the song is
    shorter than the image is wide)."""
    return (np.arange(width, dtype=np.int64) * samples) // width


def _waveform(mono: np.ndarray) -> np.ndarray:
    """Each column's min..max drawn as a vertical bar around the centre line; full scale is ±1."""
    starts = column_starts(mono.size)
    low = np.clip(np.minimum.reduceat(mono, starts), -1.0, 1.0)
    high = np.clip(np.maximum.reduceat(mono, starts), -1.0, 1.0)
    half = (WAVE_HEIGHT - 1) / 2
    top = np.floor(half - high * half).astype(np.int64)
    bottom = np.ceil(half - low * half).astype(np.int64)
    rows = np.arange(WAVE_HEIGHT)[:, None]
    inside = (rows >= top[None, :]) & (rows <= bottom[None, :])
    image = np.broadcast_to(BACKGROUND, (WAVE_HEIGHT, WIDTH, 3)).copy()
    image[inside] = WAVE_COLOUR
    return image


def _spectrogram(mono: np.ndarray, sample_rate: int) -> np.ndarray:
    """One Hann-windowed FFT centred in each column, in dB below the loudest bin, rows spaced
    logarithmically from MIN_HZ (bottom) to Nyquist (top)."""
    centres = column_starts(mono.size) + mono.size // (2 * WIDTH)
    padded = np.pad(mono, FFT_SIZE // 2)
    frames = padded[centres[:, None] + np.arange(FFT_SIZE)[None, :]] * np.hanning(FFT_SIZE)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [WIDTH, bins]
    bin_hz = sample_rate / FFT_SIZE
    edges = np.geomspace(MIN_HZ, sample_rate / 2, SPECTRUM_HEIGHT + 1)
    first = np.clip((edges[:-1] / bin_hz).astype(np.int64), 0, power.shape[1] - 1)
    last = np.clip(np.ceil(edges[1:] / bin_hz).astype(np.int64), first + 1, power.shape[1])
    # each row: the strongest bin of its frequency band (a band may be a single bin)
    bands = np.stack([power[:, a:b].max(axis=1) for a, b in zip(first, last, strict=True)])
    decibels = 10 * np.log10(bands + 1e-12)
    level = np.clip((decibels - decibels.max()) / DYNAMIC_RANGE_DB + 1.0, 0.0, 1.0)
    if bands.max() <= 1e-12:  # silence: all dark, not noise scaled up to full colour
        level = np.zeros_like(level)
    colours = np.stack(
        [np.interp(level, RAMP_STOPS, RAMP_COLOURS[:, c]) for c in range(3)], axis=-1
    )
    return colours[::-1].round().astype(np.uint8)  # low frequencies at the bottom
