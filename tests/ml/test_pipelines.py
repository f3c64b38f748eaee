"""The song pipeline's progress and abort, end to end over the tiny engine and codec: one
progress type from the engine's frames to the decoder's steps, one abort exception from
wherever the abort was seen."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.core.progress import Aborted
from shared.ml.codec.batching import CodecBatcher
from shared.ml.codec.decoder import load_codec
from shared.ml.generation.engine import GenerationEngine, GenerationRequest
from shared.ml.pipelines import GENERATE_SHARE, generate_song

REQUEST = GenerationRequest(tags="piano", duration_s=0.4, cfg_scale=1.0, seed=3)  # 5 frames

Report = tuple[str, float, int | None, int | None]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[GenerationEngine]:
    """Its frame loop in a thread, as in a worker: pipelines wait on submitted requests."""
    engine = GenerationEngine.from_model_dir(tiny_model_dir, "tiny", device="cpu", max_rows=2)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def codec(tiny_model_dir: Path) -> Iterator[CodecBatcher]:
    """The decoder behind its batching loop, as in a worker."""
    batcher = CodecBatcher(load_codec(tiny_model_dir, device="cpu"))
    batcher.start()
    yield batcher
    batcher.stop()


def _song(
    engine: GenerationEngine, codec: CodecBatcher, should_abort=lambda: False
) -> list[Report]:
    reports: list[Report] = []

    def progress(
        stage: str,
        fraction: float,
        done: int | None = None,
        total: int | None = None,
        message: str = "",
    ) -> None:
        reports.append((stage, fraction, done, total))

    generate_song(engine, codec, REQUEST, progress, should_abort)
    return reports


def test_progress_runs_from_generating_to_decoding(
    engine: GenerationEngine, codec: CodecBatcher
) -> None:
    reports = _song(engine, codec)
    generating = [r for r in reports if r[0] == "generating"]
    decoding = [r for r in reports if r[0] == "decoding"]
    assert reports == generating + decoding  # generating first, then decoding only
    assert generating == [
        ("generating", pytest.approx(GENERATE_SHARE * d / 5), d, 5) for d in range(6)
    ]
    fractions = [r[1] for r in decoding]
    assert fractions[0] == pytest.approx(GENERATE_SHARE) and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    assert {(r[2], r[3]) for r in decoding} == {(5, 5)}  # the song's frames, all generated


def test_an_abort_while_generating_raises_aborted(
    engine: GenerationEngine, codec: CodecBatcher
) -> None:
    frames: list[int] = []

    def abort_after_two() -> bool:
        return len(frames) >= 2

    def progress(
        stage: str, fraction: float, done: int | None = None, *_: object, **__: object
    ) -> None:
        if stage == "generating" and done:
            frames.append(done)

    with pytest.raises(Aborted, match="after 2 frames"):
        generate_song(engine, codec, REQUEST, progress, abort_after_two)


def test_an_abort_while_decoding_raises_the_same_aborted(
    engine: GenerationEngine, codec: CodecBatcher
) -> None:
    decoding = threading.Event()

    def progress(stage: str, *_: object, **__: object) -> None:
        if stage == "decoding":
            decoding.set()

    with pytest.raises(Aborted, match="decode aborted"):
        generate_song(engine, codec, REQUEST, progress, decoding.is_set)


def test_an_abort_before_the_first_window_decodes_nothing(
    engine: GenerationEngine, codec: CodecBatcher
) -> None:
    generated = threading.Event()
    decoded: list[float] = []

    def progress(stage: str, fraction: float, *_: object, **__: object) -> None:
        if stage == "generating" and fraction >= GENERATE_SHARE:
            generated.set()
        if stage == "decoding" and fraction > GENERATE_SHARE:
            decoded.append(fraction)

    with pytest.raises(Aborted, match="decode aborted after 0 of"):
        generate_song(engine, codec, REQUEST, progress, generated.is_set)
    assert decoded == []
