"""HeartCodec's config.json, with the official field names (heartlib's HeartCodecConfig).

Tiny codecs use the same fields with small sizes. Fields the released decoder does not
vary (norm type, causal convolutions, one band, cosine-similarity codebooks) are checked
rather than silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from shared.core.constants import CODEC_CODES, FRAMES_PER_SECOND, NUM_CODEBOOKS, SAMPLE_RATE

LATENT_FRAMES_PER_CODE = 2


@dataclass(frozen=True)
class HeartCodecConfig:
    # residual VQ
    dim: int = 512
    codebook_size: int = CODEC_CODES
    codebook_dim: int = 32
    num_quantizers: int = NUM_CODEBOOKS
    decay: float = 0.9
    commitment_weight: float = 1.0
    threshold_ema_dead_code: int = 2
    use_cosine_sim: bool = False
    # flow-matching estimator (DiT)
    attention_head_dim: int = 64
    in_channels: int = 1024
    norm_type: str = "ada_norm_single"
    num_attention_heads: int = 24
    num_layers: int = 24
    num_layers_2: int = 6
    out_channels: int = 256
    # scalar (SQ) codec
    num_bands: int = 1
    sample_rate: int = SAMPLE_RATE
    causal: bool = True
    num_samples: int = 2
    downsample_factors: list[int] = field(default_factory=lambda: [3, 4, 4, 4, 5])
    downsample_kernel_sizes: list[int] = field(default_factory=lambda: [6, 8, 8, 8, 10])
    upsample_factors: list[int] = field(default_factory=lambda: [5, 4, 4, 4, 3])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [10, 8, 8, 8, 6])
    latent_hidden_dim: int = 128
    default_kernel_size: int = 7
    delay_kernel_size: int = 5
    init_channel: int = 64
    res_kernel_size: int = 7

    def __post_init__(self) -> None:
        problems = []
        if self.norm_type != "ada_norm_single":
            problems.append(f"norm_type {self.norm_type!r} (only 'ada_norm_single' is built)")
        if self.use_cosine_sim:
            problems.append("use_cosine_sim true (only L2 codebooks are built)")
        if not self.causal:
            problems.append("causal false (only the causal SQ codec is built)")
        if self.num_bands != 1:
            problems.append(f"num_bands {self.num_bands} (only 1 is built)")
        if self.out_channels != 2 * self.latent_hidden_dim:
            problems.append(
                f"out_channels {self.out_channels} != 2 × latent_hidden_dim "
                f"{self.latent_hidden_dim} (the latent holds both stereo channels)"
            )
        if self.in_channels != 2 * self.out_channels + self.dim:
            problems.append(
                f"in_channels {self.in_channels} != 2 × out_channels + dim "
                f"(noisy latent, in-context latent and condition are concatenated)"
            )
        if self.num_samples < 2:
            problems.append(f"num_samples {self.num_samples} (the pre/post processor needs >= 2)")
        if len(self.upsample_factors) != len(self.upsample_kernel_sizes):
            problems.append("upsample_factors and upsample_kernel_sizes differ in length")
        if len(self.downsample_factors) != len(self.downsample_kernel_sizes):
            problems.append("downsample_factors and downsample_kernel_sizes differ in length")
        for stride, kernel in zip(self.upsample_factors, self.upsample_kernel_sizes, strict=False):
            if kernel != 2 * stride:
                problems.append(f"upsample kernel {kernel} != 2 × stride {stride} (causal)")
        frame_rate = self.sample_rate / self.hop_length
        if frame_rate != FRAMES_PER_SECOND * LATENT_FRAMES_PER_CODE:
            problems.append(
                f"sample_rate / hop = {frame_rate:g} latent frames/s, expected "
                f"{FRAMES_PER_SECOND * LATENT_FRAMES_PER_CODE:g} "
                f"(codes are {FRAMES_PER_SECOND:g} Hz)"
            )
        if problems:
            raise ValueError("HeartCodec config.json: " + "; ".join(problems))

    @property
    def hop_length(self) -> int:
        """Audio samples per 25 Hz latent frame (1920 at 48 kHz)."""
        return self.num_samples * math.prod(self.upsample_factors)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeartCodecConfig:
        """Our fields from a config.json; HF bookkeeping keys (architectures, …) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": ["HeartCodec"], "model_type": "heartcodec", **asdict(self)}
