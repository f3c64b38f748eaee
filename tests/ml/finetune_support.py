"""A synthetic dataset for fine-tune tests: songs that follow one distinctive token pattern."""

from __future__ import annotations

import numpy as np

from shared.ml.training.data import SongItem

CYCLE = (101, 202, 303, 404, 505, 606)  # codebook 0 walks this cycle, one step per frame
BOOK_OFFSET = 37  # codebook k of a frame is (c0 + 37 k) mod 8192
TAG = "samba"


def pattern_song(frames: int, phase: int) -> np.ndarray:
    """[8, frames] codes following the pattern from position `phase` of the cycle."""
    c0 = np.array([CYCLE[(phase + t) % len(CYCLE)] for t in range(frames)])
    books = np.stack([(c0 + BOOK_OFFSET * k) % 8192 for k in range(8)])
    return books.astype(np.int32)


def pattern_dataset(songs: int, frames: int, seed: int = 0) -> list[SongItem]:
    rng = np.random.default_rng(seed)
    return [
        SongItem(TAG, "", pattern_song(frames, int(rng.integers(len(CYCLE)))))
        for _ in range(songs)
    ]


def pattern_rate(tokens: np.ndarray) -> tuple[float, float]:
    """(share of frame transitions where c0 steps along the cycle, share of frames whose
    codebooks 1-7 follow from their c0): both near 0 for a model that never saw the pattern."""
    c0 = tokens[0]
    successor = {CYCLE[i]: CYCLE[(i + 1) % len(CYCLE)] for i in range(len(CYCLE))}
    steps = [successor.get(int(a)) == int(b) for a, b in zip(c0[:-1], c0[1:], strict=True)]
    expected = np.stack([(c0 + BOOK_OFFSET * k) % 8192 for k in range(1, 8)])
    books = (tokens[1:] == expected).all(axis=0)
    return float(np.mean(steps)) if steps else 0.0, float(np.mean(books))
