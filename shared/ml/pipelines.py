"""Job pipelines over the models: generate (tokens → audio), decode and encode.

Plain functions over arrays with a progress callback and an abort check; they know nothing of
Celery, Redis or the object store, so workers and one-shot runs share them. Progress covers
the whole pipeline (0–1); an abort raises shared.core.progress.Aborted from whichever step saw
it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from shared.core.constants import FRAME_S, SAMPLES_PER_FRAME
from shared.core.inpaint import Gap, decode_window, splice_audio, splice_tokens
from shared.core.progress import AbortCheck, Aborted, Progress, share_of
from shared.core.tokens import InputError, check_tokens
from shared.ml.codec.batching import CodecBatcher
from shared.ml.codec.encoder import HeartCodecEncoder
from shared.ml.generation.engine import GenerationEngine, GenerationRequest, GenerationResult

# Share of a generate job's progress spent generating tokens; decoding takes the rest.
GENERATE_SHARE = 0.8
DECODE_STEPS = 10  # the reference's flow-matching steps for generated songs


class NothingGenerated(RuntimeError):
    """The model ended the song (audio EOS) before its first new frame."""


@dataclass
class Song:
    tokens: np.ndarray  # [8, T] int32
    audio: np.ndarray  # [2, T * 3840] float32, 48 kHz
    finish_reason: str
    seed: int


def decode_tokens(
    codec: CodecBatcher,
    tokens: np.ndarray,
    *,
    seed: int,
    steps: int,
    progress: Progress,
    should_abort: AbortCheck,
) -> np.ndarray:
    """Tokens → [2, T*3840] float32 audio through the worker's codec batcher: the windows of
    concurrent decodes share estimator batches, and the audio is the song's decoded alone.

    An abort takes effect at the next solver step, or at the next round while waiting.
    """
    audio = codec.detokenize(
        tokens, steps=steps, seed=seed, on_progress=progress, should_abort=should_abort
    ).numpy()
    expected = (2, tokens.shape[1] * SAMPLES_PER_FRAME)
    if audio.shape != expected:
        raise RuntimeError(f"codec returned audio of shape {list(audio.shape)}, not {expected}")
    return audio


def _generate_tokens(
    engine: GenerationEngine,
    request: GenerationRequest,
    progress: Progress,
    should_abort: AbortCheck,
) -> GenerationResult:
    """New frames from the batched engine; progress covers the generating share."""
    generating = share_of(progress, 0.0, GENERATE_SHARE)
    generating("generating", 0.0, 0, request.frames)
    result = engine.submit(request, on_progress=generating, should_abort=should_abort).result()
    if result.finish_reason == "aborted":
        raise Aborted(f"generation aborted after {result.tokens.shape[1]} frames")
    if result.tokens.shape[1] == 0:
        raise NothingGenerated(
            "the model ended the song before its first new frame (audio EOS); try another seed"
        )
    return result


def _decode_share(
    codec: CodecBatcher,
    tokens: np.ndarray,
    seed: int,
    frames: int,
    progress: Progress,
    should_abort: AbortCheck,
) -> np.ndarray:
    """Decode with progress covering the share after generating; the job shows the song's
    frames as done while they are decoded."""
    decoding = share_of(progress, GENERATE_SHARE, 1.0)

    def report(
        stage: str,
        fraction: float,
        frames_done: int | None = None,
        total: int | None = None,
        message: str = "",
    ) -> None:
        decoding(stage, fraction, frames, frames, message)

    report("decoding", 0.0)
    return decode_tokens(
        codec,
        tokens,
        seed=seed,
        steps=DECODE_STEPS,
        progress=report,
        should_abort=should_abort,
    )


def generate_song(
    engine: GenerationEngine,
    codec: CodecBatcher,
    request: GenerationRequest,
    progress: Progress,
    should_abort: AbortCheck,
) -> Song:
    """Tags + lyrics → tokens (batched engine) → audio (codec), with progress and abort.

    With `request.history` (an extension) the song is history + new frames, decoded whole.
    Raises RequestError (from the engine) for requests the model cannot take.
    """
    result = _generate_tokens(engine, request, progress, should_abort)
    tokens = result.tokens
    if request.history is not None:
        tokens = np.concatenate([request.history.astype(np.int32), tokens], axis=1)
    frames = tokens.shape[1]
    audio = _decode_share(codec, tokens, request.seed, frames, progress, should_abort)
    return Song(tokens, audio, result.finish_reason, request.seed)


def inpaint_song(
    engine: GenerationEngine,
    codec: CodecBatcher,
    parent_tokens: np.ndarray,
    parent_audio: np.ndarray,
    gap: Gap,
    request: GenerationRequest,
    progress: Progress,
    should_abort: AbortCheck,
) -> Song:
    """LM-guided repair of `gap`: exactly its frames are generated from the left context,
    spliced into the parent's tokens, a window with 8 s of context each side is decoded and
    crossfaded into the parent's audio; everything outside the gap is the parent's."""
    song_frames = parent_tokens.shape[1]
    if parent_audio.shape != (2, song_frames * SAMPLES_PER_FRAME):
        raise InputError(
            "source_job_id",
            f"the parent's audio has shape {list(parent_audio.shape)}, not "
            f"[2, {song_frames * SAMPLES_PER_FRAME}] for its {song_frames} frames",
        )
    history = parent_tokens[:, : gap.start] if gap.start else None
    fill = replace(request, history=history, duration_s=gap.frames * FRAME_S, stop_at_eos=False)
    new = _generate_tokens(engine, fill, progress, should_abort).tokens
    tokens = splice_tokens(parent_tokens, gap, new)
    lo, hi = decode_window(gap, song_frames)
    window = _decode_share(codec, tokens[:, lo:hi], request.seed, hi - lo, progress, should_abort)
    return Song(tokens, splice_audio(parent_audio, window, lo, gap), "length", request.seed)


def tokenize_audio(
    encoder: HeartCodecEncoder,
    audio: np.ndarray,
    sample_rate: int,
    progress: Progress,
    should_abort: AbortCheck,
) -> np.ndarray:
    """[channels, samples] audio → [8, T] int32 tokens."""
    tokens = encoder.tokenize(audio, sample_rate, on_progress=progress, should_abort=should_abort)
    return check_tokens(tokens, "upload_id")
