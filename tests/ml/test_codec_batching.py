"""Codec batching: songs decoded together sound exactly as decoded alone, in shared batches."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.core.progress import Aborted
from shared.ml.codec.batching import CodecBatcher
from shared.ml.codec.decoder import HeartCodecDecoder, load_codec

STEPS = 2


@pytest.fixture(scope="module")
def decoder(tiny_model_dir: Path) -> HeartCodecDecoder:
    return load_codec(tiny_model_dir, device="cpu")


def _codes(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 8192, size=(8, frames))


SONGS = [(_codes(400, 1), 1), (_codes(700, 2), 2), (_codes(30, 3), 3)]  # 2, 3 and 1 windows


@pytest.fixture(scope="module")
def alone(decoder: HeartCodecDecoder) -> list[torch.Tensor]:
    """Each of SONGS decoded by itself."""
    return [decoder.detokenize(codes, steps=STEPS, seed=seed) for codes, seed in SONGS]


def test_songs_decoded_together_match_each_alone_and_share_batches(
    decoder: HeartCodecDecoder, alone: list[torch.Tensor]
) -> None:
    sizes: list[int] = []
    batcher = CodecBatcher(decoder, max_batch=8, on_batch=sizes.append)
    futures = [batcher.submit(codes, steps=STEPS, seed=seed) for codes, seed in SONGS]
    assert batcher.songs_decoding == 3
    while not all(f.done() for f in futures):
        batcher.step()
    assert batcher.songs_decoding == 0
    for future, audio in zip(futures, alone, strict=True):
        torch.testing.assert_close(future.result(), audio, atol=1e-5, rtol=1e-4)
    assert sizes == [3, 2, 1]  # first windows of all three, then the later windows


def test_max_batch_caps_a_round(decoder: HeartCodecDecoder) -> None:
    batcher = CodecBatcher(decoder, max_batch=2)
    futures = [batcher.submit(_codes(30, s), steps=STEPS, seed=s) for s in range(3)]
    batcher.step()
    assert [f.done() for f in futures] == [True, True, False]
    batcher.step()
    assert futures[2].done()


def test_an_aborted_song_ends_at_a_window_boundary_and_the_others_go_on(
    decoder: HeartCodecDecoder, alone: list[torch.Tensor]
) -> None:
    batcher = CodecBatcher(decoder)
    stop = threading.Event()
    doomed = batcher.submit(_codes(700, 5), steps=STEPS, seed=5, should_abort=stop.is_set)
    fine = batcher.submit(*SONGS[0][:1], steps=STEPS, seed=1)
    batcher.step()
    stop.set()
    while not fine.done():
        batcher.step()
    with pytest.raises(Aborted, match=f"after {STEPS + 1} of {3 * (STEPS + 1)} steps"):
        doomed.result(timeout=0)
    torch.testing.assert_close(fine.result(), alone[0], atol=1e-5, rtol=1e-4)


def test_an_abort_during_a_solve_ends_that_song_at_the_next_step(
    decoder: HeartCodecDecoder, alone: list[torch.Tensor]
) -> None:
    batcher = CodecBatcher(decoder)
    steps_done: list[float] = []
    doomed = batcher.submit(
        _codes(400, 7),
        steps=STEPS,
        seed=7,
        on_progress=lambda _s, f, *_: steps_done.append(f),
        should_abort=lambda: bool(steps_done),  # asked to stop once its first step is done
    )
    fine = batcher.submit(*SONGS[0][:1], steps=STEPS, seed=1)
    while not fine.done():
        batcher.step()
    with pytest.raises(Aborted, match=f"after 1 of {2 * (STEPS + 1)} steps"):
        doomed.result(timeout=0)
    torch.testing.assert_close(fine.result(), alone[0], atol=1e-5, rtol=1e-4)


def test_progress_reaches_one_per_song(decoder: HeartCodecDecoder) -> None:
    reports: list[float] = []
    batcher = CodecBatcher(decoder)
    future = batcher.submit(
        _codes(400, 1), steps=STEPS, seed=1, on_progress=lambda _s, f, *_: reports.append(f)
    )
    while not future.done():
        batcher.step()
    assert reports == [i / (2 * (STEPS + 1)) for i in range(1, 2 * (STEPS + 1) + 1)]


def test_the_loop_serves_concurrent_callers_and_stop_refuses_new_songs(
    decoder: HeartCodecDecoder, alone: list[torch.Tensor]
) -> None:
    batcher = CodecBatcher(decoder)
    with pytest.raises(RuntimeError, match="start"):
        batcher.detokenize(SONGS[2][0])
    batcher.start()
    results: dict[int, torch.Tensor] = {}

    def decode(i: int) -> None:
        codes, seed = SONGS[i]
        results[i] = batcher.detokenize(codes, steps=STEPS, seed=seed)

    threads = [threading.Thread(target=decode, args=(i,)) for i in (0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.stop()
    for i in (0, 2):
        torch.testing.assert_close(results[i], alone[i], atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="stopped"):
        batcher.submit(SONGS[2][0])
