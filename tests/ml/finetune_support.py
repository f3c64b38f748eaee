"""A synthetic dataset for fine-tune tests: songs that follow one distinctive token pattern."""

from __future__ import annotations

import numpy as np
import torch

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
        SongItem(TAG, "", pattern_song(frames, int(rng.integers(len(CYCLE))))) for _ in range(songs)
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


def sharpen_heads(model: torch.nn.Module, factor: float = 10.0) -> None:
    """Scale the output heads of a tiny random model to trained-model magnitudes.

    Random N(0, 0.02) heads over a 128-wide RMS-normed state cap every logit near ±2.5, so no
    adapter on the transformers can make any token likely (the loss floor is ~6.4 nats out of
    ln 8197 = 9.0). Trained heads have no such cap; this gives the tiny model the same room.
    """
    with torch.no_grad():
        model.codebook0_head.weight.mul_(factor)
        model.audio_head.mul_(factor)


class MemoryCheckpoints:
    """A CheckpointStore in memory, counting saves."""

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.saves = 0

    def load(self) -> bytes | None:
        return self.data

    def save(self, data: bytes) -> None:
        self.data = data
        self.saves += 1
