"""The HeartCodec encoder's query transformer: fused 25 Hz features → one 512-dim vector per 80 ms.

Module names follow the official checkpoint. The four feature streams are projected and fused
into one sequence; after every `interval` frames a learned query token is inserted, and the
transformer's outputs at the query positions are the 12.5 Hz latents the RVQ quantizes.
Blocks have no pre-norm: weight-normed attention with Q/K LayerNorm and rotary positions on
part of each head, a sigmoid-gated feed-forward, and LayerScale on both residual branches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm


class RotaryEmbedding(nn.Module):
    """Rotation angles for the first `dim` channels of each head (base 10000)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, length: int) -> Tensor:
        positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq.float())
        return torch.cat((angles, angles), dim=-1)


def apply_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate-half RoPE on the leading channels of the last axis, in fp32; the rest pass."""
    width = angles.shape[-1]
    xf = x.float()
    rotated, rest = xf[..., :width], xf[..., width:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()
    return torch.cat((rotated, rest), dim=-1).to(x.dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), 1e-2))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class SigmoidGLU(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = weight_norm(nn.Linear(dim, 8 * dim))

    def forward(self, x: Tensor) -> Tensor:
        values, gate = self.proj(x).chunk(2, dim=-1)
        return values * gate.sigmoid()


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        # Slots 1 and 3 held dropout in training; they keep the checkpoint's indices.
        self.ff = nn.Sequential(
            SigmoidGLU(dim), nn.Identity(), weight_norm(nn.Linear(4 * dim, dim)), nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.ff(x)


class QueryAttention(nn.Module):
    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.to_qkv = weight_norm(nn.Linear(dim, 3 * dim, bias=False))
        self.to_out = weight_norm(nn.Linear(dim, dim, bias=False))
        self.q_norm = nn.LayerNorm(head_dim)
        self.k_norm = nn.LayerNorm(head_dim)

    def forward(self, x: Tensor, angles: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = (
            part.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
            for part in self.to_qkv(x).chunk(3, dim=-1)
        )
        q = apply_rotary(self.q_norm(q), angles)
        k = apply_rotary(self.k_norm(k), angles)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, length, dim))


class QueryTransformerBlock(nn.Module):
    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.self_attn = QueryAttention(dim, head_dim)
        self.self_attn_scale = LayerScale(dim)
        self.ff = FeedForward(dim)
        self.ff_scale = LayerScale(dim)
        self.rope = RotaryEmbedding(max(head_dim // 2, 32))

    def forward(self, x: Tensor) -> Tensor:
        angles = self.rope(x.shape[1])
        x = x + self.self_attn_scale(self.self_attn(x, angles))
        return x + self.ff_scale(self.ff(x))


class HeartCodecQueryEncoder(nn.Module):
    """(acoustic, semantic, whisper, wavlm) [B, T, C_i] → latents [B, T / interval, dim]."""

    def __init__(
        self,
        feature_dims: tuple[int, int, int, int],
        dim: int = 512,
        num_layers: int = 6,
        head_dim: int = 128,
        interval: int = 2,
    ) -> None:
        super().__init__()
        if head_dim < 32 or head_dim % 4 or dim % head_dim:
            raise ValueError(
                f"query head_dim {head_dim} must be a multiple of 4, at least 32, and divide "
                f"dim {dim}"
            )
        if num_layers < 1 or interval < 1:
            raise ValueError("query num_layers and interval must be positive")
        acoustic, semantic, whisper, wavlm = feature_dims
        self.feature_dims = feature_dims
        self.interval = interval
        self.cond_fusion_layer_semantic = nn.Linear(semantic, dim)
        self.cond_fusion_layer_acoustic = nn.Linear(acoustic, dim)
        self.cond_fusion_layer_phone = nn.Linear(wavlm, dim)
        self.feature_proj = nn.Linear(3 * dim + whisper, dim)  # Whisper enters unprojected
        self.cls_token = nn.Parameter(torch.randn(1, dim))
        self.encoder_transformers = nn.Sequential(
            *(QueryTransformerBlock(dim, head_dim) for _ in range(num_layers))
        )

    @property
    def dim(self) -> int:
        return self.cls_token.shape[-1]

    def forward(self, acoustic: Tensor, semantic: Tensor, whisper: Tensor, wavlm: Tensor) -> Tensor:
        batch, frames, _ = acoustic.shape
        if frames == 0 or frames % self.interval:
            raise ValueError(f"feature frames ({frames}) must be a positive multiple of interval")
        fused = self.feature_proj(
            torch.cat(
                (
                    self.cond_fusion_layer_acoustic(acoustic),
                    self.cond_fusion_layer_semantic(semantic),
                    whisper,
                    self.cond_fusion_layer_phone(wavlm),
                ),
                dim=-1,
            )
        )
        groups = fused.reshape(batch, frames // self.interval, self.interval, -1)
        queries = self.cls_token.reshape(1, 1, 1, -1).expand(batch, groups.shape[1], 1, -1)
        sequence = torch.cat((groups, queries), dim=2).flatten(1, 2)
        sequence = self.encoder_transformers(sequence)
        return sequence[:, self.interval :: self.interval + 1]
