"""The flow-matching velocity estimator: a two-stage DiT (heartlib's LlamaTransformer).

Stage 1 runs `num_layers` blocks at width heads × head_dim on the projected input; stage 2
runs `num_layers_2` blocks at twice that width (heads × 2·head_dim) on [input, stage-1
output]; a projection gives the `out_channels` velocity. Every block is bidirectional
attention with RoPE (interleaved pairs, base 10000) and a SwiGLU MLP, both behind RMSNorm
(eps 1e-6) with AdaLN-single modulation from the flow time t. Names match the checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shared.ml.codec.config import HeartCodecConfig

NORM_EPS = 1e-6
ROPE_BASE = 10_000.0
TIME_EMBED_DIM = 512
TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t · 1000, like a diffusion step index


def swiglu_hidden(dim: int, multiple_of: int = 256) -> int:
    """Llama's MLP width rule: 2/3 of 4·dim, rounded up to a multiple (1536 → 4096)."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * -(-hidden // multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 so fp16/bf16 runs do not overflow the mean of squares.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + NORM_EPS)
        return self.weight * normed.to(x.dtype)


def rope_tables(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin [length, head_dim/2] for positions 0..length-1 (computed in fp32)."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, H, T, D] by position."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj), *rope)
        k = apply_rope(heads(self.k_proj), *rope)
        out = F.scaled_dot_product_attention(q, k, heads(self.v_proj))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = swiglu_hidden(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP; shift/scale/gate for each come from t (AdaLN-single)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim)

    def forward(
        self, x: torch.Tensor, modulation: torch.Tensor, rope: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        mod = self.scale_shift_table[None] + modulation.view(x.shape[0], 6, -1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.unsqueeze(2).unbind(1)
        x = x + gate_a * self.attn(self.attn_norm(x) * (1 + scale_a) + shift_a, rope)
        return x + gate_m * self.mlp(self.mlp_norm(x) * (1 + scale_m) + shift_m)


class ProjectLayer(nn.Module):
    """Conv1d (kernel 3, same length) then Linear, on [B, T, C] sequences."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.ffn_1 = nn.Conv1d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)
        self.ffn_2 = nn.Linear(out_dim, out_dim)
        self.scale = kernel_size**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_2(self.ffn_1(x.transpose(1, 2)).transpose(1, 2) * self.scale)


class _TimeMLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(TIME_EMBED_DIM, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = _TimeMLP(dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = TIME_EMBED_DIM // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None] * TIME_SCALE
        return self.timestep_embedder(torch.cat([args.cos(), args.sin()], dim=-1).to(dtype))


class AdaLNSingle(nn.Module):
    """t → (per-block modulation [B, 6·dim], time embedding [B, dim] for the output norm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.emb = _TimeEmbedding(dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.emb(t, dtype)
        return self.linear(F.silu(embedded)), embedded


class FlowEstimator(nn.Module):
    def __init__(self, config: HeartCodecConfig) -> None:
        super().__init__()
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        dim, dim_2 = heads * head_dim, 2 * heads * head_dim
        self.head_dims = (head_dim, 2 * head_dim)
        self.proj_in = ProjectLayer(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(dim, heads, head_dim) for _ in range(config.num_layers)
        )
        self.transformer_blocks_2 = nn.ModuleList(
            DiTBlock(dim_2, heads, 2 * head_dim) for _ in range(config.num_layers_2)
        )
        self.connection_proj = ProjectLayer(config.in_channels + dim, dim_2)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.scale_shift_table_2 = nn.Parameter(torch.zeros(2, dim_2))
        self.proj_out = ProjectLayer(dim_2, config.out_channels)
        self.adaln_single = AdaLNSingle(dim)
        self.adaln_single_2 = AdaLNSingle(dim_2)

    @staticmethod
    def _stage(
        x: torch.Tensor,
        t: torch.Tensor,
        blocks: nn.ModuleList,
        adaln: AdaLNSingle,
        out_table: torch.Tensor,
        head_dim: int,
    ) -> torch.Tensor:
        modulation, embedded = adaln(t, x.dtype)
        rope = rope_tables(x.shape[1], head_dim, x.device)
        for block in blocks:
            x = block(x, modulation, rope)
        shift, scale = (out_table[None] + embedded[:, None]).unsqueeze(2).unbind(1)
        x = F.layer_norm(x.float(), x.shape[-1:], eps=NORM_EPS).to(x.dtype)
        return x * (1 + scale) + shift

    def forward(self, inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """inputs [B, T, in_channels], t [B] in [0, 1] → velocity [B, T, out_channels]."""
        s = self.proj_in(inputs)
        s = self._stage(
            s,
            t,
            self.transformer_blocks,
            self.adaln_single,
            self.scale_shift_table,
            self.head_dims[0],
        )
        x = self.connection_proj(torch.cat([inputs, s], dim=-1))
        x = self._stage(
            x,
            t,
            self.transformer_blocks_2,
            self.adaln_single_2,
            self.scale_shift_table_2,
            self.head_dims[1],
        )
        return self.proj_out(x)
