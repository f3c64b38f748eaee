"""Inpainting arithmetic: which frames a gap replaces, what to decode, how to splice.

LM-guided repair (CHECKPOINTS.md): the language model generates exactly the gap's frames from
the left context, the new tokens replace the gap, a window with 8 s of context on each side is
decoded, and only the gap's audio (with a short crossfade at each edge) replaces the parent's.
Audio outside [gap start − fade/2, gap end + fade/2) stays sample-identical to the parent.
No torch: the gateway validates ranges with this module too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.core.constants import FRAME_S, SAMPLES_PER_FRAME, frames_for_seconds
from shared.core.tokens import InputError

CONTEXT_FRAMES_EACH_SIDE = frames_for_seconds(8.0)  # 100: decoded on each side of the gap
CROSSFADE_SAMPLES = 4800  # 0.1 s
MIN_GAP_S = 0.48
MAX_GAP_S = 60.0

# The reference's repair sampling: conservative, so the gap keeps the song's style.
INPAINT_TEMPERATURE = 0.2
INPAINT_TOP_K = 30
INPAINT_CFG_SCALE = 1.0


class GapError(InputError):
    """An inpainting range that cannot be used; `field` names the parameter."""


@dataclass(frozen=True)
class Gap:
    start: int  # first replaced frame
    stop: int  # first frame kept after the gap

    @property
    def frames(self) -> int:
        return self.stop - self.start


def plan_gap(
    start_s: float,
    end_s: float,
    song_frames: int,
    min_gap_s: float = MIN_GAP_S,
    max_gap_s: float = MAX_GAP_S,
) -> Gap:
    """Seconds → whole frames (start rounded down, end rounded up), checked against the song."""
    song_s = song_frames * FRAME_S
    if not math.isfinite(start_s) or start_s < 0:
        raise GapError("start_s", "must be a number >= 0")
    if not math.isfinite(end_s) or end_s <= start_s:
        raise GapError("end_s", "must be greater than start_s")
    if end_s > song_s + 1e-9:
        raise GapError("end_s", f"must be within the song ({song_s:.2f} s)")
    if end_s - start_s < min_gap_s:
        raise GapError("end_s", f"the gap must last at least {min_gap_s} s")
    if end_s - start_s > max_gap_s:
        raise GapError("end_s", f"the gap must last at most {max_gap_s} s")
    start = math.floor(start_s / FRAME_S + 1e-9)
    stop = min(math.ceil(end_s / FRAME_S - 1e-9), song_frames)
    return Gap(start, stop)


def decode_window(
    gap: Gap, song_frames: int, context: int = CONTEXT_FRAMES_EACH_SIDE
) -> tuple[int, int]:
    """Frames [lo, hi) to decode: the gap with `context` frames on each side, within the song."""
    return max(gap.start - context, 0), min(gap.stop + context, song_frames)


def splice_tokens(parent: np.ndarray, gap: Gap, new: np.ndarray) -> np.ndarray:
    """Parent tokens [8, T] with the gap's frames replaced by `new` [8, gap.frames]."""
    if new.shape != (parent.shape[0], gap.frames):
        raise ValueError(f"new tokens must have shape [8, {gap.frames}], got {list(new.shape)}")
    out = parent.copy()
    out[:, gap.start : gap.stop] = new
    return out


def splice_audio(
    parent: np.ndarray,
    window_audio: np.ndarray,
    window_start: int,
    gap: Gap,
    fade: int = CROSSFADE_SAMPLES,
) -> np.ndarray:
    """Parent audio [C, S] with the gap's audio taken from a decoded window.

    `window_audio` covers frames [window_start, ...) of the new song. Each gap edge inside
    the song gets a linear crossfade of `fade` samples centred on it.
    """
    total = parent.shape[-1]
    start, stop = gap.start * SAMPLES_PER_FRAME, gap.stop * SAMPLES_PER_FRAME
    lo = start - fade // 2 if gap.start > 0 else start
    hi = stop + fade // 2 if stop < total else stop
    offset = window_start * SAMPLES_PER_FRAME
    if lo < offset or hi > offset + window_audio.shape[-1]:
        raise ValueError("the decoded window does not cover the gap and its crossfades")
    new = window_audio[..., lo - offset : hi - offset].astype(np.float32)
    old = parent[..., lo:hi].astype(np.float32)
    weight = np.ones(hi - lo, dtype=np.float32)
    if gap.start > 0:
        weight[:fade] = np.linspace(0.0, 1.0, fade, dtype=np.float32)
    if stop < total:
        weight[-fade:] = np.minimum(weight[-fade:], np.linspace(1.0, 0.0, fade, dtype=np.float32))
    out = parent.astype(np.float32, copy=True)
    out[..., lo:hi] = old * (1 - weight) + new * weight
    return out
