"""A tiny HeartTranscriptor: a transformers Whisper folder with small widths and random weights.

The front end is the real one (80 mel bins, 16 kHz, 30 s windows of 3000 frames, 1500 encoder
positions, 20 ms timestamp tokens), and the tokenizer carries Whisper's special and timestamp
tokens in Whisper's order, so chunking, generation with timestamps and the offsets of segments
behave as with the released checkpoint. The BPE vocabulary is tiny and trained here, so nothing
is downloaded. Random weights transcribe gibberish, not lyrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from shared.ml.transcribe import TRANSCRIBER_FOLDER

# Languages the tiny model knows (the released one knows Whisper's full list).
TINY_LANGUAGES = ("en", "zh", "ja", "ko", "es")
TIMESTAMP_STEP_S = 0.02
WINDOW_S = 30.0

_LYRICS = [
    "the night is young and the city lights are calling out my name",
    "we sing together under the stars, hearts on fire, never apart",
    "hold on to the moment, let the music carry you home",
    "la la la oh oh yeah, dancing in the rain tonight",
    "I walk alone down this empty road, thinking of you",
]


def _train_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE (like Whisper's: every byte encodes) trained on a few lyric lines."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_LYRICS, trainer=trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return tokenizer.get_vocab(), [tuple(pair) for pair in merges]


def _special_tokens() -> list[str]:
    """Whisper's specials in Whisper's order; <|notimestamps|> last, so timestamps follow it."""
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in TINY_LANGUAGES),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]


def _timestamp_tokens() -> list[str]:
    steps = round(WINDOW_S / TIMESTAMP_STEP_S)
    return [f"<|{i * TIMESTAMP_STEP_S:.2f}|>" for i in range(steps + 1)]


def build_tiny_whisper_tokenizer(bpe_size: int = 320) -> WhisperTokenizer:
    """A WhisperTokenizer over a tiny BPE plus Whisper's special and timestamp tokens."""
    vocab, merges = _train_bpe(bpe_size)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": _special_tokens()[1:]})
    tokenizer.add_tokens(_timestamp_tokens())
    return tokenizer


def tiny_generation_config(tokenizer: WhisperTokenizer) -> GenerationConfig:
    """The Whisper generation fields `generate` needs for language, task and timestamps."""

    def tid(token: str) -> int:
        return tokenizer.convert_tokens_to_ids(token)

    eot = tid("<|endoftext|>")
    return GenerationConfig(
        decoder_start_token_id=tid("<|startoftranscript|>"),
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": tid(f"<|{code}|>") for code in TINY_LANGUAGES},
        task_to_id={"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")},
        no_timestamps_token_id=tid("<|notimestamps|>"),
        prev_sot_token_id=tid("<|startofprev|>"),
        begin_suppress_tokens=[tid("Ġ"), eot],
        suppress_tokens=[],
        max_initial_timestamp_index=50,
        max_length=448,
        # Cross-attention heads (layer, head) that token-level timestamps align with.
        alignment_heads=[[1, 0], [1, 1]],
    )


def write_tiny_transcriber(model_dir: Path, seed: int = 0) -> Path:
    """Write `model_dir/HeartTranscriptor-oss/` (config, weights, generation config, processor)."""
    folder = Path(model_dir) / TRANSCRIBER_FOLDER
    tokenizer = build_tiny_whisper_tokenizer()
    generation = tiny_generation_config(tokenizer)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=generation.decoder_start_token_id,
        bos_token_id=generation.bos_token_id,
        eos_token_id=generation.eos_token_id,
        pad_token_id=generation.pad_token_id,
        begin_suppress_tokens=generation.begin_suppress_tokens,
        suppress_tokens=[],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # transformers' own initialisation, made reproducible
        model = WhisperForConditionalGeneration(config)
    model.generation_config = generation
    model.save_pretrained(folder)
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer
    )
    processor.save_pretrained(folder)
    return folder
