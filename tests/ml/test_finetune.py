"""Fine-tuning on the tiny model, CPU: the proof that it learns, exact resume, the adapter in
PEFT's format, and the pieces (targets, schedule, data order, cutting long songs)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from shared.core.progress import Aborted
from shared.ml.generation.engine import AdapterCapacity, AdapterRef, GenerationEngine
from shared.ml.generation.request import GenerationRequest
from shared.ml.models.heartmula import HeartMuLa, load_heartmula
from shared.ml.models.multi_lora import MultiLoRA
from shared.ml.models.prompt import PromptBuilder
from shared.ml.training.data import DataOrder, SongItem, cut_examples, split_examples
from shared.ml.training.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, target_pattern
from shared.ml.training.trainer import TrainConfig, Trainer, lr_factor
from tests.ml.finetune_support import (
    TAG,
    MemoryCheckpoints,
    pattern_dataset,
    pattern_rate,
    sharpen_heads,
)

ALL = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")


def _config(**changes: object) -> TrainConfig:
    base = TrainConfig(
        rank=16,
        alpha=32,
        dropout=0.0,
        targets=ALL,
        learning_rate=5e-3,
        steps=60,
        batch_size=4,
        grad_accumulation=1,
        warmup_steps=5,
        uncond_prob=0.1,
        checkpoint_every=20,
        seed=0,
    )
    return TrainConfig(**{**base.__dict__, **changes})


@pytest.fixture
def base(tiny_model_dir: Path) -> HeartMuLa:
    model = load_heartmula(
        tiny_model_dir / "HeartMuLa-oss-tiny", torch.device("cpu"), torch.float32
    )
    sharpen_heads(model)
    return model


@pytest.fixture
def prompts(tiny_model_dir: Path) -> PromptBuilder:
    return PromptBuilder.from_model_dir(tiny_model_dir)


def _pattern_rates(
    model: HeartMuLa, prompts: PromptBuilder, files: dict[str, bytes] | None = None
) -> tuple[float, float]:
    """Pattern rates of songs under the new tag, with the adapter in `files` if given."""
    capacity = AdapterCapacity(slots=1, max_rank=16)
    engine = GenerationEngine(model, prompts, max_rows=8, adapters=capacity)
    adapter = None if files is None else AdapterRef("tuned", lambda: files)
    requests = [
        GenerationRequest(tags=TAG, duration_s=3.2, seed=seed, stop_at_eos=False, adapter=adapter)
        for seed in range(4)
    ]
    rates = [pattern_rate(result.tokens) for result in engine.generate(requests)]
    return float(np.mean([r[0] for r in rates])), float(np.mean([r[1] for r in rates]))


def test_a_short_fine_tune_learns_a_new_tags_token_pattern(
    base: HeartMuLa, prompts: PromptBuilder
) -> None:
    """Held-out loss at least halves (codebook 0 and codebooks 1-7 each fall), and songs
    generated with the adapter under the new tag follow the pattern far more often.

    Measure: share of generated frame transitions where codebook 0 steps along the pattern's
    cycle, and share of frames whose codebooks 1-7 follow from their codebook 0 (chance: about
    1/8197 and 0). Measured on this tiny model: base 0.00 / 0.00, adapter about 0.97 / 0.88;
    held-out loss 21.9 → 0.18 (codebook 0: 11.8 → 0.07; codebooks 1-7: 10.0 → 0.11).
    """
    examples = cut_examples(pattern_dataset(songs=24, frames=48), prompts, context=8192)
    train, held_out = split_examples(examples, validation_fraction=0.2, seed=0)
    trainer = Trainer(base, prompts, train, held_out, _config(), MemoryCheckpoints())
    result = trainer.run(lambda *args, **kwargs: None)
    trainer.close()

    evals = [line for line in result.metrics if "val_loss" in line]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 60
    assert last["val_loss"] <= first["val_loss"] / 2
    assert last["val_loss_codebook0"] < first["val_loss_codebook0"] / 2
    assert last["val_loss_codebooks_1_7"] < first["val_loss_codebooks_1_7"] / 2

    base_c0, base_books = _pattern_rates(copy.deepcopy(base), prompts)
    tuned_c0, tuned_books = _pattern_rates(copy.deepcopy(base), prompts, result.files)
    assert base_c0 < 0.05 and base_books < 0.05
    assert tuned_c0 > 0.6 and tuned_books > 0.5


def test_a_run_resumed_from_its_checkpoint_ends_with_the_same_adapter(
    base: HeartMuLa, prompts: PromptBuilder
) -> None:
    examples = cut_examples(pattern_dataset(songs=6, frames=20), prompts, context=8192)
    train, held_out = split_examples(examples, 0.2, 0)
    config = _config(steps=6, checkpoint_every=3, dropout=0.1, batch_size=2, grad_accumulation=2)

    whole = Trainer(base, prompts, train, held_out, config, MemoryCheckpoints())
    expected = whole.run(lambda *args, **kwargs: None).files[ADAPTER_WEIGHTS]
    whole.close()

    store = MemoryCheckpoints()

    def stop_after_first_checkpoint() -> bool:
        return store.saves >= 1  # what a killed worker leaves: the step-3 checkpoint

    first = Trainer(base, prompts, train, held_out, config, store)
    with pytest.raises(Aborted, match="stopped at step 3"):
        first.run(lambda *args, **kwargs: None, stop_after_first_checkpoint)
    first.close()
    torch.manual_seed(12345)  # whatever the process did since: the checkpoint restores it

    resumed = Trainer(base, prompts, train, held_out, config, store)
    result = resumed.run(lambda *args, **kwargs: None)
    resumed.close()
    assert result.resumed_from == 3
    _assert_same_adapter(result.files[ADAPTER_WEIGHTS], expected)
    assert [line["step"] for line in result.metrics] == [0, 1, 2, 3, 4, 5, 6]


def _assert_same_adapter(got: bytes, expected: bytes) -> None:
    from safetensors.torch import load

    a, b = load(got), load(expected)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def test_the_adapter_is_in_peft_format_and_loads_with_peft(
    base: HeartMuLa, prompts: PromptBuilder, tmp_path: Path
) -> None:
    examples = cut_examples(pattern_dataset(songs=2, frames=10), prompts, context=8192)
    trainer = Trainer(base, prompts, examples, [], _config(steps=2), MemoryCheckpoints())
    files = trainer.run(lambda *args, **kwargs: None).files
    trainer.close()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    config = json.loads(files[ADAPTER_CONFIG])
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 32

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    by_peft = loaded.base_model.model.backbone.layers[0].attn.q_proj
    served = MultiLoRA(copy.deepcopy(base), AdapterCapacity(slots=1, max_rank=16)).read(files)
    a, b = served.layers["backbone.layers.0.attn.q_proj"]  # [in, r], [r, out] (scaled)
    torch.testing.assert_close(a, by_peft.lora_A["default"].weight.T)
    torch.testing.assert_close(b, by_peft.lora_B["default"].weight.T * by_peft.scaling["default"])
    assert b.abs().sum() > 0  # trained: B has left zero
    # the base model is untouched by training (LoRA layers were taken out again)
    assert not any("lora" in name for name in base.state_dict())


def test_targets_select_projections_of_one_or_both_transformers() -> None:
    import re

    both = re.compile(target_pattern(["q_proj"]))
    assert both.match("backbone.layers.3.attn.q_proj")
    assert both.match("decoder.layers.0.attn.q_proj")
    assert not both.match("backbone.layers.3.attn.k_proj")
    decoder_mlp = re.compile(target_pattern(["decoder.w1"]))
    assert decoder_mlp.match("decoder.layers.1.mlp.w1")
    assert not decoder_mlp.match("backbone.layers.1.mlp.w1")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        target_pattern(["codebook0_head"])


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    assert lr_factor(0, 4, 20) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20) == pytest.approx(0.0)


def test_the_data_order_continues_from_its_position() -> None:
    whole = DataOrder(size=5, seed=3)
    taken = whole.take(13)
    assert sorted(taken[:5]) == list(range(5)) and sorted(taken[5:10]) == list(range(5))
    resumed = DataOrder(size=5, seed=3, position=7)
    assert resumed.take(6) == taken[7:13]


def test_long_songs_are_cut_into_pieces_that_fit_the_context(prompts: PromptBuilder) -> None:
    tokens = np.arange(8 * 100, dtype=np.int32).reshape(8, 100) % 8000
    examples = cut_examples([SongItem("pop", "", tokens)], prompts, context=50)
    rows = examples[0].prompt.length
    assert all(ex.prompt.length + ex.frames.shape[0] - 1 <= 50 for ex in examples)
    assert sum(ex.frames.shape[0] for ex in examples) == 100
    assert examples[0].frames.shape[0] == 50 - rows + 1
    assert torch.equal(torch.cat([ex.frames for ex in examples]).T, torch.from_numpy(tokens).long())


def test_gradient_checkpointing_changes_memory_not_the_math(
    base: HeartMuLa, prompts: PromptBuilder
) -> None:
    """The CUDA path recomputes layer activations in the backward pass; same loss and grads."""
    from shared.ml.training.lora import add_lora, lora_config, remove_lora
    from shared.ml.training.objective import compute_losses

    examples = cut_examples(pattern_dataset(songs=2, frames=12), prompts, context=8192)
    peft_model = add_lora(base, lora_config(4, 8, 0.0, ALL), seed=0)
    with torch.no_grad():  # B starts at zero: give the adapter something to differentiate
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    results = []
    for checkpointing in (False, True):
        peft_model.zero_grad()
        losses = compute_losses(
            base, prompts, examples, torch.tensor([False, True]), checkpointing=checkpointing
        )
        losses.total.backward()
        grads = [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]
        results.append((losses.total.detach(), grads))
    remove_lora(peft_model)
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, recomputed in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(plain, recomputed)
    assert any(g.abs().sum() > 0 for g in results[0][1])


def test_the_objective_is_the_generation_path_teacher_forced(
    base: HeartMuLa, prompts: PromptBuilder
) -> None:
    """The training forward (no cache) equals the generation path (KV cache) fed the true
    frames: codebook 0 from the backbone state before each frame, codebooks 1-7 from the local
    decoder over [that state, emb(c0..c6)]; the loss averages over frames only, never over the
    prompt's rows; text dropout swaps in the unconditional embedding as guidance does."""
    import torch.nn.functional as F

    from shared.ml.training.objective import Example, compute_losses

    frames = torch.from_numpy(pattern_dataset(songs=1, frames=10)[0].tokens.T.copy()).long()
    prompt = prompts.build(TAG, "la la la")
    for unconditional in (False, True):
        flag = torch.tensor([unconditional])
        with torch.no_grad():
            got = compute_losses(base, prompts, [Example(prompt, frames)], flag)
            history, history_mask = prompts.history_rows(frames[:-1].T)
            tokens = torch.cat([prompt.tokens, history])[None]
            mask = torch.cat([prompt.mask, history_mask])[None]
            seq = tokens.shape[1]
            base.setup_caches(1, seq)
            x = base.embed_sequence(tokens, mask, prompt.muq_index, flag)
            hidden = base.backbone(x, torch.arange(seq)[None], slice(0, 1), kv_len=seq)[0]
            before = hidden[prompt.length - 1 :]  # [T, D]: the state before each frame
            loss0 = F.cross_entropy(base.codebook0_head(before), frames[:, 0])
            rest = []
            for t in range(frames.shape[0]):
                codes = [base.embed_audio(k, frames[t, k : k + 1]) for k in range(7)]
                local = base.projection(torch.cat([before[t : t + 1], *codes])[None])
                out = base.decoder(local, torch.arange(8)[None], slice(0, 1), kv_len=8)[0]
                logits = torch.stack([out[k] @ base.audio_head[k - 1] for k in range(1, 8)])
                rest.append(F.cross_entropy(logits, frames[t, 1:], reduction="none"))
        torch.testing.assert_close(got.codebook0, loss0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.codebooks_rest, torch.cat(rest).mean(), rtol=1e-4, atol=1e-4)
