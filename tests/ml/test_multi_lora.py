"""Multi-LoRA generation on the tiny model, CPU, fp32: rows with different adapters (or none)
in one batch give what each gives alone, the math is PEFT's, unservable adapters are refused,
and the adapter slots are an LRU cache that never evicts an adapter in use."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from shared.ml.generation.adapter_slots import AdapterSlots
from shared.ml.generation.engine import (
    AdapterCapacity,
    AdapterRef,
    GenerationEngine,
    GenerationRequest,
    RequestError,
)
from shared.ml.models.heartmula import HeartMuLa, load_heartmula
from shared.ml.models.multi_lora import MultiLoRA
from shared.ml.models.prompt import PromptBuilder
from shared.ml.training.lora import adapter_files, add_lora, lora_config, remove_lora

ALL = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")
BASE = GenerationRequest(tags="piano,happy", lyrics="la la la", duration_s=0.8, seed=11)


def _base(tiny_model_dir: Path) -> HeartMuLa:
    return load_heartmula(tiny_model_dir / "HeartMuLa-oss-tiny", torch.device("cpu"), torch.float32)


def random_adapter(
    base: HeartMuLa, rank: int, alpha: int, targets: tuple[str, ...], seed: int
) -> dict[str, bytes]:
    """PEFT adapter files with random nonzero A and B (B starts at zero after init)."""
    peft_model = add_lora(copy.deepcopy(base), lora_config(rank, alpha, 0.0, targets), seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    files = adapter_files(peft_model)
    remove_lora(peft_model)
    return files


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> HeartMuLa:
    return _base(tiny_model_dir)


@pytest.fixture(scope="module")
def adapters(base: HeartMuLa) -> dict[str, dict[str, bytes]]:
    return {
        "x": random_adapter(base, 4, 8, ALL, seed=1),
        "y": random_adapter(base, 2, 4, ("q_proj", "decoder.w2"), seed=2),
        "z": random_adapter(base, 8, 8, ("backbone.v_proj", "w1", "w3"), seed=3),
        "big": random_adapter(base, 16, 16, ALL, seed=4),
    }


def _ref(adapters: dict[str, dict[str, bytes]], name: str, reads: list[str] | None = None):
    def files() -> dict[str, bytes]:
        if reads is not None:
            reads.append(name)
        return adapters[name]

    return AdapterRef(name, files)


def _engine(tiny_model_dir: Path, slots: int = 3, **capacity: object) -> GenerationEngine:
    spec = AdapterCapacity(slots=slots, max_rank=8, **capacity)  # type: ignore[arg-type]
    return GenerationEngine(
        _base(tiny_model_dir),
        PromptBuilder.from_model_dir(tiny_model_dir),
        max_rows=8,
        adapters=spec,
    )


def _run(engine: GenerationEngine, handles: list, max_steps: int = 200) -> None:
    """Step until every handle is done (bounded: a request stuck waiting fails the test)."""
    for _ in range(max_steps):
        if all(h.done() for h in handles):
            return
        engine.step()
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


# ----- numerics -------------------------------------------------------------------------------


def _frame_logits(
    model: HeartMuLa, prompts: PromptBuilder, rows: int, lora: MultiLoRA | None = None
) -> list[torch.Tensor]:
    """Logits of codebook 0 and of codebooks 1..7 for one prompt in `rows` identical rows,
    feeding fixed codes so that every model sees the same inputs."""
    prompt = prompts.build(BASE.tags, BASE.lyrics)
    model.setup_caches(rows, 64)
    with torch.no_grad():
        x = model.embed_sequence(
            prompt.tokens.expand(rows, -1, -1),
            prompt.mask.expand(rows, -1, -1),
            prompt.muq_index,
            torch.zeros(rows, dtype=torch.bool),
        )
        positions = torch.arange(prompt.length).expand(rows, -1)
        hidden = model.backbone(x, positions, torch.arange(rows), kv_len=prompt.length)[:, -1]
        logits: list[torch.Tensor] = []

        def pick(scores: torch.Tensor, k: int) -> torch.Tensor:
            logits.append(scores.clone())
            return torch.full((rows,), 7 + k)

        model.sample_frame(hidden, pick)
    return logits


def test_each_row_s_logits_are_those_of_the_peft_model_with_its_adapter(
    base: HeartMuLa, adapters: dict[str, dict[str, bytes]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    prompts = PromptBuilder.from_model_dir(tiny_model_dir)
    served = copy.deepcopy(base)
    lora = MultiLoRA(served, AdapterCapacity(slots=3, max_rank=8))
    lora.install(1, lora.read(adapters["y"]))
    lora.install(3, lora.read(adapters["x"]))
    lora.select(torch.tensor([3, 0, 1]))  # rows: adapter x, none, adapter y
    got = _frame_logits(served, prompts, rows=3, lora=lora)

    expected = {}
    for name in ("x", "y"):
        folder = tmp_path / name
        folder.mkdir()
        for file, data in adapters[name].items():
            (folder / file).write_bytes(data)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
        expected[name] = _frame_logits(peft_model.base_model.model, prompts, rows=1)
    plain = _frame_logits(copy.deepcopy(base), prompts, rows=1)

    for k in range(8):
        for row, want in enumerate([expected["x"][k], plain[k], expected["y"][k]]):
            torch.testing.assert_close(got[k][row : row + 1], want, rtol=0, atol=1e-5)
        # the adapters change the logits for real: the comparison could fail
        assert (expected["x"][k] - plain[k]).abs().max() > 1e-2
    assert (expected["y"][0] - plain[0]).abs().max() > 1e-2


# ----- one batch, many adapters --------------------------------------------------------------


def test_rows_with_three_adapters_and_none_give_what_each_gives_alone(
    tiny_model_dir: Path, adapters: dict[str, dict[str, bytes]]
) -> None:
    """Three adapters and two plain requests, joining at different frames, guided and not."""
    engine = _engine(tiny_model_dir)
    requests = [
        replace(BASE, adapter=_ref(adapters, "x")),
        replace(BASE, seed=12, cfg_scale=1.0),
        replace(BASE, seed=13, adapter=_ref(adapters, "y"), duration_s=1.2),
        replace(BASE, seed=14, tags="rock", adapter=_ref(adapters, "z"), cfg_scale=1.0),
        replace(BASE, seed=15, top_k=5),
    ]
    alone = [engine.generate([r])[0].tokens for r in requests]
    plain = engine.generate([replace(r, adapter=None) for r in requests[:1]])[0].tokens
    assert not np.array_equal(alone[0], plain)  # the adapter changes the song

    handles = []
    for steps_before, request in zip([0, 1, 2, 0, 3], requests, strict=True):
        for _ in range(steps_before):
            engine.step()
        handles.append(engine.submit(request))  # joins at frames 0, 1, 3, 3 and 6
    _run(engine, handles)
    for expected, handle in zip(alone, handles, strict=True):
        assert np.array_equal(handle.result().tokens, expected)


def test_plain_requests_give_today_s_tokens_on_an_engine_serving_adapters(
    tiny_model_dir: Path, engine: GenerationEngine, adapters: dict[str, dict[str, bytes]]
) -> None:
    """A request without an adapter gives the same tokens as on an engine without adapters,
    alone and beside adapter rows."""
    served = _engine(tiny_model_dir)
    plain = replace(BASE, seed=21)
    expected = engine.generate([plain])[0].tokens
    assert np.array_equal(served.generate([plain])[0].tokens, expected)
    mixed = served.generate([replace(BASE, adapter=_ref(adapters, "x")), plain])
    assert np.array_equal(mixed[1].tokens, expected)


# ----- what cannot be served ----------------------------------------------------------------


def test_adapters_this_engine_cannot_serve_are_refused_naming_adapter_id(
    tiny_model_dir: Path, adapters: dict[str, dict[str, bytes]]
) -> None:
    engine = _engine(tiny_model_dir, targets=("q_proj", "k_proj", "v_proj", "output_proj"))
    with pytest.raises(RequestError, match="rank 16 is over the 8") as too_big:
        engine.submit(replace(BASE, adapter=_ref(adapters, "big")))
    assert too_big.value.field == "adapter_id"
    with pytest.raises(RequestError, match="mlp.w1, which this worker does not serve") as mlp:
        engine.submit(replace(BASE, adapter=_ref(adapters, "z")))
    assert mlp.value.field == "adapter_id"
    plain = GenerationEngine(
        _base(tiny_model_dir), PromptBuilder.from_model_dir(tiny_model_dir), max_rows=2
    )
    with pytest.raises(RequestError, match="serves no adapters"):
        plain.submit(replace(BASE, adapter=_ref(adapters, "x")))
    weights = adapters["x"]["adapter_model.safetensors"]
    broken = {**adapters["x"], "adapter_model.safetensors": weights[:50]}
    with pytest.raises(RequestError) as truncated:
        engine.submit(replace(BASE, adapter=AdapterRef("broken", lambda: broken)))
    assert truncated.value.field == "adapter_id"


# ----- the cache ----------------------------------------------------------------------------


def test_slots_evict_the_least_recently_used_unreferenced_adapter() -> None:
    slots = AdapterSlots(2)
    a, install = slots.claim("a") or (0, False)
    assert (a, install) == (1, True)
    assert slots.claim("b") == (2, True)
    assert slots.claim("c") is None  # both referenced: c waits
    slots.unpin(2)
    slots.unpin(1)  # a was used longer ago than b... but both are free now
    assert slots.claim("a") == (1, False)  # resident: no install, now the latest use
    slots.unpin(1)
    assert slots.claim("c") == (2, True)  # b is the least recently used: evicted
    assert slots.resident() == {"a": 1, "c": 2}
    assert slots.pin_resident("b") is None
    assert slots.pin_resident("a") == 1
    with pytest.raises(RuntimeError):
        AdapterSlots(1).unpin(1)


def test_a_request_waits_for_a_slot_and_runs_once_one_frees(
    tiny_model_dir: Path, adapters: dict[str, dict[str, bytes]]
) -> None:
    engine = _engine(tiny_model_dir, slots=1)
    reads: list[str] = []
    first = replace(BASE, adapter=_ref(adapters, "x", reads))
    second = replace(BASE, seed=12, adapter=_ref(adapters, "y", reads))
    plain = replace(BASE, seed=13)
    alone = [engine.generate([r])[0].tokens for r in (first, second, plain)]
    assert reads == ["x", "y"]  # each read on first use, in the submitting thread

    reads.clear()
    handles = [engine.submit(r) for r in (first, second, plain)]
    assert reads == ["x"]  # y was resident at submit (pinned), x was read again
    engine.step()
    # one slot: y (pinned at submit) holds it, so x waits while the plain request runs
    assert engine.scheduler.num_running == 2 and engine.pending_requests == 1
    _run(engine, handles)
    for expected, handle in zip(alone, handles, strict=True):
        assert np.array_equal(handle.result().tokens, expected)
    assert engine.scheduler.adapter_slots is not None
    assert engine.scheduler.adapter_slots.resident() == {"x": 1}


def test_an_aborted_waiting_request_lets_go_of_its_slot(
    tiny_model_dir: Path, adapters: dict[str, dict[str, bytes]]
) -> None:
    engine = _engine(tiny_model_dir, slots=1)
    engine.generate([replace(BASE, adapter=_ref(adapters, "x"))])
    waiting = engine.submit(replace(BASE, adapter=_ref(adapters, "x")))  # pins x's slot
    waiting.cancel()
    engine.step()
    assert waiting.result().finish_reason == "aborted"
    other = engine.submit(replace(BASE, adapter=_ref(adapters, "y")))  # x must be evictable
    _run(engine, [other])
    assert other.result().finish_reason == "length"


def test_the_engine_reads_an_adapter_only_when_it_is_not_resident(
    tiny_model_dir: Path, adapters: dict[str, dict[str, bytes]]
) -> None:
    """Two slots, adapters used in turn x y x z x y: z evicts y (least recently used), the
    second y evicts z; x stays resident throughout."""
    engine = _engine(tiny_model_dir, slots=2)
    reads: list[str] = []
    for name in ["x", "y", "x", "z", "x", "y"]:
        engine.generate([replace(BASE, duration_s=0.16, adapter=_ref(adapters, name, reads))])
    assert reads == ["x", "y", "z", "y"]
    assert engine.scheduler.adapter_slots is not None
    assert set(engine.scheduler.adapter_slots.resident()) == {"x", "y"}
