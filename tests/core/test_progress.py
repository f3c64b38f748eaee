"""The one progress type: shares of a parent progress, the CLI bar, the abort check."""

from __future__ import annotations

import pytest

from shared.core.progress import Aborted, check_abort, percent_bar, share_of

Report = tuple[str, float, int | None, int | None]


class Recorder:
    def __init__(self) -> None:
        self.reports: list[Report] = []
        self.messages: list[str] = []

    def __call__(
        self,
        stage: str,
        fraction: float,
        frames_done: int | None = None,
        frames_total: int | None = None,
        message: str = "",
    ) -> None:
        self.reports.append((stage, fraction, frames_done, frames_total))
        self.messages.append(message)


def test_a_share_maps_the_sub_step_onto_its_part_of_the_parent() -> None:
    parent = Recorder()
    decoding = share_of(parent, 0.8, 1.0)
    decoding("decoding", 0.0, 12, 12)
    decoding("decoding", 0.5)
    decoding("decoding", 1.0)
    assert parent.reports == [
        ("decoding", 0.8, 12, 12),
        ("decoding", pytest.approx(0.9), None, None),
        ("decoding", 1.0, None, None),
    ]


def test_a_share_passes_the_message_on() -> None:
    parent = Recorder()
    share_of(share_of(parent, 0.0, 0.5), 0.5, 1.0)("training", 0.5, 3, 10, message="loss 1.0")
    assert parent.reports == [("training", pytest.approx(0.375), 3, 10)]
    assert parent.messages == ["loss 1.0"]


def test_shares_nest() -> None:
    """A job's pipeline gets 95 %, generating 80 % of that: half of generating is 38 %."""
    job = Recorder()
    generating = share_of(share_of(job, 0.0, 0.95), 0.0, 0.8)
    generating("generating", 0.5, 25, 50)
    assert job.reports == [("generating", pytest.approx(0.38), 25, 50)]


@pytest.mark.parametrize(("start", "end"), [(-0.1, 0.5), (0.6, 0.5), (0.5, 1.2)])
def test_a_share_outside_zero_to_one_is_refused(start: float, end: float) -> None:
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        share_of(Recorder(), start, end)


def test_percent_bar_moves_a_bar_to_the_fraction() -> None:
    class Bar:
        n = 0.0

        def update(self, n: float) -> None:
            self.n += n

    bar = Bar()
    progress = percent_bar(bar)
    progress("decoding", 0.25)
    assert bar.n == 25
    progress("decoding", 1.0, 10, 10)
    assert bar.n == 100


def test_check_abort_raises_aborted_saying_where() -> None:
    check_abort(None, "never asked")
    check_abort(lambda: False, "not now")
    with pytest.raises(Aborted, match="after 3 of 5 steps"):
        check_abort(lambda: True, "after 3 of 5 steps")
