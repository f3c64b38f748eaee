"""Our Llama blocks against transformers' independent Llama implementation.

Weights are converted the standard way: our rotary embedding rotates interleaved pairs
(torchtune/Meta layout), transformers rotates halves, so q/k projection rows are permuted.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from shared.ml.models.llama import Transformer, TransformerSpec


def _interleaved_to_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    out_dim, in_dim = weight.shape
    head_dim = out_dim // heads
    return weight.view(heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _reference(spec: TransformerSpec, ours: Transformer) -> LlamaModel:
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=spec.embed_dim,
        intermediate_size=spec.intermediate_dim,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        rms_norm_eps=spec.norm_eps,
        max_position_embeddings=spec.max_seq_len,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": spec.rope_base,
            "factor": spec.rope_scale_factor,
            "low_freq_factor": spec.rope_low_freq_factor,
            "high_freq_factor": spec.rope_high_freq_factor,
            "original_max_position_embeddings": spec.rope_old_context_len,
        },
        attention_bias=False,
        mlp_bias=False,
    )
    ref = LlamaModel(config).eval()
    state = {"norm.weight": ours.norm.scale}
    for i, layer in enumerate(ours.layers):
        p = f"layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": _interleaved_to_halves(
                layer.attn.q_proj.weight, spec.num_heads
            ),
            p + "self_attn.k_proj.weight": _interleaved_to_halves(
                layer.attn.k_proj.weight, spec.num_kv_heads
            ),
            p + "self_attn.v_proj.weight": layer.attn.v_proj.weight,
            p + "self_attn.o_proj.weight": layer.attn.output_proj.weight,
            p + "mlp.gate_proj.weight": layer.mlp.w1.weight,
            p + "mlp.up_proj.weight": layer.mlp.w3.weight,
            p + "mlp.down_proj.weight": layer.mlp.w2.weight,
            p + "input_layernorm.weight": layer.sa_norm.scale,
            p + "post_attention_layernorm.weight": layer.mlp_norm.scale,
        }
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert missing == ["embed_tokens.weight"] and not unexpected
    return ref


def _random_transformer(spec: TransformerSpec, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(spec).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("scale"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
    return model


SPECS = {
    # One layer, MHA-style group of 2; long-context rotary scaling affects the low frequencies.
    "one_layer": TransformerSpec(1, 4, 2, 64, 96, 512),
    # The local decoder's shape in miniature: few heads with a large head dim.
    "decoder_like": TransformerSpec(2, 2, 1, 96, 128, 64),
    "backbone_like": TransformerSpec(3, 4, 2, 64, 128, 9000, rope_old_context_len=64),
}


@pytest.mark.parametrize("name", list(SPECS))
@torch.no_grad()
def test_full_sequence_matches_transformers(name: str) -> None:
    spec = SPECS[name]
    ours = _random_transformer(spec, seed=1)
    ref = _reference(spec, ours)
    batch, length = 2, 40
    x = torch.randn(batch, length, spec.embed_dim)
    expected = ref(inputs_embeds=x).last_hidden_state
    ours.setup_caches(rows=batch, seq_len=min(spec.max_seq_len, 512))
    positions = torch.arange(length).expand(batch, -1)
    got = ours(x, positions, slice(0, batch), kv_len=length)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_rows_at_different_positions_decode_like_their_own_sequences() -> None:
    """Prefill two rows to different lengths, then step both at once at their own positions."""
    spec = SPECS["backbone_like"]
    ours = _random_transformer(spec, seed=2)
    ref = _reference(spec, ours)
    lengths = [30, 17]
    seqs = [torch.randn(1, n + 3, spec.embed_dim) for n in lengths]
    ours.setup_caches(rows=2, seq_len=256)
    for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
        ours(seq[:, :n], torch.arange(n).unsqueeze(0), slice(row, row + 1), kv_len=n)
    for step in range(3):
        x = torch.cat([seqs[0][:, lengths[0] + step], seqs[1][:, lengths[1] + step]]).unsqueeze(1)
        positions = torch.tensor([[lengths[0] + step], [lengths[1] + step]])
        got = ours(x, positions, slice(0, 2), kv_len=256)
        for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
            expected = ref(inputs_embeds=seq[:, : n + step + 1]).last_hidden_state[:, -1]
            torch.testing.assert_close(got[row], expected, atol=2e-5, rtol=1e-4)
