"""The frame grid and token space: derived values agree, and no module restates them."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from shared.core import constants
from shared.core.constants import (
    AUDIO_EOS_ID,
    AUDIO_VOCAB,
    CODEC_CODES,
    CODEC_SAMPLE_RATE,
    CODEC_SAMPLES_PER_FRAME,
    CONTEXT_POSITIONS,
    FRAME_MS,
    FRAME_S,
    FRAMES_PER_SECOND,
    MIN_PROMPT_ROWS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    WHISPER_SAMPLE_RATE,
    frames_for_seconds,
)

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("api", "workers", "shared")
HOME = Path(constants.__file__).resolve()
# Values only constants.py may spell out: a restatement elsewhere drifts when the grid changes.
# (80 itself is too common, e.g. Whisper's 80 mel bins; FRAME_S and the rates cover its uses.)
RESTATED = {8192, 8193, 8197, 12.5, 3840, 1920, 0.08, 48_000, 24_000, 16_000}
# A number that merely equals one of them (an MLP width) carries this comment on its line.
PRAGMA = re.compile(r"#\s*unrelated-literal:\s*\S")


def test_the_grid_agrees_with_itself() -> None:
    assert FRAMES_PER_SECOND * FRAME_S == 1
    assert FRAME_S * 1000 == FRAME_MS
    assert SAMPLES_PER_FRAME == SAMPLE_RATE * FRAME_S
    assert CODEC_SAMPLES_PER_FRAME == CODEC_SAMPLE_RATE * FRAME_S
    # whole samples per frame at every rate the grid is sampled at
    for rate in (SAMPLE_RATE, CODEC_SAMPLE_RATE, WHISPER_SAMPLE_RATE):
        assert rate * FRAME_MS % 1000 == 0, rate


def test_the_values_the_checkpoints_fix() -> None:
    assert (FRAME_MS, FRAMES_PER_SECOND) == (80, 12.5)
    assert (SAMPLES_PER_FRAME, CODEC_SAMPLES_PER_FRAME) == (3840, 1920)
    assert (SAMPLE_RATE, CODEC_SAMPLE_RATE, WHISPER_SAMPLE_RATE) == (48_000, 24_000, 16_000)
    assert (CODEC_CODES, AUDIO_EOS_ID, AUDIO_VOCAB) == (8192, 8193, 8197)
    assert CONTEXT_POSITIONS == 8192


def test_token_space_and_context_are_ordered() -> None:
    assert CODEC_CODES < AUDIO_EOS_ID < AUDIO_VOCAB
    assert 0 < MIN_PROMPT_ROWS < CONTEXT_POSITIONS


@pytest.mark.parametrize(
    ("seconds", "frames"),
    [(30.0, 375), (0.079, 0), (0.08, 1), (0.159, 1), (0.16, 2), (29.76, 372), (0.0, 0)],
)
def test_frames_for_seconds(seconds: float, frames: int) -> None:
    assert frames_for_seconds(seconds) == frames


def restated_literals(source: str) -> list[tuple[int, object]]:
    """(line, value) of each number in code (not comments or docstrings) that `RESTATED` holds,
    numbers inside f-string fields included; lines with the pragma are skipped."""
    excused = {
        token.start[0]
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT and PRAGMA.search(token.string)
    }
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
        and node.value in RESTATED
        and node.lineno not in excused
    )


def bound_names(source: str) -> list[tuple[int, str]]:
    """(line, name) of each name an assignment, loop, def or class in `source` binds."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.append((node.lineno, node.name))
    return sorted(found)


def _sources() -> list[tuple[str, str]]:
    files = sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py"))
    assert files, f"no sources found under {ROOT}"
    return [
        (path.relative_to(ROOT).as_posix(), path.read_text())
        for path in files
        if path.resolve() != HOME
    ]


def test_scanner_sees_code_but_not_comments_or_docstrings() -> None:
    source = '''"""A docstring may say 8192 and 12.5 Hz."""
X = 8_192  # flagged
# a comment may say 3840
Y = f"{n / 12.5:.2f} s at 48 kHz"  # a number inside an f-string field is code
Z = -1920.0
W = 8192  # unrelated-literal: an MLP width
V = 8192  # unrelated-literal:
'''
    assert restated_literals(source) == [(2, 8192), (4, 12.5), (5, 1920.0), (7, 8192)]
    rebinding = "FRAME_MS = 80\nfor rate in (1,):\n    x: int = rate\ndef frames_for_seconds(): ..."
    assert bound_names(rebinding) == [
        (1, "FRAME_MS"),
        (2, "rate"),
        (3, "x"),
        (4, "frames_for_seconds"),
    ]


def test_no_module_restates_a_constant_value() -> None:
    found = [
        f"{path}:{line}: {value!r}"
        for path, source in _sources()
        for line, value in restated_literals(source)
    ]
    assert not found, (
        "import these from shared.core.constants instead of restating them "
        "(or mark a number that merely equals one with '# unrelated-literal: why'):\n"
        + "\n".join(found)
    )


def test_no_module_redefines_a_constant_name() -> None:
    names = {name for _, name in bound_names(HOME.read_text())}
    assert {"FRAME_MS", "SAMPLE_RATE", "CODEC_CODES", "frames_for_seconds"} <= names
    found = [
        f"{path}:{line}: {name}"
        for path, source in _sources()
        for line, name in bound_names(source)
        if name in names
    ]
    assert not found, (
        "these names belong to shared.core.constants; import them (or pick a distinct name "
        "for a different quantity):\n" + "\n".join(found)
    )
