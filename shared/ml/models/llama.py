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


def rope_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles [..., D/2] (float64) → cos, sin [..., D] (float32) laid out for interleaved pairs:
    cos repeated per pair, sin signed (-, +), so that a rotation is x·cos + swap_pairs(x)·sin."""
    cos = angles.cos().float().repeat_interleave(2, dim=-1)
    sin = angles.sin().float()
    return cos, torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, S, H, D] by `rope_tables` [B, S, 1, D]:
    even·cos + odd·(-sin) and odd·cos + even·sin, bit for bit the pairwise formula, in 3 ops."""
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x32 * cos + swapped * sin).type_as(x)


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


@dataclass(frozen=True)
class CacheSlots:
    """Where one forward call writes the cache and what it reads back, built once per call
    for all layers. Rows at their own positions [B, S] write by index and read `kv_len` keys
    under a mask; rows all at positions start..start+S-1 (`start` set: the local decoder)
    write a slice and read exactly the keys written so far, no mask for one new position."""

    rows: slice | torch.Tensor
    kv_len: int
    mask: torch.Tensor | None  # [B or 1, 1, S, kv_len] bool
    positions: torch.Tensor | None = None  # [B, S], per-row positions
    row_index: torch.Tensor | None = None  # [B, 1], their rows
    start: int | None = None  # all rows at start..start+S-1

    def write(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v [B, S, kv_heads, hd]; return the keys and values [B, kv_heads, kv, hd]
        attended (in place for a slice of rows; a row index tensor gathers a copy)."""
        if self.start is None:
            cache.k[self.row_index, :, self.positions] = k.to(cache.k.dtype)
            cache.v[self.row_index, :, self.positions] = v.to(cache.v.dtype)
        else:
            stop = self.start + k.shape[1]
            cache.k[self.rows, :, self.start : stop] = k.transpose(1, 2).to(cache.k.dtype)
            cache.v[self.rows, :, self.start : stop] = v.transpose(1, 2).to(cache.v.dtype)
        return cache.k[self.rows, :, : self.kv_len], cache.v[self.rows, :, : self.kv_len]


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
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, at: CacheSlots
    ) -> torch.Tensor:
        """Attend x [B, S, D] over its cache rows: new keys/values are written at `at` first,
        then each query sees the cached positions `at` allows it (causal within its row)."""
        b, s, _ = x.shape
        hd = self.spec.head_dim
        q = apply_rotary(self.q_proj(x).view(b, s, self.spec.num_heads, hd), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, s, self.spec.num_kv_heads, hd), cos, sin)
        v = self.v_proj(x).view(b, s, self.spec.num_kv_heads, hd)
        keys, values = at.write(cache, k, v)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=at.mask, enable_gqa=True
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
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, at: CacheSlots
    ) -> torch.Tensor:
        x = x + self.attn(self.sa_norm(x), cos, sin, cache, at)
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
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), llama3_inv_freq(self.spec))
        cos, sin = rope_tables(angles)  # [seq, head_dim]
        self._rope_cos, self._rope_sin = cos.to(device), sin.to(device)

    @property
    def cache_rows(self) -> int:
        return self.caches[0].k.shape[0] if self.caches else 0

    @property
    def cache_len(self) -> int:
        return self.caches[0].k.shape[2] if self.caches else 0

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | int,
        rows: slice | torch.Tensor,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Run x [B, S, D] on cache rows `rows` (a slice, or a row index tensor; B == the
        number of rows) at `positions`: [B, S] per row, attending over `kv_len` cache
        positions; or an int `start`, every row at start..start+S-1, attending over exactly
        the start+S positions written (what the local decoder's rows share)."""
        if not self.caches:
            raise RuntimeError("setup_caches() must be called before running the transformer")
        b, s, _ = x.shape
        if isinstance(positions, int):
            stop = positions + s
            cos = self._rope_cos[positions:stop].view(1, s, 1, -1)
            sin = self._rope_sin[positions:stop].view(1, s, 1, -1)
            mask = None
            if s > 1:
                query_pos = torch.arange(positions, stop, device=x.device).view(s, 1)
                mask = torch.arange(stop, device=x.device) <= query_pos
            at = CacheSlots(rows, stop, mask, start=positions)
        else:
            if kv_len is None:
                raise ValueError("per-row positions need kv_len")
            cos, sin = (
                self._rope_cos[positions].unsqueeze(2),
                self._rope_sin[positions].unsqueeze(2),
            )
            if isinstance(rows, slice):
                row_index = torch.arange(rows.start, rows.stop, device=x.device)
            else:
                row_index = rows
            key_pos = torch.arange(kv_len, device=x.device)
            mask = key_pos.view(1, 1, 1, kv_len) <= positions.view(b, 1, s, 1)
            at = CacheSlots(rows, kv_len, mask, positions, row_index.unsqueeze(1))
        for layer, cache in zip(self.layers, self.caches, strict=True):
            x = layer(x, cos, sin, cache, at)
        return self.norm(x)

    def forward_causal(self, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        """Training (teacher forcing): x [B, S, D] at positions 0..S-1, causal, no cache.
        With `checkpointing`, each layer's activations are recomputed in the backward pass
        (memory of one layer instead of all: what lets the 3B train on a 24 GB GPU)."""
        angles = torch.outer(
            torch.arange(x.shape[1], dtype=torch.float64, device=x.device),
            llama3_inv_freq(self.spec).to(x.device),
        )
        cos, sin = (t.view(1, x.shape[1], 1, -1) for t in rope_tables(angles))
        for layer in self.layers:
            if checkpointing:
                x = checkpoint(layer.forward_causal, x, cos, sin, use_reentrant=False)
            else:
                x = layer.forward_causal(x, cos, sin)
        return self.norm(x)
