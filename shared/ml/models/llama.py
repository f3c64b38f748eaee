"""Llama-3.2 style decoder-only transformer with a static, slot-addressed KV cache.

HeartMuLa uses two of these (backbone and local decoder) without token embeddings or output
layers. The cache is preallocated for `max_rows` rows (batch slots) and `max_seq_len` positions
so that generation allocates nothing per frame; every row carries its own positions, which is
what lets requests of different lengths share one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class TransformerSpec:
    """Sizes of one Llama-3.2 transformer (a "flavor")."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scale_factor: float = 32.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_old_context_len: int = 8192  # unrelated-literal: Llama 3's rope scaling

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} must divide by num_heads {self.num_heads}, "
                f"which must divide by num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")


def llama3_inv_freq(spec: TransformerSpec) -> torch.Tensor:
    """Rotary inverse frequencies with Llama-3 long-context scaling (float64 for exactness)."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    low_wavelen = spec.rope_old_context_len / spec.rope_low_freq_factor
    high_wavelen = spec.rope_old_context_len / spec.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (spec.rope_old_context_len / wavelen - spec.rope_low_freq_factor) / (
        spec.rope_high_freq_factor - spec.rope_low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / spec.rope_scale_factor + smooth * inv_freq
    scaled = torch.where(wavelen < high_wavelen, inv_freq, blended)
    return torch.where(wavelen > low_wavelen, inv_freq / spec.rope_scale_factor, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, S, H, D] by per-position angles."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rotated.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.scale.float()).type_as(x)


class KVCache:
    """Preallocated keys and values for one attention layer: [rows, kv_heads, seq, head_dim]."""

    def __init__(
        self,
        rows: int,
        spec: TransformerSpec,
        seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (rows, spec.num_kv_heads, seq_len, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


class Attention(nn.Module):
    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.spec = spec
        hd = spec.head_dim
        self.q_proj = nn.Linear(spec.embed_dim, spec.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(spec.embed_dim, spec.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(spec.embed_dim, spec.num_kv_heads * hd, bias=False)
        self.output_proj = nn.Linear(spec.num_heads * hd, spec.embed_dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        rows: slice | torch.Tensor,
        kv_len: int,
    ) -> torch.Tensor:
        """Attend x [B, S, D] at positions [B, S] over cache rows `rows`, keys 0..kv_len-1.

        New keys/values are written into the cache first, then each query sees every cached
        position up to its own (causal within the row; other rows are independent).
        """
        b, s, _ = x.shape
        hd = self.spec.head_dim
        q = apply_rotary(self.q_proj(x).view(b, s, self.spec.num_heads, hd), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, s, self.spec.num_kv_heads, hd), cos, sin)
        v = self.v_proj(x).view(b, s, self.spec.num_kv_heads, hd)

        if isinstance(rows, slice):
            row_index = torch.arange(rows.start, rows.stop, device=x.device)
        else:
            row_index = rows
        cache.k[row_index.unsqueeze(1), :, positions] = k.to(cache.k.dtype)
        cache.v[row_index.unsqueeze(1), :, positions] = v.to(cache.v.dtype)
        # A slice of rows reads the cache in place; scattered rows (a prefill) gather a copy.
        keys, values = cache.k[rows, :, :kv_len], cache.v[rows, :, :kv_len]

        key_pos = torch.arange(kv_len, device=x.device)
        mask = key_pos.view(1, 1, 1, kv_len) <= positions.view(b, 1, s, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True
        )
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))

    def forward_causal(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Training: attend x [B, S, D] causally over itself, no cache (positions 0..S-1)."""
        b, s, _ = x.shape
        hd = self.spec.head_dim
        q = apply_rotary(self.q_proj(x).view(b, s, self.spec.num_heads, hd), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, s, self.spec.num_kv_heads, hd), cos, sin)
        v = self.v_proj(x).view(b, s, self.spec.num_kv_heads, hd)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerLayer(nn.Module):
    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.sa_norm = RMSNorm(spec.embed_dim, spec.norm_eps)
        self.attn = Attention(spec)
        self.mlp_norm = RMSNorm(spec.embed_dim, spec.norm_eps)
        self.mlp = FeedForward(spec.embed_dim, spec.intermediate_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        rows: slice | torch.Tensor,
        kv_len: int,
    ) -> torch.Tensor:
        x = x + self.attn(self.sa_norm(x), cos, sin, positions, cache, rows, kv_len)
        return x + self.mlp(self.mlp_norm(x))

    def forward_causal(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.forward_causal(self.sa_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Stack of layers plus final norm; embeddings and heads belong to the caller."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(TransformerLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.embed_dim, spec.norm_eps)
        self._rope_cos: torch.Tensor | None = None
        self._rope_sin: torch.Tensor | None = None
        self.caches: list[KVCache] = []

    def setup_caches(self, rows: int, seq_len: int) -> None:
        """Allocate the static KV cache and rotary tables (once; reused for every request)."""
        weight = self.norm.scale
        device, dtype = weight.device, self.layers[0].attn.q_proj.weight.dtype
        self.caches = [KVCache(rows, self.spec, seq_len, dtype, device) for _ in self.layers]
        inv_freq = llama3_inv_freq(self.spec)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
        self._rope_cos = angles.cos().float().to(device)
        self._rope_sin = angles.sin().float().to(device)

    @property
    def cache_rows(self) -> int:
        return self.caches[0].k.shape[0] if self.caches else 0

    @property
    def cache_len(self) -> int:
        return self.caches[0].k.shape[2] if self.caches else 0

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rows: slice | torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """Run x [B, S, D] at positions [B, S] on cache rows `rows` (a slice, or a row index
        tensor; B == the number of rows)."""
        if not self.caches:
            raise RuntimeError("setup_caches() must be called before running the transformer")
        cos, sin = self._rope_cos[positions], self._rope_sin[positions]
        for layer, cache in zip(self.layers, self.caches, strict=True):
            x = layer(x, cos, sin, positions, cache, rows, kv_len)
        return self.norm(x)

    def forward_causal(self, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        """Training (teacher forcing): x [B, S, D] at positions 0..S-1, causal, no cache.
        With `checkpointing`, each layer's activations are recomputed in the backward pass
        (memory of one layer instead of all: what lets the 3B train on a 24 GB GPU)."""
        angles = torch.outer(
            torch.arange(x.shape[1], dtype=torch.float64, device=x.device),
            llama3_inv_freq(self.spec).to(x.device),
        )
        cos, sin = angles.cos().float().unsqueeze(0), angles.sin().float().unsqueeze(0)
        for layer in self.layers:
            if checkpointing:
                x = checkpoint(layer.forward_causal, x, cos, sin, use_reentrant=False)
            else:
                x = layer.forward_causal(x, cos, sin)
        return self.norm(x)
