"""The engine's scheduler alone, no model: admission, rows, aborts, finishing requests.

The runner's part is played by hand: each test builds the StepOutput a real step would give.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from shared.core.constants import AUDIO_EOS_ID, NUM_CODEBOOKS
from shared.ml.generation.plan import StepOutput, StepPlan
from shared.ml.generation.request import (
    ContextOverflowError,
    GenerationHandle,
    GenerationRequest,
    RequestError,
)
from shared.ml.generation.scheduler import Scheduler
from shared.ml.models.prompt import Prompt

EOS = AUDIO_EOS_ID
BOOKS = NUM_CODEBOOKS
PROMPT = Prompt(
    tokens=torch.zeros(6, BOOKS + 1, dtype=torch.int64),
    mask=torch.zeros(6, BOOKS + 1, dtype=torch.bool),
    muq_index=3,
)
UNGUIDED = GenerationRequest(tags="piano", duration_s=0.24, cfg_scale=1.0)  # 3 frames
GUIDED = replace(UNGUIDED, cfg_scale=2.0)


def _scheduler(rows: int = 4, context: int = 64) -> Scheduler:
    return Scheduler(rows, context, EOS, BOOKS)


def _step(scheduler: Scheduler, code: int = 5, eos_rows: tuple[int, ...] = ()) -> StepPlan:
    """One step whose runner samples `code` everywhere (EOS on `eos_rows`)."""
    plan = scheduler.schedule()
    rows = [r for work in [*plan.feeds, *plan.prefills] for r in work.rows]
    codes = np.full((max(rows, default=-1) + 1, BOOKS), code, dtype=np.int32)
    codes[list(eos_rows), 0] = EOS
    scheduler.update_from_output(plan, StepOutput(codes if rows else None, {}))
    return plan


def test_requests_are_admitted_first_come_first_served_into_the_lowest_rows() -> None:
    scheduler = _scheduler(rows=2)
    first, second, third = (scheduler.add(replace(UNGUIDED, seed=s), PROMPT) for s in (1, 2, 3))
    plan = scheduler.schedule()
    assert [(p.rows, p.draw.seed) for p in plan.prefills] == [([0], 1), ([1], 2)]
    assert plan.feeds == [] and scheduler.num_running == 2 and scheduler.num_pending == 1
    assert not (first.done() or second.done() or third.done())


def test_a_guided_request_takes_two_rows_conditional_first() -> None:
    scheduler = _scheduler(rows=4)
    scheduler.add(UNGUIDED, PROMPT)
    scheduler.add(GUIDED, PROMPT)
    prefills = scheduler.schedule().prefills
    assert [p.rows for p in prefills] == [[0], [1, 2]]
    guided = prefills[1].draw
    assert (guided.cond_row, guided.uncond_row, guided.cfg_scale) == (1, 2, 2.0)
    assert scheduler.free_rows == [3]


def test_a_waiting_guided_request_is_not_overtaken() -> None:
    """Two rows, one taken: the guided request waits for both, and the unguided one behind it
    waits too (first come first served), until the first request ends."""
    scheduler = _scheduler(rows=2)
    scheduler.add(UNGUIDED, PROMPT)
    _step(scheduler)
    guided = scheduler.add(GUIDED, PROMPT)
    scheduler.add(replace(UNGUIDED, seed=9), PROMPT)
    plan = _step(scheduler)
    assert plan.prefills == [] and scheduler.num_pending == 2
    _step(scheduler)  # the first request's third frame: it ends, its row comes free
    plan = _step(scheduler)
    assert [p.rows for p in plan.prefills] == [[0, 1]] and not guided.done()


def test_running_requests_feed_their_last_frame_at_their_next_position() -> None:
    scheduler = _scheduler()
    history = np.ones((BOOKS, 4), dtype=np.int64)
    scheduler.add(replace(UNGUIDED, history=history, duration_s=0.4), PROMPT)
    _step(scheduler, code=7)
    plan = _step(scheduler, code=8)
    (feed,) = plan.feeds
    assert feed.position == PROMPT.length + 4  # prompt rows, then the history frames
    assert feed.frame.tolist() == [7] * BOOKS and feed.draw.frame == 1
    (feed,) = scheduler.schedule().feeds
    assert feed.position == PROMPT.length + 5 and feed.frame.tolist() == [8] * BOOKS


def test_a_request_ends_after_its_frames_and_frees_its_rows() -> None:
    scheduler = _scheduler(rows=2)
    reports: list[tuple] = []
    handle = scheduler.add(GUIDED, PROMPT, on_progress=lambda *r: reports.append(r))
    for code in (1, 2, 3):
        _step(scheduler, code=code)
    result = handle.result(timeout=0)
    assert result.finish_reason == "length" and result.prompt_length == PROMPT.length
    assert result.tokens.dtype == np.int32 and result.tokens[0].tolist() == [1, 2, 3]
    assert reports == [("generating", d / 3, d, 3) for d in (1, 2, 3)]
    assert scheduler.free_rows == [0, 1] and scheduler.num_running == 0


def test_eos_ends_only_its_own_request() -> None:
    scheduler = _scheduler()
    stopper = scheduler.add(UNGUIDED, PROMPT)
    other = scheduler.add(replace(UNGUIDED, seed=2), PROMPT)
    _step(scheduler)
    _step(scheduler, eos_rows=(0,))
    assert stopper.result(timeout=0).finish_reason == "eos"
    assert stopper.result(timeout=0).tokens.shape == (BOOKS, 1)  # the EOS frame is not kept
    assert not other.done() and scheduler.free_rows == [0, 2, 3]


def test_an_abort_ends_a_running_request_and_its_rows_go_to_the_next() -> None:
    scheduler = _scheduler(rows=2)
    running = scheduler.add(GUIDED, PROMPT)
    _step(scheduler)
    waiting = scheduler.add(replace(GUIDED, seed=4), PROMPT)
    running.cancel()
    plan = scheduler.schedule()
    result = running.result(timeout=0)
    assert result.finish_reason == "aborted" and result.tokens.shape == (BOOKS, 1)
    assert plan.feeds == [] and [p.rows for p in plan.prefills] == [[0, 1]]
    assert not waiting.done()


def test_should_abort_is_asked_every_step() -> None:
    scheduler = _scheduler()
    stop = {"now": False}
    handle = scheduler.add(UNGUIDED, PROMPT, should_abort=lambda: stop["now"])
    _step(scheduler)
    stop["now"] = True
    _step(scheduler)
    assert handle.result(timeout=0).finish_reason == "aborted"
    assert scheduler.free_rows == [0, 1, 2, 3]


def test_aborted_waiting_requests_are_dropped_without_running() -> None:
    scheduler = _scheduler(rows=1)
    scheduler.add(UNGUIDED, PROMPT)
    _step(scheduler)
    waiting = scheduler.add(replace(UNGUIDED, seed=3), PROMPT)
    waiting.cancel()
    plan = scheduler.schedule()
    assert plan.prefills == [] and scheduler.num_pending == 0
    result = waiting.result(timeout=0)
    assert result.finish_reason == "aborted" and result.tokens.shape == (BOOKS, 0)


def test_a_failed_prefill_fails_its_request_and_frees_its_rows() -> None:
    scheduler = _scheduler()
    doomed = scheduler.add(GUIDED, PROMPT)
    fine = scheduler.add(UNGUIDED, PROMPT)
    plan = scheduler.schedule()
    codes = np.full((3, BOOKS), 5, dtype=np.int32)
    error = MemoryError("no room")
    scheduler.update_from_output(plan, StepOutput(codes, {plan.prefills[0].request_id: error}))
    with pytest.raises(MemoryError):
        doomed.result(timeout=0)
    assert not fine.done() and scheduler.free_rows == [0, 1, 3]


def test_a_failing_progress_callback_ends_only_its_request() -> None:
    scheduler = _scheduler()

    def broken(*_: object) -> None:
        raise RuntimeError("listener gone")

    failing = scheduler.add(UNGUIDED, PROMPT, on_progress=broken)
    other = scheduler.add(replace(UNGUIDED, seed=2), PROMPT)
    _step(scheduler)
    with pytest.raises(RuntimeError, match="listener gone"):
        failing.result(timeout=0)
    assert not other.done() and scheduler.num_running == 1


def test_requests_that_can_never_run_are_refused_when_added() -> None:
    with pytest.raises(RequestError, match="two batch rows") as info:
        _scheduler(rows=1).add(GUIDED, PROMPT)
    assert info.value.field == "cfg_scale"
    with pytest.raises(ContextOverflowError, match="at most 58 new frames") as info:
        _scheduler(context=64).add(replace(UNGUIDED, duration_s=10.0), PROMPT)
    assert info.value.field == "duration_s"


def test_fail_all_fails_running_and_waiting_requests() -> None:
    scheduler = _scheduler(rows=1)
    handles: list[GenerationHandle] = [scheduler.add(UNGUIDED, PROMPT)]
    _step(scheduler)
    handles.append(scheduler.add(UNGUIDED, PROMPT))
    scheduler.fail_all(RuntimeError("stopped"))
    for handle in handles:
        with pytest.raises(RuntimeError, match="stopped"):
            handle.result(timeout=0)
    assert scheduler.num_running == 0 and scheduler.num_pending == 0
    assert scheduler.free_rows == [0]
