"""A tiny HeartCodec: official layout and key names, small widths, seeded random weights.

The time structure is the real one (12.5 Hz codes, 25 Hz latents, hop 1920, 48 kHz, 8 × 8192
codebooks, 372-code windows), so window arithmetic and output lengths match the real codec;
only the widths and depths shrink, which makes a 29.76 s window cheap on a CPU.
Random weights make noise, not music.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.codec.config import HeartCodecConfig
from shared.codec.decoder import CODEC_FOLDER, HeartCodec
from shared.models.checkpoint import write_shards

TINY_CODEC_CONFIG = HeartCodecConfig(
    dim=32,
    codebook_dim=8,
    attention_head_dim=16,
    num_attention_heads=2,
    num_layers=2,
    num_layers_2=1,
    latent_hidden_dim=8,
    out_channels=16,
    in_channels=2 * 16 + 32,
    init_channel=2,
)

PRELU_INIT = 0.25


def random_codec(config: HeartCodecConfig, seed: int, device: str = "cpu") -> HeartCodec:
    """A HeartCodec with weights drawn from a private generator (the global RNG is untouched).

    Matrices get N(0, 1/fan_in) (weight-normed ones a unit gain), so activations keep
    their scale through the stacks; norms start at 1, PReLU slopes at 0.25, codebooks N(0, 1).
    """
    with torch.device("meta"):
        model = HeartCodec(config)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("initted"):
                tensor.fill_(True)
            elif name.endswith(("cluster_size", "original0", "norm.weight")):
                tensor.fill_(1.0)
            elif ".activation" in name:
                tensor.fill_(PRELU_INIT)
            else:
                fan_in = tensor[0].numel() if tensor.ndim >= 2 else 1
                std = 1.0 if name.endswith(("embed", "embed_avg")) else fan_in**-0.5
                if tensor.ndim == 1:
                    std = 0.02
                tensor.copy_(torch.randn(tensor.shape, generator=generator, device=device) * std)
    return model.eval().requires_grad_(False)


def write_tiny_codec(model_dir: Path, seed: int = 0) -> Path:
    """Write `model_dir/HeartCodec-oss/` (config.json, two shards and their index)."""
    folder = Path(model_dir) / CODEC_FOLDER
    model = random_codec(TINY_CODEC_CONFIG, seed)
    write_shards(model.state_dict(), folder, num_shards=2)
    (folder / "config.json").write_text(json.dumps(TINY_CODEC_CONFIG.to_dict(), indent=2))
    return folder
