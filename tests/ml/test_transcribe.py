"""Lyrics transcription: chunking, batching, timing, exports and the CLI, with a tiny Whisper.

The tiny transcriber has random weights, so its words are gibberish: the tests check structure,
times and plumbing. A stand-in `generate` pins down exactly what goes in and comes out.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from api.client.cli import main
from shared.core.lyrics import Segment, Transcript, Word, to_lrc, to_srt
from shared.core.progress import Aborted
from shared.ml.models.checkpoint import CheckpointError
from shared.ml.transcribe import (
    TRANSCRIBER_FOLDER,
    Transcriber,
    load_transcriber,
)

LRC_LINE = re.compile(r"^\[(\d{2,}):([0-5]\d)\.(\d{2})\] \S.*$")
SRT_TIME = r"(\d{2}):([0-5]\d):([0-5]\d),(\d{3})"
SRT_TIMES = re.compile(rf"^{SRT_TIME} --> {SRT_TIME}$")


@pytest.fixture(scope="module")
def transcriber(tiny_model_dir: Path) -> Transcriber:
    # Few new tokens keep the random model (which never says "end") fast.
    return load_transcriber(tiny_model_dir, device="cpu", batch_size=2, max_new_tokens=16)


def _noise(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((channels, round(seconds * rate))) * 0.1).astype(np.float32)


class FakeGenerate:
    """Stands in for `model.generate`: records each batch and returns two segments per chunk,
    one at 1.0–2.5 s and one at 10.0–12.0 s of the chunk (which falls in the padding of a
    chunk shorter than 10 s)."""

    def __init__(self, transcriber: Transcriber) -> None:
        self.tokens = torch.tensor(
            transcriber.processor.tokenizer.encode("hello", add_special_tokens=False)
        )
        self.batches: list[tuple[int, ...]] = []
        self.languages: list[Any] = []

    def __call__(self, features: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        self.batches.append(tuple(features.shape))
        self.languages.append(kwargs["language"])
        segments = [self._segment(1.0, 2.5), self._segment(10.0, 12.0)]
        return {"segments": [segments for _ in range(features.shape[0])]}

    def _segment(self, start: float, end: float) -> dict[str, Any]:
        times = torch.linspace(start, end, len(self.tokens), dtype=torch.float64)
        return {
            "start": torch.tensor(start, dtype=torch.float64),
            "end": torch.tensor(end, dtype=torch.float64),
            "tokens": self.tokens,
            "token_timestamps": times,
        }


@pytest.fixture
def fake(transcriber: Transcriber, monkeypatch: pytest.MonkeyPatch) -> FakeGenerate:
    generate = FakeGenerate(transcriber)
    monkeypatch.setattr(transcriber.model, "generate", generate)
    return generate


def _check_schema(data: dict[str, Any], duration: float) -> None:
    assert set(data) == {"text", "language", "duration_s", "segments"}
    assert data["duration_s"] == pytest.approx(duration)
    for segment in data["segments"]:
        assert 0.0 <= segment["start"] <= segment["end"] <= duration
        assert isinstance(segment["text"], str) and segment["text"]
        for word in segment.get("words", []):
            assert segment["start"] <= word["start"] <= word["end"] <= segment["end"]


def test_long_stereo_audio_end_to_end(transcriber: Transcriber) -> None:
    """65 s of 44.1 kHz stereo: three chunks in two batches, a well-formed transcript."""
    progress: list[tuple[str, float]] = []
    torch.manual_seed(0)  # temperature fallback samples
    transcript = transcriber.transcribe(
        _noise(65, 44_100, 2), 44_100, on_progress=lambda *report: progress.append(report)
    )
    assert progress == [("transcribing", 2 / 3), ("transcribing", 3 / 3)]
    data = json.loads(json.dumps(transcript.to_json()))
    _check_schema(data, 65.0)
    assert data["segments"], "the random model always emits some tokens"
    assert transcript.text == " ".join(s["text"] for s in data["segments"])
    assert transcript.language in transcriber.id_to_language.values()
    assert all("words" in s for s in data["segments"])  # the tiny config has alignment heads
    assert Transcript.from_json(data) == transcript


def test_same_audio_same_transcript_whatever_the_global_rng(transcriber: Transcriber) -> None:
    """The temperature fallback draws from the call's own seed, so a retried job writes the
    same files; another seed may sample differently."""
    audio = _noise(3, 48_000, 2, seed=5)
    torch.manual_seed(1)
    first = transcriber.transcribe(audio, 48_000)
    torch.manual_seed(2)
    torch.rand(100)
    again = transcriber.transcribe(audio, 48_000)
    assert first == again
    before = torch.get_rng_state()
    transcriber.transcribe(audio, 48_000, seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is untouched


def test_chunks_are_batched_and_offset(transcriber: Transcriber, fake: FakeGenerate) -> None:
    transcript = transcriber.transcribe(
        _noise(65, 16_000, 1), 16_000, language="english", word_timestamps=False
    )
    assert fake.batches == [(2, 80, 3000), (1, 80, 3000)]
    assert fake.languages == [["en", "en"], ["en"]]
    assert transcript.language == "en"
    # Chunks start at 0, 30 and 60 s; the 5 s last chunk drops the segment in its padding.
    times = [(s.start, s.end) for s in transcript.segments]
    assert times == [(1.0, 2.5), (10.0, 12.0), (31.0, 32.5), (40.0, 42.0), (61.0, 62.5)]
    assert all(s.text == "hello" and s.words is None for s in transcript.segments)


def test_segment_end_is_clipped_to_the_audio(transcriber: Transcriber, fake: FakeGenerate) -> None:
    """An 11 s clip at 8 kHz: resampled, one chunk, the late segment ends at the audio's end;
    word times stay inside their (clipped) segment."""
    transcript = transcriber.transcribe(_noise(11, 8_000, 1), 8_000, language="en")
    assert transcript.duration_s == pytest.approx(11.0)
    assert [(s.start, s.end) for s in transcript.segments] == [(1.0, 2.5), (10.0, 11.0)]
    assert fake.batches == [(1, 80, 3000)]
    late = transcript.segments[1]
    assert late.words and "".join(w.word for w in late.words) == "hello"
    assert late.words[0].start == 10.0 and late.words[-1].end == 11.0


def test_abort_between_batches(transcriber: Transcriber, fake: FakeGenerate) -> None:
    progress: list[tuple[str, float]] = []
    with pytest.raises(Aborted, match="after 2 of 3 chunks"):
        transcriber.transcribe(
            _noise(65, 16_000, 1),
            16_000,
            language="en",
            on_progress=lambda *report: progress.append(report),
            should_abort=lambda: bool(progress),
        )
    assert progress == [("transcribing", 2 / 3)] and len(fake.batches) == 1


@pytest.mark.parametrize(
    ("audio", "rate", "message"),
    [
        (np.zeros(16_000, dtype=np.float32), 16_000, "channels, samples"),
        (np.zeros((1, 0), dtype=np.float32), 16_000, "channels, samples"),
        (np.full((1, 100), np.nan, dtype=np.float32), 16_000, "NaN"),
        (np.zeros((1, 100), dtype=np.float32), 0, "sample_rate"),
    ],
)
def test_bad_audio_is_refused(
    transcriber: Transcriber, audio: np.ndarray, rate: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        transcriber.transcribe(audio, rate)


def test_unknown_language_and_missing_word_timings(
    transcriber: Transcriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="'klingon' is not one this model knows"):
        transcriber.transcribe(_noise(1, 16_000, 1), 16_000, language="klingon")
    monkeypatch.setattr(transcriber, "has_word_timings", False)
    with pytest.raises(ValueError, match="alignment_heads"):
        transcriber.transcribe(_noise(1, 16_000, 1), 16_000, word_timestamps=True)


def test_missing_or_broken_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"not found: .*{TRANSCRIBER_FOLDER}"):
        load_transcriber(tmp_path, device="cpu")
    (tmp_path / TRANSCRIBER_FOLDER).mkdir()
    with pytest.raises(CheckpointError, match=f"{TRANSCRIBER_FOLDER}: not a usable"):
        load_transcriber(tmp_path, device="cpu")


def test_checkpoint_without_timestamp_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / TRANSCRIBER_FOLDER
    shutil.copytree(tiny_model_dir / TRANSCRIBER_FOLDER, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    del config["no_timestamps_token_id"]
    (copy / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lacks no_timestamps_token_id"):
        load_transcriber(tmp_path, device="cpu")


def test_lyrics_module_does_not_import_torch() -> None:
    """The gateway renders exports from transcript.json and must never load torch."""
    code = "import sys, shared.core.lyrics; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def _lrc_seconds(line: str) -> float:
    match = LRC_LINE.match(line)
    assert match, f"bad LRC line {line!r}"
    return int(match[1]) * 60 + int(match[2]) + int(match[3]) / 100


def _srt_cues(text: str) -> list[tuple[float, float, str]]:
    assert text == "" or text.endswith("\n\n")
    cues = []
    for number, block in enumerate(text.split("\n\n")[:-1], start=1):
        lines = block.split("\n")
        assert len(lines) == 3 and lines[0] == str(number), block
        match = SRT_TIMES.match(lines[1])
        assert match, f"bad SRT times {lines[1]!r}"
        parts = [int(g) for g in match.groups()]
        start = parts[0] * 3600 + parts[1] * 60 + parts[2] + parts[3] / 1000
        end = parts[4] * 3600 + parts[5] * 60 + parts[6] + parts[7] / 1000
        assert lines[2].strip() == lines[2] and lines[2]
        cues.append((start, end, lines[2]))
    return cues


ODD = Transcript(
    text="",
    language=None,
    duration_s=4000.0,
    segments=[
        Segment(3725.5, 3726.25, "past the hour"),
        Segment(-1.0, 2.0, "negative start"),
        Segment(5.0, 4.0, "ends before it starts"),
        Segment(math.nan, math.inf, "not finite"),
        Segment(59.999, 61.0, "rounds up to a minute"),
        Segment(7.0, 8.0, "two\nlines\x00 and a control"),
        Segment(9.0, 10.0, "   "),
    ],
)


def test_lrc_and_srt_are_well_formed() -> None:
    lrc = to_lrc(ODD).splitlines()
    starts = [_lrc_seconds(line) for line in lrc]
    assert starts == sorted(starts) and len(lrc) == 6  # the blank segment is left out
    assert lrc[-2:] == ["[01:00.00] rounds up to a minute", "[62:05.50] past the hour"]
    assert "[00:07.00] two lines and a control" in lrc

    cues = _srt_cues(to_srt(ODD))
    assert [c[0] for c in cues] == sorted(c[0] for c in cues) and len(cues) == 6
    assert all(0.0 <= start <= end for start, end, _ in cues)
    assert cues[:2] == [(0.0, 2.0, "negative start"), (0.0, 0.0, "not finite")]
    assert (5.0, 5.0, "ends before it starts") in cues
    assert cues[-1] == (3725.5, 3726.25, "past the hour")
    assert to_srt(ODD).splitlines()[-2] == "past the hour"


def test_empty_transcript_exports() -> None:
    empty = Transcript(text="", language=None, duration_s=0.0)
    assert to_lrc(empty) == "" and to_srt(empty) == ""
    assert Transcript.from_json(empty.to_json()) == empty


def test_words_round_trip_through_json() -> None:
    transcript = Transcript(
        "hi you",
        "en",
        3.0,
        [Segment(0.5, 1.5, "hi you", [Word(0.5, 1.0, "hi"), Word(1.0, 1.5, "you")])],
    )
    data = json.loads(json.dumps(transcript.to_json()))
    assert data["segments"][0]["words"][1] == {"start": 1.0, "end": 1.5, "word": "you"}
    assert Transcript.from_json(data) == transcript


def test_cli_writes_transcript_lrc_and_srt(tiny_model_dir: Path, tmp_path: Path) -> None:
    song = tmp_path / "song.flac"
    sf.write(song, _noise(3, 48_000, 2).T, 48_000)
    out, lrc, srt = tmp_path / "t.json", tmp_path / "t.lrc", tmp_path / "t.srt"
    args = ["transcribe", str(song), "--out", str(out), "--lrc", str(lrc), "--srt", str(srt)]
    options = ["--model-dir", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "16"]
    torch.manual_seed(0)
    assert main([*args, *options]) == 0
    data = json.loads(out.read_text())
    _check_schema(data, 3.0)
    assert data["segments"], "the tiny model always writes some text"
    # Gibberish may be only control characters, which the exports leave out.
    lrc_starts = [_lrc_seconds(line) for line in lrc.read_text().splitlines()]
    srt_starts = [cue[0] for cue in _srt_cues(srt.read_text())]
    assert lrc_starts == sorted(lrc_starts) and len(lrc_starts) <= len(data["segments"])
    assert srt_starts == pytest.approx(lrc_starts, abs=0.005)


def test_cli_refuses_non_audio_and_a_missing_model(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "notes.flac"
    bad.write_text("these are lyrics, not audio")
    out = tmp_path / "t.json"
    assert (
        main(["transcribe", str(bad), "--out", str(out), "--model-dir", str(tiny_model_dir)]) == 2
    )
    assert f"{bad}: not a readable audio file" in capsys.readouterr().err
    assert not out.exists()

    song = tmp_path / "song.wav"
    sf.write(song, _noise(1, 16_000, 1).T, 16_000)
    assert main(["transcribe", str(song), "--out", str(out), "--model-dir", str(tmp_path)]) == 2
    assert f"not found: {tmp_path / TRANSCRIBER_FOLDER}" in capsys.readouterr().err
