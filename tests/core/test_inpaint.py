"""Inpainting arithmetic: gap frames, decode window, token and audio splicing."""

from __future__ import annotations

import numpy as np
import pytest

from shared.core.constants import SAMPLES_PER_FRAME
from shared.core.inpaint import (
    CROSSFADE_SAMPLES,
    Gap,
    GapError,
    decode_window,
    plan_gap,
    splice_audio,
    splice_tokens,
)


def test_gap_covers_every_frame_the_range_touches() -> None:
    assert plan_gap(1.0, 2.0, song_frames=100) == Gap(12, 25)
    assert plan_gap(0.0, 0.48, song_frames=100) == Gap(0, 6)
    assert plan_gap(7.5, 8.0, song_frames=100) == Gap(93, 100)


@pytest.mark.parametrize(
    ("start", "end", "field", "message"),
    [
        (-1.0, 2.0, "start_s", ">= 0"),
        (3.0, 3.0, "end_s", "greater than start_s"),
        (1.0, 8.5, "end_s", "within the song"),
        (1.0, 1.2, "end_s", "at least"),
        (float("nan"), 2.0, "start_s", "number"),
    ],
)
def test_bad_ranges_name_the_field(start: float, end: float, field: str, message: str) -> None:
    with pytest.raises(GapError, match=message) as info:
        plan_gap(start, end, song_frames=100)
    assert info.value.field == field


def test_too_long_gap_is_refused() -> None:
    with pytest.raises(GapError, match="at most 2.0 s"):
        plan_gap(0.0, 3.0, song_frames=100, max_gap_s=2.0)


def test_window_has_context_on_both_sides_within_the_song() -> None:
    assert decode_window(Gap(150, 200), song_frames=1000) == (50, 300)
    assert decode_window(Gap(10, 20), song_frames=60) == (0, 60)


def test_splice_tokens_changes_only_the_gap() -> None:
    parent = np.arange(8 * 30).reshape(8, 30)
    new = np.full((8, 5), -1)
    out = splice_tokens(parent, Gap(10, 15), new)
    assert (out[:, 10:15] == -1).all()
    assert np.array_equal(
        np.delete(out, range(10, 15), axis=1), np.delete(parent, range(10, 15), axis=1)
    )
    with pytest.raises(ValueError, match=r"\[8, 5\]"):
        splice_tokens(parent, Gap(10, 15), new[:, :4])


def test_splice_audio_keeps_outside_identical_and_fades_linearly() -> None:
    frames, gap = 40, Gap(10, 20)
    rng = np.random.default_rng(0)
    parent = rng.standard_normal((2, frames * SAMPLES_PER_FRAME)).astype(np.float32)
    lo_frame, hi_frame = 5, 25
    window = rng.standard_normal((2, (hi_frame - lo_frame) * SAMPLES_PER_FRAME)).astype(np.float32)
    out = splice_audio(parent, window, lo_frame, gap)

    half = CROSSFADE_SAMPLES // 2
    start, stop = gap.start * SAMPLES_PER_FRAME, gap.stop * SAMPLES_PER_FRAME
    offset = lo_frame * SAMPLES_PER_FRAME
    assert np.array_equal(out[:, : start - half], parent[:, : start - half])
    assert np.array_equal(out[:, stop + half :], parent[:, stop + half :])
    inner = slice(start + half, stop - half)
    assert np.array_equal(out[:, inner], window[:, inner.start - offset : inner.stop - offset])
    i = start - half + CROSSFADE_SAMPLES // 4  # a quarter into the left fade
    w = (CROSSFADE_SAMPLES // 4) / (CROSSFADE_SAMPLES - 1)
    expected = parent[:, i] * (1 - w) + window[:, i - offset] * w
    np.testing.assert_allclose(out[:, i], expected, rtol=1e-5, atol=1e-6)


def test_gap_at_the_song_edges_needs_no_fade_there() -> None:
    frames = 12
    parent = np.zeros((2, frames * SAMPLES_PER_FRAME), dtype=np.float32)
    window = np.ones_like(parent)
    out = splice_audio(parent, window, 0, Gap(0, frames))
    assert np.array_equal(out, window)


def test_window_must_cover_the_gap() -> None:
    parent = np.zeros((2, 30 * SAMPLES_PER_FRAME), dtype=np.float32)
    window = np.zeros((2, 5 * SAMPLES_PER_FRAME), dtype=np.float32)
    with pytest.raises(ValueError, match="does not cover"):
        splice_audio(parent, window, 10, Gap(10, 20))
