"""One progress callback and one abort exception for every long step (torch-free).

The engine, the codec's decoder and encoder, the transcriber, the pipelines over them and the
worker's progress reporter all speak `Progress` and raise `Aborted`, so nothing translates one
step's callback or exception into another's. A step reports the fraction of its own work; a
caller that runs it as part of something bigger hands it `share_of(progress, start, end)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

AbortCheck = Callable[[], bool]


class Aborted(Exception):
    """The caller's abort check said stop; nothing the step produced should be kept."""


class Progress(Protocol):
    def __call__(
        self,
        stage: str,
        fraction: float,
        frames_done: int | None = None,
        frames_total: int | None = None,
        message: str = "",
    ) -> None:
        """`fraction` (0–1) of the work is done; `stage` names what runs now (generating,
        decoding, ...); steps that work in song frames (or a fine-tune's optimizer steps) also
        say how many of them are done; `message` is a line for people (a fine-tune's loss)."""


def share_of(progress: Progress, start: float, end: float) -> Progress:
    """`progress` as seen by a sub-step that covers [start, end] of it: the sub-step reports
    its own 0–1 and the parent sees start + (end - start) · fraction."""
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"a share must satisfy 0 <= start <= end <= 1, got [{start}, {end}]")

    def report(
        stage: str,
        fraction: float,
        frames_done: int | None = None,
        frames_total: int | None = None,
        message: str = "",
    ) -> None:
        progress(
            stage, start + (end - start) * fraction, frames_done, frames_total, message=message
        )

    return report


class Bar(Protocol):
    """What percent_bar needs of a progress bar (tqdm's `n` and `update`)."""

    n: float

    def update(self, n: float) -> object: ...


def percent_bar(bar: Bar) -> Progress:
    """Progress drawn on a 0–100 bar (e.g. tqdm(total=100)) for one-shot command-line runs."""

    def report(
        stage: str,
        fraction: float,
        frames_done: int | None = None,
        frames_total: int | None = None,
        message: str = "",
    ) -> None:
        bar.update(round(fraction * 100) - bar.n)

    return report


def check_abort(should_abort: AbortCheck | None, where: str) -> None:
    """Raise Aborted (saying how far the step got, `where`) when the check says stop."""
    if should_abort is not None and should_abort():
        raise Aborted(where)
