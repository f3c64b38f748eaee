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
from safetensors.torch import save_file

from shared.ml.codec.config import HeartCodecConfig
from shared.ml.codec.decoder import CODEC_FOLDER, HeartCodec
from shared.ml.codec.encoder import (
    CONFIG_NAME,
    DEFAULT_ENCODER_CONFIG,
    ENCODER_FOLDER,
    ENCODER_PREFIX,
    WEIGHTS_NAME,
    HeartCodecEncoderNetwork,
    load_codec_rvq,
)
from shared.ml.codec.features import merge_config
from shared.ml.models.checkpoint import CheckpointError, write_shards

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


def tiny_encoder_config(latent_dim: int) -> dict:
    """The released encoder config with every network shrunk. Layer counts keep the hidden
    states the encoder reads (WavLM 6–9, conformer 11); the audio front ends keep their
    rates, strides and windows, so chunking and frame counts are the real ones."""
    return merge_config(
        DEFAULT_ENCODER_CONFIG,
        {
            "feature_extractors": {
                "whisper_config": {
                    "d_model": 16,
                    "encoder_layers": 1,
                    "encoder_attention_heads": 2,
                    "encoder_ffn_dim": 32,
                },
                "wavlm_config": {
                    "hidden_size": 16,
                    "num_hidden_layers": 9,
                    "num_attention_heads": 1,
                    "intermediate_size": 32,
                    "conv_dim": [16] * 7,
                    "num_conv_pos_embeddings": 16,
                    "num_conv_pos_embedding_groups": 4,
                    "num_buckets": 32,
                },
                "muencoder_config": {
                    "conv_dim": 4,
                    "conformer_config": {
                        "hidden_size": 16,
                        "num_hidden_layers": 11,
                        "num_attention_heads": 1,
                        "intermediate_size": 32,
                        "conv_depthwise_kernel_size": 7,
                        "num_conv_pos_embeddings": 16,
                        "num_conv_pos_embedding_groups": 4,
                    },
                },
            },
            "query": {"dim": latent_dim, "num_layers": 1, "head_dim": 32},
        },
    )


def _let_queries_follow_input(network: HeartCodecEncoderNetwork) -> None:
    """At stock initialisation (LayerScale 1e-2, near-uniform attention) every query reads the
    same average of the chunk and all tokens come out equal, which would make tests vacuous.
    Full residual branches, sharper attention and louder attention output make the tokens
    follow the audio."""
    with torch.no_grad():
        for block in network.query.encoder_transformers:
            block.self_attn_scale.scale.fill_(1.0)
            block.ff_scale.scale.fill_(1.0)
            block.self_attn.q_norm.weight.mul_(4.0)
            block.self_attn.k_norm.weight.mul_(4.0)
            block.self_attn.to_out.parametrizations.weight.original0.mul_(10.0)


def write_tiny_encoder(model_dir: Path, seed: int = 0) -> Path:
    """Write HeartCodec-oss-encoder/ (official layout and names) under model_dir.

    The encoder's latents must match the codec's RVQ, so `model_dir/HeartCodec-oss/` has to
    be written first; its RVQ input size becomes the tiny query transformer's width.
    """
    codec = model_dir / CODEC_FOLDER
    if not codec.is_dir():
        raise CheckpointError(
            f"{codec} not found: the tiny encoder takes its latent size from the codec's RVQ, "
            "so write the tiny codec first"
        )
    latent_dim = load_codec_rvq(codec, torch.device("cpu")).project_in.in_features
    config = tiny_encoder_config(latent_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # each module's own initialisation, made reproducible
        network = HeartCodecEncoderNetwork(config)
    _let_queries_follow_input(network)
    folder = model_dir / ENCODER_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    state = {ENCODER_PREFIX + k: v.contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder
