"""Lyrics transcription with the HeartTranscriptor (a transformers Whisper checkpoint).

Decoding follows the reference: 30 s chunks decoded 16 at a time, 2 beams, temperature fallback
0.0/0.1/0.2/0.4 (compression ratio 1.8, log-prob -1.0, no-speech 0.4), previous text not used as
a prompt, at most 256 new tokens per window. The chunks do not overlap (the reference's ASR
pipeline overlaps them by 5 s and merges the token streams); each chunk's segments are shifted
by the chunk's start. Inside a chunk transformers' own Whisper loop seeks past the last complete
segment and decodes the rest of the window again, as Whisper does for long audio.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor
from transformers.models.whisper.tokenization_whisper import _combine_tokens_into_words

from shared.core.audio import AudioError
from shared.core.constants import WHISPER_SAMPLE_RATE
from shared.core.languages import LANGUAGES
from shared.core.languages import language_code as known_language
from shared.core.lyrics import Segment, Transcript, Word
from shared.core.progress import AbortCheck, Progress, check_abort
from shared.ml.models.checkpoint import CheckpointError, resolve_device, resolve_dtype
from shared.ml.resample import resample

TRANSCRIBER_FOLDER = "HeartTranscriptor-oss"
CHUNK_S = 30
DEFAULT_BATCH_SIZE = 16
# The reference's decoding options (heartlib examples/run_lyrics_transcription.py).
NUM_BEAMS = 2
TEMPERATURES = (0.0, 0.1, 0.2, 0.4)
COMPRESSION_RATIO_THRESHOLD = 1.8
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.4
MAX_NEW_TOKENS = 256


def _chunks(mono: np.ndarray) -> list[np.ndarray]:
    size = CHUNK_S * WHISPER_SAMPLE_RATE
    return [mono[start : start + size] for start in range(0, mono.shape[0], size)]


def _to_mono_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    if not isinstance(audio, np.ndarray) or audio.ndim != 2 or audio.shape[1] == 0:
        shape = getattr(audio, "shape", type(audio).__name__)
        raise AudioError(f"audio must be a [channels, samples] array with samples, got {shape}")
    if sample_rate <= 0:
        raise AudioError(f"sample_rate must be positive, got {sample_rate}")
    if not np.isfinite(audio).all():
        raise AudioError("audio contains NaN or infinite samples")
    mono = audio.astype(np.float32).mean(axis=0, keepdims=True)
    return resample(mono, sample_rate, WHISPER_SAMPLE_RATE)[0]


class Transcriber:
    """A loaded HeartTranscriptor; `transcribe` can be called many times."""

    def __init__(
        self,
        model: WhisperForConditionalGeneration,
        processor: WhisperProcessor,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        generation = model.generation_config
        self.multilingual = bool(getattr(generation, "is_multilingual", False))
        self.has_word_timings = getattr(generation, "alignment_heads", None) is not None
        self.timestamp_begin = generation.no_timestamps_token_id + 1
        self.special_ids = set(processor.tokenizer.all_special_ids)
        self.id_to_language = {i: t[2:-2] for t, i in (generation.lang_to_id or {}).items()}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def language_code(self, language: str) -> str:
        """'en', '<|en|>' or 'english' → 'en', checked against the checkpoint's languages."""
        try:
            code: str | None = known_language(language)
        except ValueError:
            code = None
        if code is None or code not in self.id_to_language.values():
            known = ", ".join(sorted(self.id_to_language.values())) or "none (English-only)"
            raise ValueError(f"language: {language!r} is not one this model knows ({known})")
        return code

    def _generation_config(self) -> Any:
        config = copy.deepcopy(self.model.generation_config)
        config.num_beams = NUM_BEAMS
        config.max_new_tokens = self.max_new_tokens
        return config

    def _languages(self, features: torch.Tensor, language: str | None) -> list[str] | None:
        """One language code per chunk: the one asked for, else Whisper's detection per chunk."""
        if language is not None:
            return [language] * features.shape[0]
        if not self.multilingual:
            return None
        ids = self.model.detect_language(input_features=features)
        return [self.id_to_language[int(i)] for i in ids]

    def _words(
        self,
        tokens: list[int],
        times: torch.Tensor,
        language: str | None,
        bounds: tuple[float, float],
    ) -> list[Word]:
        """Group a segment's text tokens into words timed by their tokens' alignment times."""
        keep = [
            i
            for i, t in enumerate(tokens)
            if t < self.timestamp_begin and t not in self.special_ids
        ]
        text_tokens = [tokens[i] for i in keep]
        token_times = [float(times[i]) for i in keep] + [bounds[1]]
        words, _, indices = _combine_tokens_into_words(
            self.processor.tokenizer, text_tokens, LANGUAGES.get(language or "en", "english")
        )

        def clamp(t: float) -> float:
            return round(min(max(t, bounds[0]), bounds[1]), 3)

        return [
            Word(clamp(token_times[idx[0]]), clamp(token_times[idx[-1] + 1]), word.strip())
            for word, idx in zip(words, indices, strict=True)
            if idx and word.strip()
        ]

    def _segments(
        self,
        raw: Sequence[dict[str, Any]],
        offset: float,
        length: float,
        language: str | None,
        word_timings: bool,
    ) -> list[Segment]:
        """transformers' segments of one chunk → ours, in song time, clipped to the chunk's audio.

        The last chunk is padded to 30 s with silence; anything placed in the padding is dropped.
        """
        segments = []
        for seg in raw:
            start, end = float(seg["start"]), float(seg["end"])
            if start >= length:
                continue
            end = max(start, min(end, length))
            tokens = seg["tokens"].tolist()
            text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            if not text:
                continue
            words = None
            if word_timings:
                times = seg["token_timestamps"] + offset
                words = self._words(tokens, times, language, (start + offset, end + offset))
            segments.append(Segment(round(start + offset, 3), round(end + offset, 3), text, words))
        return segments

    def _rng_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    def _generate(
        self,
        features: torch.Tensor,
        config: Any,
        languages: list[str] | None,
        word_timings: bool,
    ) -> dict[str, Any]:
        """Whisper's long-form generate with the reference's decoding options."""
        return self.model.generate(
            features,
            generation_config=config,
            language=languages,
            task="transcribe" if self.multilingual else None,
            return_timestamps=True,
            return_segments=True,
            return_token_timestamps=word_timings,
            temperature=TEMPERATURES,
            compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD,
            logprob_threshold=LOGPROB_THRESHOLD,
            no_speech_threshold=NO_SPEECH_THRESHOLD,
            condition_on_prev_tokens=False,
        )

    @torch.inference_mode()
    def transcribe(
        self,
        audio: np.ndarray,
        sample_rate: int,
        *,
        language: str | None = None,
        word_timestamps: bool | None = None,
        on_progress: Progress | None = None,
        should_abort: AbortCheck | None = None,
        seed: int = 0,
    ) -> Transcript:
        """Transcribe [channels, samples] float audio at any rate (mixed to mono, 16 kHz).

        The temperature fallback samples; its noise comes from `seed`, so the same audio always
        gives the same transcript (a retried job writes the same files).

        `word_timestamps`: None gives word timings where the checkpoint's generation config
        names alignment heads; True requires them. `on_progress("transcribing", fraction)`
        counts chunks after each batch; `should_abort` is polled before each batch and raises
        Aborted.
        """
        if word_timestamps and not self.has_word_timings:
            raise ValueError(
                "word_timestamps: this checkpoint's generation_config.json has no alignment_heads"
            )
        word_timings = self.has_word_timings if word_timestamps is None else word_timestamps
        code = self.language_code(language) if language is not None else None
        mono = _to_mono_16k(audio, sample_rate)
        chunks = _chunks(mono)
        config = self._generation_config()
        feature_extractor = self.processor.feature_extractor
        segments: list[Segment] = []
        detected: Counter[str] = Counter()
        for first in range(0, len(chunks), self.batch_size):
            check_abort(should_abort, f"aborted after {first} of {len(chunks)} chunks")
            batch = chunks[first : first + self.batch_size]
            features = feature_extractor(
                batch, sampling_rate=WHISPER_SAMPLE_RATE, return_tensors="pt"
            ).input_features.to(self.device, self.model.dtype)
            languages = self._languages(features, code)
            detected.update(languages or [])
            with torch.random.fork_rng(devices=self._rng_devices()):
                torch.manual_seed(seed + first)
                output = self._generate(features, config, languages, word_timings)
            for i, raw in enumerate(output["segments"]):
                index = first + i
                segments += self._segments(
                    raw,
                    offset=float(index * CHUNK_S),
                    length=batch[i].shape[0] / WHISPER_SAMPLE_RATE,
                    language=languages[i] if languages else None,
                    word_timings=word_timings,
                )
            if on_progress is not None:
                on_progress("transcribing", (first + len(batch)) / len(chunks))
        return Transcript(
            text=" ".join(s.text for s in segments),
            language=code or (detected.most_common(1)[0][0] if detected else None),
            duration_s=mono.shape[0] / WHISPER_SAMPLE_RATE,
            segments=segments,
        )


def load_transcriber(
    model_dir: Path,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> Transcriber:
    """Load `model_dir/HeartTranscriptor-oss/` (model, tokenizer, feature extractor) once."""
    folder = Path(model_dir) / TRANSCRIBER_FOLDER
    if not folder.is_dir():
        raise CheckpointError(f"HeartTranscriptor checkpoint folder not found: {folder}")
    target = resolve_device(device)
    try:
        model = WhisperForConditionalGeneration.from_pretrained(
            folder, dtype=resolve_dtype(dtype, target), local_files_only=True
        )
        processor = WhisperProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: not a usable Whisper checkpoint ({error})") from error
    if getattr(model.generation_config, "no_timestamps_token_id", None) is None:
        raise CheckpointError(
            f"{folder}/generation_config.json lacks no_timestamps_token_id: "
            "timestamped segments cannot be decoded"
        )
    return Transcriber(model.to(target).eval(), processor, batch_size, max_new_tokens)
