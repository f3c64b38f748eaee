"""Tiny model directories: the official layout and key names, small sizes, seeded random weights.

Tests, CI, benchmarks and the local demo run on these instead of multi-gigabyte downloads.
Random weights make noise, not music.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from shared.codec.encoder import (
    CODEC_FOLDER,
    CONFIG_NAME,
    DEFAULT_ENCODER_CONFIG,
    ENCODER_FOLDER,
    ENCODER_PREFIX,
    WEIGHTS_NAME,
    HeartCodecEncoderNetwork,
    load_codec_rvq,
)
from shared.codec.features import merge_config
from shared.models.checkpoint import CheckpointError, write_shards
from shared.models.heartmula import HeartMuLa, HeartMuLaConfig
from shared.models.llama import TransformerSpec
from shared.models.prompt import GenConfig

TINY_VERSION = "tiny"
NOISE_WARNING = "tiny models have random weights: they make noise, not music"

BOS_TOKEN, EOS_TOKEN = "<|begin_of_text|>", "<|end_of_text|>"

# Enough text for a byte-level BPE to learn tag words and common lyric fragments.
_CORPUS = [
    "<tag>warm,reflection,pop,cafe,r&b,keyboard,regret</tag>",
    "<tag>drum machine,electric guitar,synthesizer,soft,energetic,electronic</tag>",
    "<tag>self-discovery,sad,ballad,longing,meditation,faith</tag>",
    "<tag>acoustic,peaceful,wedding,piano,strings,acoustic guitar</tag>",
    "<tag>romantic,drums,emotional,walking,hope,hopeful,powerful,epic,driving,rock</tag>",
    "[verse] the night is young and the city lights are calling out my name",
    "[chorus] we sing together under the stars, hearts on fire, never apart",
    "[bridge] hold on to the moment, let the music carry you home",
    "[intro] [outro] la la la oh oh yeah, dancing in the rain tonight",
]

TINY_BACKBONE = TransformerSpec(
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=128,
    intermediate_dim=256,
    max_seq_len=8192,
)
TINY_DECODER = TransformerSpec(
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    intermediate_dim=128,
    max_seq_len=16,
)


def build_tiny_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Byte-level BPE like Llama 3's (any text encodes), BOS added on encode like Llama 3's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    bos = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos)]
    )
    return tokenizer


def tiny_heartmula_config(text_vocab_size: int) -> HeartMuLaConfig:
    return HeartMuLaConfig(
        backbone=TINY_BACKBONE,
        decoder=TINY_DECODER,
        text_vocab_size=text_vocab_size,
        muq_dim=32,
        backbone_flavor="custom",
        decoder_flavor="custom",
    )


def random_heartmula(
    config: HeartMuLaConfig,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> HeartMuLa:
    """A HeartMuLa with seeded N(0, 0.02) weights and unit norm scales."""
    with torch.device(device):
        model = HeartMuLa(config).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".scale"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, device=device) * 0.02)
    return model.eval().requires_grad_(False)


def write_tiny_heartmula(model_dir: Path, seed: int = 0) -> Path:
    """Write tokenizer.json, gen_config.json and HeartMuLa-oss-tiny/ under model_dir."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    gen_config = GenConfig(
        text_bos_id=tokenizer.token_to_id(BOS_TOKEN),
        text_eos_id=tokenizer.token_to_id(EOS_TOKEN),
    )
    (model_dir / "gen_config.json").write_text(json.dumps(gen_config.__dict__, indent=2))

    config = tiny_heartmula_config(tokenizer.get_vocab_size())
    folder = model_dir / f"HeartMuLa-oss-{TINY_VERSION}"
    model = random_heartmula(config, seed)
    write_shards(model.state_dict(), folder, num_shards=2)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
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


def write_tiny_models(model_dir: Path, seed: int = 0) -> list[Path]:
    """Every tiny part the project knows, in one model directory (the codec before the
    encoder, which takes the codec's RVQ)."""
    return [write_tiny_heartmula(model_dir, seed), write_tiny_encoder(model_dir, seed)]
