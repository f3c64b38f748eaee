"""Audio I/O: reading and validating uploads, writing FLAC/WAV/MP3, crossfades."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from shared.core.audio import (
    AudioError,
    AudioLimits,
    crossfade,
    encode_audio,
    format_for_path,
    overlap_add,
    probe_audio,
    read_audio,
    write_audio,
)
from shared.core.constants import SAMPLE_RATE


def _stereo(seconds: float = 0.5, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)])


def _wav_bytes(data: np.ndarray, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, data.T, SAMPLE_RATE, format="WAV", subtype=subtype)
    return buffer.getvalue()


@pytest.mark.parametrize(("suffix", "tolerance"), [(".flac", 1e-6), (".wav", 1e-4)])
def test_write_read_round_trip_48k_stereo(tmp_path: Path, suffix: str, tolerance: float) -> None:
    audio = _stereo()
    path = write_audio(tmp_path / f"song{suffix}", audio)
    back, rate = read_audio(path)
    assert rate == SAMPLE_RATE and back.dtype == np.float32
    assert back.shape == audio.shape
    np.testing.assert_allclose(back, audio, atol=tolerance)


def test_mp3_is_written_and_reads_back_as_48k_stereo(tmp_path: Path) -> None:
    audio = _stereo(1.0)
    back, rate = read_audio(write_audio(tmp_path / "song.mp3", audio))
    assert rate == SAMPLE_RATE and back.shape[0] == 2
    assert abs(back.shape[1] - audio.shape[1]) <= 1152  # one MP3 frame
    assert sf.info(str(tmp_path / "song.mp3")).format == "MP3"


def test_encoded_bytes_are_readable_and_out_of_range_samples_are_clipped() -> None:
    loud = _stereo() * 4
    back, _ = read_audio(encode_audio(loud, "flac"))
    assert np.abs(back).max() <= 1.0
    np.testing.assert_allclose(back, np.clip(loud, -1, 1), atol=1e-6)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(AudioError, match="unknown audio format 'ogg'"):
        format_for_path("song.ogg")
    with pytest.raises(AudioError, match="unknown audio format"):
        encode_audio(_stereo(), "aac")


def test_ogg_and_mono_inputs_are_read() -> None:
    buffer = io.BytesIO()
    sf.write(buffer, _stereo()[0], 44_100, format="OGG", subtype="VORBIS")
    audio, rate = read_audio(buffer.getvalue())
    assert rate == 44_100 and audio.shape[0] == 1 and audio.shape[1] > 0


def test_empty_file_is_refused() -> None:
    with pytest.raises(AudioError, match="upload.wav: not a readable audio file"):
        read_audio(b"", name="upload.wav")


def test_text_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp3"
    path.write_text("this is not audio\n" * 50)
    with pytest.raises(AudioError, match="not a readable audio file"):
        read_audio(path)


def test_truncated_flac_is_refused() -> None:
    data = encode_audio(_stereo(2.0), "flac")
    with pytest.raises(AudioError, match="not a readable audio file"):
        read_audio(data[: len(data) // 2])


def test_truncated_wav_is_refused() -> None:
    data = _wav_bytes(_stereo())
    with pytest.raises(AudioError, match="truncated"):
        read_audio(data[: len(data) // 2])


def test_truncated_mp3_is_refused() -> None:
    data = encode_audio(_stereo(2.0), "mp3")
    with pytest.raises(AudioError, match="truncated"):
        read_audio(data[: len(data) // 3])


def test_nan_samples_are_refused() -> None:
    audio = _stereo()
    audio[1, 100] = np.nan
    with pytest.raises(AudioError, match="NaN or infinite"):
        read_audio(_wav_bytes(audio, "FLOAT"))


def test_file_without_samples_is_refused() -> None:
    with pytest.raises(AudioError, match="no audio samples"):
        read_audio(_wav_bytes(np.zeros((2, 0))))


def test_duration_limit() -> None:
    data = _wav_bytes(_stereo(2.0))
    assert read_audio(data, max_seconds=2.5)[0].shape[1] == 2 * SAMPLE_RATE
    with pytest.raises(AudioError, match=r"2\.00 s is longer than the 1.5 s limit"):
        read_audio(data, max_seconds=1.5)


def test_crossfade_is_linear_over_the_overlap() -> None:
    first, second = np.ones((2, 1000)), np.zeros((2, 800))
    joined = crossfade(first, second, 300)
    assert joined.shape == (2, 1500)
    assert (joined[:, :700] == 1).all() and (joined[:, 1000:] == 0).all()
    np.testing.assert_allclose(joined[0, 700:1000], np.linspace(1, 0, 300), atol=1e-6)


def test_overlap_add_keeps_a_constant_signal_constant() -> None:
    segments = [np.full((2, n), 0.5) for n in (500, 400, 300)]
    joined = overlap_add(segments, 100)
    assert joined.shape == (2, 1000)
    np.testing.assert_allclose(joined, 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="shorter than the 100-sample overlap"):
        overlap_add([np.ones((2, 500)), np.ones((2, 50))], 100)


def test_module_imports_no_torch() -> None:
    code = "import sys, shared.core.audio; sys.exit('torch' in sys.modules)"
    root = Path(__file__).parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root)})
    assert done.returncode == 0


# ----- probing uploads block by block -------------------------------------------------------


def _flac_bytes(data: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, data.T, rate, format="FLAC")
    return buffer.getvalue()


def test_probe_agrees_with_read_audio() -> None:
    data = _flac_bytes(_stereo(1.25))
    info = probe_audio(data, AudioLimits(max_seconds=2), "take")
    audio, rate = read_audio(data)
    assert (info.duration_s, info.sample_rate, info.channels) == (1.25, rate, audio.shape[0])


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (AudioLimits(max_channels=1), "take: 2 channels; at most 1 allowed"),
        (AudioLimits(max_sample_rate=44_100), "sample rate 48000 Hz; at most 44100 Hz"),
        (AudioLimits(max_seconds=0.5), "1.25 s is longer than the 0.5 s limit"),
        (AudioLimits(max_decoded_bytes=1000), "decodes to 480000 bytes; at most 1000"),
    ],
)
def test_probe_refuses_from_the_header(limits: AudioLimits, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        probe_audio(_flac_bytes(_stereo(1.25)), limits, "take")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_wav_bytes(np.full((2, 100), np.nan, np.float32), "FLOAT"), "NaN"),
        (_wav_bytes(_stereo())[:30_000], "truncated"),
        (b"not audio", "not a readable audio file"),
    ],
)
def test_probe_refuses_what_read_audio_refuses(data: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        probe_audio(data, AudioLimits(), "take")
    with pytest.raises(AudioError, match=message):
        read_audio(data)
