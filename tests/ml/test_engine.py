"""The batched engine: determinism, batch independence, EOS, abort, context limits."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.core.constants import AUDIO_EOS_ID, CODEC_CODES
from shared.ml.generation.engine import (
    ContextOverflowError,
    GenerationEngine,
    GenerationRequest,
    RequestError,
)
from shared.ml.generation.model_runner import KV_BLOCK, StepShape
from shared.ml.generation.plan import Prefill

BASE = GenerationRequest(tags="piano,happy", lyrics="la la la", duration_s=1.2, seed=11)

MIXED = [
    BASE,
    replace(BASE, cfg_scale=1.0, seed=12, duration_s=0.8),
    replace(BASE, tags="rock", temperature=0.7, top_k=5, seed=13, duration_s=1.6),
    replace(BASE, lyrics="", cfg_scale=3.0, top_k=200, seed=14, duration_s=0.4),
]


def _alone(engine: GenerationEngine, request: GenerationRequest) -> np.ndarray:
    return engine.generate([request])[0].tokens


@contextmanager
def _forced_logit(
    engine: GenerationEngine, token: int, rows: list[int], after_calls: int
) -> Iterator[None]:
    """Make `token` overwhelmingly likely for codebook 0 of the given batch rows."""
    calls = {"n": 0}

    def hook(_module: torch.nn.Module, _inputs: tuple, logits: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > after_calls:
            logits = logits.clone()
            logits[rows, token] = 1e4
        return logits

    handle = engine.model.codebook0_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_result_shape_and_length(engine: GenerationEngine) -> None:
    result = engine.generate([BASE])[0]
    assert result.tokens.shape == (8, 15) and result.tokens.dtype == np.int32
    assert result.finish_reason == "length"
    assert result.prompt_length == engine.prompts.build(BASE.tags, BASE.lyrics).length
    assert result.tokens.min() >= 0 and result.tokens.max() < CODEC_CODES


def test_same_seed_same_tokens_and_other_seed_other_tokens(engine: GenerationEngine) -> None:
    first, again = _alone(engine, BASE), _alone(engine, BASE)
    other = _alone(engine, replace(BASE, seed=99))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_batched_requests_match_each_request_alone(engine: GenerationEngine) -> None:
    """Guided and unguided rows, several lengths and sampling settings in one batch."""
    alone = [_alone(engine, r) for r in MIXED]
    together = engine.generate(MIXED)
    for expected, got in zip(alone, together, strict=True):
        assert np.array_equal(got.tokens, expected)
    assert [g.tokens.shape[1] for g in together] == [15, 10, 20, 5]


def test_a_request_joining_mid_flight_matches_alone(engine: GenerationEngine) -> None:
    late = replace(BASE, seed=21, cfg_scale=2.0)
    expected = _alone(engine, late)
    first = engine.submit(replace(BASE, duration_s=2.0))
    for _ in range(4):
        engine.step()
    second = engine.submit(late)
    while not (first.done() and second.done()):
        engine.step()
    assert np.array_equal(second.result().tokens, expected)
    assert first.result().tokens.shape == (8, 25)


def test_rows_are_reused_when_more_requests_than_rows(tiny_model_dir: Path) -> None:
    small = GenerationEngine.from_model_dir(tiny_model_dir, "tiny", device="cpu", max_rows=2)
    requests = [replace(BASE, seed=s, cfg_scale=1.0 + (s % 2)) for s in range(5)]
    alone = [_alone(small, r) for r in requests]
    together = small.generate(requests)
    assert all(np.array_equal(a, t.tokens) for a, t in zip(alone, together, strict=True))
    assert small.active_requests == 0


def test_eos_ends_only_its_own_row(engine: GenerationEngine) -> None:
    stopper, other = replace(BASE, cfg_scale=1.0), replace(BASE, seed=5, cfg_scale=1.0)
    expected_other = _alone(engine, other)
    with _forced_logit(engine, AUDIO_EOS_ID, rows=[0], after_calls=3):
        stopped, continued = engine.generate([stopper, other])
    assert stopped.finish_reason == "eos" and stopped.tokens.shape == (8, 3)
    assert np.array_equal(stopped.tokens, _alone(engine, stopper)[:, :3])
    assert continued.finish_reason == "length"
    assert np.array_equal(continued.tokens, expected_other)


def test_requests_that_must_fill_every_frame_never_sample_eos(engine: GenerationEngine) -> None:
    request = replace(BASE, cfg_scale=1.0, stop_at_eos=False)
    with _forced_logit(engine, AUDIO_EOS_ID, rows=[0], after_calls=3):
        result = engine.generate([request])[0]
    assert result.finish_reason == "length" and result.tokens.shape == (8, 15)
    assert np.array_equal(result.tokens[:, :3], _alone(engine, request)[:, :3])


def test_invalid_codec_ids_are_never_sampled(engine: GenerationEngine) -> None:
    with _forced_logit(engine, CODEC_CODES, rows=[0, 1], after_calls=0):
        result = engine.generate([BASE])[0]
    assert result.finish_reason == "length"
    assert result.tokens.max() < CODEC_CODES


def test_abort_takes_effect_within_one_frame(engine: GenerationEngine) -> None:
    seen: list[int] = []
    stop = threading.Event()

    def progress(stage: str, fraction: float, done: int | None, total: int | None) -> None:
        assert stage == "generating" and total == 50 and fraction == done / total
        seen.append(done)
        if done == 3:
            stop.set()

    handle = engine.submit(replace(BASE, duration_s=4.0), progress, stop.is_set)
    while not handle.done():
        engine.step()
    result = handle.result()
    assert result.finish_reason == "aborted"
    assert result.tokens.shape == (8, 3) and seen == [1, 2, 3]
    assert engine.active_requests == 0


def test_cancelled_request_that_is_still_queued_never_runs(engine: GenerationEngine) -> None:
    handle = engine.submit(BASE, should_abort=lambda: True)
    handle.cancel()
    engine.step()
    assert handle.result().finish_reason == "aborted"
    assert handle.result().tokens.shape == (8, 0)


def test_context_overflow_is_refused_before_any_work(engine: GenerationEngine) -> None:
    with pytest.raises(ContextOverflowError, match="8192-position context") as info:
        engine.submit(replace(BASE, duration_s=660.0))
    assert info.value.field == "duration_s"
    history = np.zeros((8, 8000), dtype=np.int64)
    with pytest.raises(ContextOverflowError, match=r"history \(8000 frames\)"):
        engine.submit(replace(BASE, duration_s=20.0, history=history))
    assert engine.pending_requests == 0 and engine.active_requests == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"duration_s": 0.05}, "duration_s"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
        ({"cfg_scale": 0.5}, "cfg_scale"),
        ({"cfg_scale": 0.0}, "cfg_scale"),
        ({"seed": -1}, "seed"),
        ({"history": np.zeros((7, 4), dtype=np.int64)}, "history"),
        ({"history": np.full((8, 4), CODEC_CODES)}, "history"),
    ],
)
def test_invalid_requests_name_the_field(
    engine: GenerationEngine, change: dict, field: str
) -> None:
    with pytest.raises(RequestError) as info:
        engine.submit(replace(BASE, **change))
    assert info.value.field == field


def test_history_continuation_returns_only_new_frames(engine: GenerationEngine) -> None:
    history = _alone(engine, BASE)
    result = engine.generate([replace(BASE, seed=3, history=history)])[0]
    assert result.tokens.shape == (8, 15)
    other_history = np.roll(history, 1, axis=1)
    moved = engine.generate([replace(BASE, seed=3, history=other_history)])[0]
    assert not np.array_equal(result.tokens, moved.tokens)


def test_background_loop_serves_concurrent_submitters(engine: GenerationEngine) -> None:
    expected = [_alone(engine, r) for r in MIXED]
    results: dict[int, np.ndarray] = {}
    engine.start()
    try:

        def submit(i: int) -> None:
            results[i] = engine.submit(MIXED[i]).result(timeout=60).tokens

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(MIXED))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.stop()
    assert all(np.array_equal(results[i], expected[i]) for i in range(len(MIXED)))


@torch.no_grad()
def test_history_prefill_equals_feeding_history_frames_one_by_one(engine: GenerationEngine) -> None:
    """One prefill call over prompt + history predicts the same next frame distribution."""
    model = engine.model
    prompt = engine.prompts.build("piano", "hello")
    history = torch.from_numpy(_alone(engine, BASE)).long()
    h_tokens, h_mask = engine.prompts.history_rows(history)
    cond = torch.tensor([False])
    length, frames = prompt.length, history.shape[1]

    tokens, mask = torch.cat([prompt.tokens, h_tokens]), torch.cat([prompt.mask, h_mask])
    x = model.embed_sequence(tokens[None], mask[None], prompt.muq_index, cond)
    out = model.backbone(x, torch.arange(length + frames)[None], slice(0, 1), length + frames)
    at_once = model.codebook0_head(out[:, -1]).softmax(-1)

    x = model.embed_sequence(prompt.tokens[None], prompt.mask[None], prompt.muq_index, cond)
    model.backbone(x, torch.arange(length)[None], slice(1, 2), length)
    for t in range(frames):
        x = model.embed_frames(history[:, t].view(1, 1, 8))
        pos = torch.tensor([[length + t]])
        out = model.backbone(x, pos, slice(1, 2), length + t + 1)
    one_by_one = model.codebook0_head(out[:, -1]).softmax(-1)
    torch.testing.assert_close(at_once, one_by_one, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_generates_valid_codes(tiny_model_dir: Path, dtype: str) -> None:
    half = GenerationEngine.from_model_dir(tiny_model_dir, "tiny", "cpu", dtype, max_rows=2)
    result = half.generate([BASE])[0]
    assert half.model.dtype != torch.float32
    assert result.tokens.shape == (8, 15) and result.tokens.max() < CODEC_CODES


def test_a_guided_request_uses_free_rows_wherever_they_are(tiny_model_dir: Path) -> None:
    """Rows 0 and 3 free, 1 and 2 busy: a guided request still starts at once."""
    small = GenerationEngine.from_model_dir(tiny_model_dir, "tiny", device="cpu", max_rows=4)
    unguided = replace(BASE, cfg_scale=1.0)
    lengths = [0.24, 2.0, 2.0, 0.24]
    first = [small.submit(replace(unguided, seed=s, duration_s=d)) for s, d in enumerate(lengths)]
    for _ in range(3):
        small.step()
    assert first[0].done() and first[3].done() and small.active_requests == 2
    guided = replace(BASE, seed=42)
    handle = small.submit(guided)
    small.step()
    assert small.pending_requests == 0 and small.active_requests == 3
    while not handle.done():
        small.step()
    assert np.array_equal(handle.result().tokens, _alone(small, guided))


def test_a_failing_prefill_fails_only_its_own_request(
    engine: GenerationEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both are admitted at once: their batched prefill fails, then each is tried alone."""
    prefill = engine.runner.prefill

    def failing(works: Sequence[Prefill]) -> None:
        if any(work.draw.seed == 666 for work in works):
            raise torch.OutOfMemoryError("no room for this one")
        prefill(works)

    monkeypatch.setattr(engine.runner, "prefill", failing)
    doomed, fine = engine.submit(replace(BASE, seed=666)), engine.submit(replace(BASE, seed=12))
    while not (doomed.done() and fine.done()):
        engine.step()
    with pytest.raises(torch.OutOfMemoryError):
        doomed.result()
    assert fine.result().finish_reason == "length"
    assert engine.active_requests == 0


def test_stopping_the_engine_fails_what_is_left(tiny_model_dir: Path) -> None:
    small = GenerationEngine.from_model_dir(tiny_model_dir, "tiny", device="cpu", max_rows=2)
    handle = small.submit(BASE)
    small.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        handle.result(timeout=5)


def test_an_audio_eos_id_inside_the_codec_range_is_refused(tiny_model_dir: Path) -> None:
    from shared.ml.models.heartmula import load_heartmula
    from shared.ml.models.prompt import PromptBuilder

    builder = PromptBuilder.from_model_dir(tiny_model_dir)
    builder = PromptBuilder(builder.tokenizer, replace(builder.gen_config, audio_eos_id=100))
    model = load_heartmula(
        tiny_model_dir / "HeartMuLa-oss-tiny", torch.device("cpu"), torch.float32
    )
    with pytest.raises(ValueError, match="audio_eos_id 100"):
        GenerationEngine(model, builder, max_rows=2)


def test_requests_admitted_together_prefill_in_one_call(
    engine: GenerationEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts of different lengths share one padded prefill and still match their runs alone."""
    alone = [_alone(engine, r) for r in MIXED]
    prefill, calls = engine.runner.prefill, []

    def counted(works: Sequence[Prefill]) -> None:
        calls.append(sorted(w.draw.seed for w in works))
        prefill(works)

    monkeypatch.setattr(engine.runner, "prefill", counted)
    together = engine.generate(MIXED)
    assert calls == [[11, 12, 13, 14]]
    assert len({engine.prompts.build(r.tags, r.lyrics).length for r in MIXED}) > 1
    assert all(np.array_equal(a, t.tokens) for a, t in zip(alone, together, strict=True))


def test_step_shapes_are_powers_of_two_of_rows_keys_and_top_k(engine: GenerationEngine) -> None:
    """Three running rows run as four; attention reads 256 keys; top-k 50 samples from 64;
    three unguided requests draw in four sampling rows."""
    handles = [engine.submit(replace(BASE, cfg_scale=1.0, seed=s)) for s in range(3)]
    engine.step()
    assert engine.runner.shape(engine.prompts.build(BASE.tags, BASE.lyrics).length + 1) == (
        StepShape(rows=4, kv_len=KV_BLOCK, top_k=64, draws=4)
    )
    while not all(h.done() for h in handles):
        engine.step()


def test_cuda_graphs_need_a_cuda_device(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="cuda_graphs: needs a CUDA device"):
        GenerationEngine.from_model_dir(tiny_model_dir, "tiny", "cpu", max_rows=2, cuda_graphs=True)


@pytest.mark.skipif(
    not os.environ.get("HEARTCLUSTER_TEST_COMPILE"),
    reason="torch.compile on CPU takes minutes per step shape; set HEARTCLUSTER_TEST_COMPILE=1",
)
def test_compiled_engine_makes_the_same_tokens(
    engine: GenerationEngine, tiny_model_dir: Path
) -> None:
    compiled = GenerationEngine.from_model_dir(
        tiny_model_dir, "tiny", device="cpu", max_rows=8, compile=True
    )
    expected = [r.tokens for r in engine.generate(MIXED)]
    got = [r.tokens for r in compiled.generate(MIXED)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))


def test_a_step_run_then_undone_repeats_exactly(tiny_model_dir: Path) -> None:
    """What a CUDA graph capture relies on (run on CPU): the warm-up step's effects on the row
    state can be put back, and the recorded step then makes the same frame and the same song."""
    small = GenerationEngine.from_model_dir(tiny_model_dir, "tiny", device="cpu", max_rows=2)
    expected = _alone(small, BASE)
    handle = small.submit(BASE)
    for _ in range(3):
        small.step()
    runner, length = small.runner, small.prompts.build(BASE.tags, BASE.lyrics).length
    shape = runner.shape(length + 4)
    saved = runner.state.snapshot()
    with torch.inference_mode():
        warm_up = runner.frame_step(shape).clone()
    runner.state.restore(saved)
    original_step, first = runner.run_step, []

    def recorded(step_shape: StepShape) -> torch.Tensor:
        codes = original_step(step_shape)
        if not first:
            first.append(codes.clone())
        return codes

    runner.run_step = recorded  # type: ignore[method-assign]
    while not handle.done():
        small.step()
    assert torch.equal(first[0], warm_up)
    assert np.array_equal(handle.result().tokens, expected)
