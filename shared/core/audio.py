"""Audio files in and out: reading and validating uploads, writing results, crossfades.

The gateway validates uploads with this module, so it imports no torch (resampling lives in
`shared.ml.resample`). Limits are checked from the file's header before anything is decoded,
and uploads are probed by decoding in small blocks, so a small file that decodes to gigabytes
(many channels, a high rate, hours of silence) costs neither memory nor much time.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf

from shared.core.config import Settings
from shared.core.constants import SAMPLE_RATE

DEFAULT_FORMAT = "flac"
# Our format name → (libsndfile container, sample encoding).
FORMATS: dict[str, tuple[str, str]] = {
    "flac": ("FLAC", "PCM_24"),
    "wav": ("WAV", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}

AudioSource = str | Path | bytes | BinaryIO

# libsndfile notes a WAV/AIFF whose header promises more data than the file holds as
# "data : 192000 (should be 95978)" in its log; streaming writers that do not know the size
# put these placeholder values there instead, which is not truncation.
_DECLARED_VS_ACTUAL = re.compile(r"data\s*:\s*(\d+)\s*\(should be (\d+)\)")
_UNKNOWN_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF}
# Compressed formats (MP3 without a length header) only estimate their length up front, so a
# file counts as truncated when clearly less than the announced length decodes.
_DECODED_FRACTION = 0.99
_BLOCK_FRAMES = 65_536  # frames decoded at a time when probing (2 MiB at 8 channels)
_FLOAT32_BYTES = 4


class AudioError(ValueError):
    """An audio file cannot be used: unreadable, empty, non-finite or over a limit."""


@dataclass(frozen=True)
class AudioLimits:
    """What an audio file may declare in its header (None: no limit)."""

    max_seconds: float | None = None
    max_channels: int | None = None
    max_sample_rate: int | None = None
    max_decoded_bytes: int | None = None  # frames x channels as float32

    @classmethod
    def for_uploads(cls, settings: Settings) -> AudioLimits:
        return cls(
            max_seconds=settings.max_upload_seconds,
            max_channels=settings.max_upload_channels,
            max_sample_rate=settings.max_upload_sample_rate,
            max_decoded_bytes=settings.max_decoded_bytes,
        )


@dataclass(frozen=True)
class AudioInfo:
    duration_s: float
    sample_rate: int
    channels: int


def _as_file(source: AudioSource) -> str | BinaryIO:
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if isinstance(source, Path):
        return str(source)
    return source


def _rewind(file: str | BinaryIO) -> None:
    if not isinstance(file, str):
        file.seek(0)


def _truncated_header(extra_info: str) -> bool:
    match = _DECLARED_VS_ACTUAL.search(extra_info)
    if match is None:
        return False
    declared, actual = int(match.group(1)), int(match.group(2))
    return declared not in _UNKNOWN_SIZES and declared > actual


def _check_header(info: Any, limits: AudioLimits, name: str) -> None:
    """Refuse from the header alone (`info`: soundfile.info's answer) what would be refused,
    or be too big, once decoded."""
    if _truncated_header(info.extra_info):
        raise AudioError(f"{name}: file is truncated (its header promises more data)")
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(
            f"{name}: header declares {info.channels} channels at {info.samplerate} Hz"
        )
    if limits.max_channels is not None and info.channels > limits.max_channels:
        raise AudioError(
            f"{name}: {info.channels} channels; at most {limits.max_channels} allowed "
            "(HEARTCLUSTER_MAX_UPLOAD_CHANNELS)"
        )
    if limits.max_sample_rate is not None and info.samplerate > limits.max_sample_rate:
        raise AudioError(
            f"{name}: sample rate {info.samplerate} Hz; at most {limits.max_sample_rate} Hz "
            "allowed (HEARTCLUSTER_MAX_UPLOAD_SAMPLE_RATE)"
        )
    _check_length(info.frames, info.samplerate, limits, name)
    decoded = info.frames * info.channels * _FLOAT32_BYTES
    if limits.max_decoded_bytes is not None and decoded > limits.max_decoded_bytes:
        raise AudioError(
            f"{name}: decodes to {decoded} bytes; at most {limits.max_decoded_bytes} allowed "
            "(HEARTCLUSTER_MAX_DECODED_BYTES)"
        )


def _check_length(frames: int, rate: int, limits: AudioLimits, name: str) -> None:
    if limits.max_seconds is not None and frames > limits.max_seconds * rate:
        raise AudioError(
            f"{name}: {frames / rate:.2f} s is longer than the {limits.max_seconds:g} s limit"
        )


def _check_decoded(decoded: int, declared: int, name: str) -> None:
    if decoded == 0:
        raise AudioError(f"{name}: file holds no audio samples")
    if decoded < _DECODED_FRACTION * declared:
        raise AudioError(f"{name}: file is truncated ({decoded} of {declared} samples decodable)")


def probe_audio(source: AudioSource, limits: AudioLimits, name: str = "audio") -> AudioInfo:
    """Check an audio file as `read_audio` would, decoding it block by block instead of whole:
    the header against `limits` first, then every block (finite samples, length so far)."""
    file = _as_file(source)
    decoded = 0
    try:
        info = sf.info(file)
        _check_header(info, limits, name)
        _rewind(file)
        with sf.SoundFile(file) as sound:
            for block in sound.blocks(_BLOCK_FRAMES, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    raise AudioError(f"{name}: audio contains NaN or infinite samples")
                decoded += block.shape[0]
                _check_length(decoded, info.samplerate, limits, name)
    except sf.LibsndfileError as error:
        raise AudioError(f"{name}: not a readable audio file ({error.error_string})") from None
    except (RuntimeError, EOFError) as error:
        raise AudioError(f"{name}: not a readable audio file ({error})") from None
    _check_decoded(decoded, info.frames, name)
    return AudioInfo(decoded / info.samplerate, int(info.samplerate), int(info.channels))


def read_audio(
    source: AudioSource, max_seconds: float | None = None, name: str = "audio"
) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG/MP3 (anything libsndfile reads) → (float32 [channels, samples], rate).

    Raises AudioError naming `name` when the data is not decodable audio, is truncated, holds
    no samples or non-finite samples, or lasts longer than `max_seconds` (checked from the
    header before decoding, and again after).
    """
    file = _as_file(source)
    limits = AudioLimits(max_seconds=max_seconds)
    try:
        info = sf.info(file)
        _check_header(info, limits, name)
        _rewind(file)
        data, rate = sf.read(file, dtype="float32", always_2d=True)
    except sf.LibsndfileError as error:
        raise AudioError(f"{name}: not a readable audio file ({error.error_string})") from None
    except (RuntimeError, EOFError) as error:
        raise AudioError(f"{name}: not a readable audio file ({error})") from None
    _check_decoded(data.shape[0], info.frames, name)
    if not np.isfinite(data).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    _check_length(data.shape[0], rate, limits, name)
    return np.ascontiguousarray(data.T), int(rate)


def format_for_path(path: str | Path) -> str:
    """The output format named by a file's suffix (.flac, .wav, .mp3)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise AudioError(f"{path}: unknown audio format {suffix!r}; use one of {sorted(FORMATS)}")
    return suffix


def _check_writable(audio: np.ndarray, fmt: str) -> np.ndarray:
    if fmt not in FORMATS:
        raise AudioError(f"unknown audio format {fmt!r}; use one of {sorted(FORMATS)}")
    if audio.ndim != 2 or audio.shape[1] == 0:
        raise AudioError(f"audio must be [channels, samples] with samples, got {audio.shape}")
    if not np.isfinite(audio).all():
        raise AudioError("audio to write contains NaN or infinite samples")
    # Integer and MP3 encodings wrap or distort beyond full scale: clip instead.
    return np.clip(audio, -1.0, 1.0).T.astype(np.float32)


def encode_audio(audio: np.ndarray, fmt: str = DEFAULT_FORMAT, rate: int = SAMPLE_RATE) -> bytes:
    """[channels, samples] float audio → the bytes of a FLAC (default), WAV or MP3 file."""
    frames = _check_writable(audio, fmt)
    container, subtype = FORMATS[fmt]
    if subtype not in sf.available_subtypes(container):
        raise AudioError(
            f"this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}; "
            "MP3 needs libsndfile >= 1.1 built with LAME and mpg123"
        )
    buffer = io.BytesIO()
    sf.write(buffer, frames, rate, format=container, subtype=subtype)
    return buffer.getvalue()


def write_audio(
    path: str | Path, audio: np.ndarray, rate: int = SAMPLE_RATE, fmt: str | None = None
) -> Path:
    """Write [channels, samples] audio to `path`; the format comes from the suffix if not given."""
    path = Path(path)
    data = encode_audio(audio, fmt or format_for_path(path), rate)
    path.write_bytes(data)
    return path


def overlap_add(segments: Sequence[np.ndarray], overlap: int) -> np.ndarray:
    """Join [channels, samples] segments, each overlapping the previous by `overlap` samples.

    Inside an overlap the earlier segment fades out and the later one fades in linearly
    (weights 1 → 0 and 0 → 1, both ends included), so a constant signal stays constant.
    """
    if not segments:
        raise ValueError("overlap_add needs at least one segment")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    for i, segment in enumerate(segments[1:], start=1):
        if segment.shape[-1] < overlap or segments[i - 1].shape[-1] < overlap:
            raise ValueError(f"segment {i} is shorter than the {overlap}-sample overlap")
    total = sum(s.shape[-1] for s in segments) - overlap * (len(segments) - 1)
    out = np.zeros((*segments[0].shape[:-1], total), dtype=np.float32)
    fade_in = np.linspace(0.0, 1.0, overlap, dtype=np.float32)
    start = 0
    for i, segment in enumerate(segments):
        segment = segment.astype(np.float32, copy=True)
        if i > 0 and overlap:
            segment[..., :overlap] *= fade_in
            out[..., start : start + overlap] *= 1.0 - fade_in
        out[..., start : start + segment.shape[-1]] += segment
        start += segment.shape[-1] - overlap
    return out


def crossfade(first: np.ndarray, second: np.ndarray, overlap: int) -> np.ndarray:
    """`first` then `second`, with a linear crossfade over their `overlap` shared samples."""
    return overlap_add([first, second], overlap)
