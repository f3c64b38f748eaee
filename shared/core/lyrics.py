"""Transcripts of sung lyrics and their karaoke exports (LRC, SRT).

Torch-free, so the gateway can read a `transcript.json` artifact and render the exports itself.
Times are seconds from the start of the song; the exports clamp whatever they are given
(negative, non-finite, end before start) so their output is always well-formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    word: str


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    # None when the transcriber produced no word timings (not the same as "no words").
    words: list[Word] | None = None


@dataclass
class Transcript:
    text: str
    language: str | None
    duration_s: float
    segments: list[Segment] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The `transcript.json` document; `words` appears only on segments that have timings."""
        segments = []
        for s in self.segments:
            item: dict[str, Any] = {"start": s.start, "end": s.end, "text": s.text}
            if s.words is not None:
                item["words"] = [{"start": w.start, "end": w.end, "word": w.word} for w in s.words]
            segments.append(item)
        return {
            "text": self.text,
            "language": self.language,
            "duration_s": self.duration_s,
            "segments": segments,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Transcript:
        """Read a `transcript.json` document back; KeyError/TypeError name a malformed one."""
        segments = [
            Segment(
                start=float(s["start"]),
                end=float(s["end"]),
                text=str(s["text"]),
                words=None
                if s.get("words") is None
                else [Word(float(w["start"]), float(w["end"]), str(w["word"])) for w in s["words"]],
            )
            for s in data["segments"]
        ]
        return cls(
            text=str(data["text"]),
            language=data.get("language"),
            duration_s=float(data["duration_s"]),
            segments=segments,
        )


def _seconds(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


def _one_line(text: str) -> str:
    """Control characters and line breaks would break a cue or an LRC line: make them spaces."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _cues(transcript: Transcript) -> list[tuple[float, float, str]]:
    """(start, end, one-line text) per non-empty segment, sorted by start, with end >= start."""
    cues = []
    for segment in transcript.segments:
        text = _one_line(segment.text)
        if not text:
            continue
        start = _seconds(segment.start)
        cues.append((start, max(start, _seconds(segment.end)), text))
    return sorted(cues, key=lambda cue: cue[0])


def _lrc_time(seconds: float) -> str:
    centis = round(seconds * 100)
    minutes, centis = divmod(centis, 6000)
    return f"{minutes:02d}:{centis // 100:02d}.{centis % 100:02d}"


def _srt_time(seconds: float) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    return f"{hours:02d}:{minutes:02d}:{millis // 1000:02d},{millis % 1000:03d}"


def to_lrc(transcript: Transcript) -> str:
    """One `[mm:ss.xx] text` line per segment (LRC lyrics); empty for an empty transcript."""
    return "".join(f"[{_lrc_time(start)}] {text}\n" for start, _, text in _cues(transcript))


def to_srt(transcript: Transcript) -> str:
    """Numbered SRT cues `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each."""
    return "".join(
        f"{i}\n{_srt_time(start)} --> {_srt_time(end)}\n{text}\n\n"
        for i, (start, end, text) in enumerate(_cues(transcript), start=1)
    )
