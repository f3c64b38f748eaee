"""Tiny model directories: the official layout and key names, small sizes, seeded random weights.

Tests, CI, benchmarks and the local demo run on these instead of multi-gigabyte downloads.
Random weights make noise, not music.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from shared.core.constants import CONTEXT_POSITIONS
from shared.ml.codec.tiny import write_tiny_codec, write_tiny_encoder
from shared.ml.models.checkpoint import write_shards
from shared.ml.models.heartmula import HeartMuLa, HeartMuLaConfig
from shared.ml.models.llama import TransformerSpec
from shared.ml.models.prompt import GenConfig
from shared.ml.transcribe_tiny import write_tiny_transcriber

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
    max_seq_len=CONTEXT_POSITIONS,
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
        vocab_size=vocab_size - 2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    # Specials go last, as in Llama 3 (128000/128001), so text id 0 is an ordinary token.
    tokenizer.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
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


def write_tiny_models(model_dir: Path, seed: int = 0) -> list[Path]:
    """Every tiny part the project knows, in one model directory (the codec before the
    encoder, which takes the codec's RVQ)."""
    return [
        write_tiny_heartmula(model_dir, seed),
        write_tiny_codec(model_dir, seed),
        write_tiny_encoder(model_dir, seed),
        write_tiny_transcriber(model_dir, seed),
    ]
