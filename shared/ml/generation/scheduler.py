"""Who runs each step and in which batch rows: pure bookkeeping, no tensors.

A request takes one batch row (two with classifier-free guidance: a conditional and an
unconditional row) from admission until it ends; then its rows go to the next request. Each
step the scheduler drops aborted requests (so an abort costs at most one frame), lists the
running requests whose last frame is fed, and admits waiting requests into free rows, first
come first served; after the runner's step it records every sampled frame and ends the
requests that are done. A request with a LoRA adapter also needs the adapter in a device slot:
resident already (pinned at submit), or claimed at admission (a free or least recently used
unreferenced slot, installed by the runner before the prefill); while every slot is referenced
it waits and the requests behind it go ahead. Policies (priorities, fairness, adapters,
preemption) change this module only.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shared.core.constants import FRAME_S
from shared.core.progress import AbortCheck, Progress
from shared.ml.generation.adapter_slots import AdapterSlots
from shared.ml.generation.plan import AdapterInstall, Feed, Prefill, StepOutput, StepPlan
from shared.ml.generation.request import (
    AdapterRef,
    ContextOverflowError,
    FinishReason,
    GenerationHandle,
    GenerationRequest,
    GenerationResult,
    RequestError,
)
from shared.ml.generation.sampling import SamplingParams
from shared.ml.models.prompt import Prompt

STAGE = "generating"  # the progress stage the engine reports


@dataclass(eq=False)
class RequestState:
    """One submitted request, from the queue to its end."""

    id: int
    request: GenerationRequest
    prompt: Prompt
    handle: GenerationHandle
    on_progress: Progress | None
    should_abort: AbortCheck | None
    rows: list[int] = field(default_factory=list)  # [conditional(, unconditional)] once running
    next_position: int = 0  # where its last sampled frame enters the backbone
    frames: list[np.ndarray] = field(default_factory=list)  # [8] codes each
    adapter_slot: int = 0  # the adapter slot it references; 0: none (yet)
    adapter_weights: object = None  # read at submit when its adapter was not resident

    def aborted(self) -> bool:
        return self.handle.cancel_requested or bool(self.should_abort and self.should_abort())

    def draw(self) -> SamplingParams:
        """How it samples its next frame."""
        request = self.request
        return SamplingParams(
            cond_row=self.rows[0],
            uncond_row=self.rows[-1],
            cfg_scale=request.cfg_scale,
            temperature=request.temperature,
            top_k=request.top_k,
            seed=request.seed,
            frame=len(self.frames),
            eos_allowed=request.stop_at_eos,
        )


# Reads a request's adapter (in the submitting thread) into what the runner installs.
AdapterReader = Callable[[AdapterRef], object]


class Scheduler:
    def __init__(
        self,
        max_rows: int,
        context: int,
        eos_id: int,
        num_codebooks: int,
        adapter_slots: AdapterSlots | None = None,
        read_adapter: AdapterReader | None = None,
    ) -> None:
        self.max_rows = max_rows
        self.context = context  # positions per row: prompt + history + new frames must fit
        self.eos_id = eos_id  # a sampled code at or above it ends the song
        self.num_codebooks = num_codebooks
        self._rows: list[int | None] = [None] * max_rows  # the request id holding each row
        self._released: list[int] = []  # rows freed since the last plan (the runner resets them)
        self._running: dict[int, RequestState] = {}  # by id, in admission order
        self._pending: deque[RequestState] = deque()
        self._ids = itertools.count()
        self._lock = threading.Condition()  # guards _pending: submitters run on other threads
        self.adapter_slots = adapter_slots
        self._read_adapter = read_adapter

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def free_rows(self) -> list[int]:
        return [r for r, owner in enumerate(self._rows) if owner is None]

    # ----- queueing (any thread) --------------------------------------------------------------

    def add(
        self,
        request: GenerationRequest,
        prompt: Prompt,
        on_progress: Progress | None = None,
        should_abort: AbortCheck | None = None,
    ) -> GenerationHandle:
        """Queue a validated request; one that could never run here raises RequestError."""
        if request.guided and self.max_rows < 2:
            raise RequestError("cfg_scale", "guidance needs two batch rows; this engine has one")
        history = request.history_frames
        needed = prompt.length + history + request.frames
        if needed > self.context:
            room = max(self.context - prompt.length - history, 0)
            raise ContextOverflowError(
                "duration_s",
                f"prompt ({prompt.length} tokens) + history ({history} frames) + "
                f"{request.frames} new frames = {needed} positions, over the model's "
                f"{self.context}-position context; at most {room} new frames "
                f"({room * FRAME_S:.2f} s) fit",
            )
        handle = GenerationHandle(prompt.length)
        state = RequestState(next(self._ids), request, prompt, handle, on_progress, should_abort)
        if request.adapter is not None:
            self._hold_adapter(state, request.adapter)
        with self._lock:
            self._pending.append(state)
            self._lock.notify_all()
        return handle

    def _hold_adapter(self, state: RequestState, adapter: AdapterRef) -> None:
        """Pin the adapter's slot if it is resident, else read it here (the submitter's
        thread), so that the engine's loop never waits on a read."""
        if self.adapter_slots is None or self._read_adapter is None:
            raise RequestError("adapter_id", "this engine serves no adapters")
        slot = self.adapter_slots.pin_resident(adapter.id)
        if slot is not None:
            state.adapter_slot = slot
        else:
            state.adapter_weights = self._read_adapter(adapter)

    def wait_for_work(self, stopping: Callable[[], bool]) -> None:
        """Block until a request waits or runs, or `stopping()` holds (see `wake`)."""
        with self._lock:
            while not (self._pending or self._running or stopping()):
                self._lock.wait()

    def wake(self) -> None:
        """Wake `wait_for_work` after what its `stopping` reads changed."""
        with self._lock:
            self._lock.notify_all()

    # ----- one step (the engine's thread) -----------------------------------------------------

    def schedule(self) -> StepPlan:
        """End aborted requests, feed every running one, admit what fits."""
        for state in [s for s in self._running.values() if s.aborted()]:
            self._finish(state, "aborted")
        self._drop_aborted_pending()
        feeds = [self._feed(state) for state in self._running.values()]
        prefills, installs = self._admit()
        released, self._released = self._released, []
        return StepPlan(feeds, prefills, released, installs)

    def update_from_output(self, plan: StepPlan, output: StepOutput) -> None:
        """Record each request's new frame; end those that sampled EOS or are long enough."""
        for request_id, error in output.failed.items():
            self._fail(self._running[request_id], error)
        if output.codes is None:
            return
        for work in [*plan.feeds, *plan.prefills]:
            state = self._running.get(work.request_id)
            if state is not None:
                self._record_frame(state, output.codes[work.rows[0]])

    def fail_running(self, error: Exception) -> None:
        """Fail every running request (its step failed as a whole); waiting ones stay."""
        for state in list(self._running.values()):
            self._fail(state, error)

    def fail_all(self, error: Exception) -> None:
        """Fail every running and waiting request (nobody waits forever)."""
        self.fail_running(error)
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        for state in pending:
            self._unpin(state)
            state.handle.future.set_exception(error)

    def _feed(self, state: RequestState) -> Feed:
        feed = Feed(state.id, list(state.rows), state.frames[-1], state.next_position, state.draw())
        state.next_position += 1
        return feed

    def _drop_aborted_pending(self) -> None:
        with self._lock:
            waiting = list(self._pending)
        aborted = [s for s in waiting if s.aborted()]  # callbacks run outside the lock
        with self._lock:
            for state in aborted:
                self._pending.remove(state)
        for state in aborted:
            self._unpin(state)
            self._resolve(state, "aborted")

    def _admit(self) -> tuple[list[Prefill], list[AdapterInstall]]:
        """Waiting requests take the lowest free rows, first come first served; one whose
        adapter finds no slot stays waiting and the next one goes ahead."""
        prefills: list[Prefill] = []
        installs: list[AdapterInstall] = []
        with self._lock:
            waiting = list(self._pending)
        for state in waiting:
            free = self.free_rows
            needed = 2 if state.request.guided else 1
            if len(free) < needed:
                break
            if not self._place_adapter(state, installs):
                continue
            with self._lock:
                self._pending.remove(state)
            state.rows = free[:needed]
            for r in state.rows:
                self._rows[r] = state.id
            state.next_position = state.prompt.length + state.request.history_frames
            self._running[state.id] = state
            prefills.append(
                Prefill(
                    state.id,
                    list(state.rows),
                    state.prompt,
                    state.request.history,
                    state.draw(),
                    state.adapter_slot,
                )
            )
        return prefills, installs

    def _place_adapter(self, state: RequestState, installs: list[AdapterInstall]) -> bool:
        """Whether the request's adapter (if any) has a slot now, claiming one if needed."""
        adapter = state.request.adapter
        if adapter is None or state.adapter_slot:
            return True
        assert self.adapter_slots is not None  # add() refused adapters without slots
        claimed = self.adapter_slots.claim(adapter.id)
        if claimed is None:
            return False  # every slot is referenced: wait for one to free
        state.adapter_slot, install = claimed
        if install:
            installs.append(AdapterInstall(state.adapter_slot, state.adapter_weights))
        state.adapter_weights = None
        return True

    def _record_frame(self, state: RequestState, frame: np.ndarray) -> None:
        if (frame >= self.eos_id).any():
            self._finish(state, "eos")
            return
        state.frames.append(frame)
        done, total = len(state.frames), state.request.frames
        if state.on_progress is not None:
            try:
                state.on_progress(STAGE, done / total, done, total)
            except Exception as error:  # noqa: BLE001 (the caller's failure ends its request)
                self._fail(state, error)
                return
        if done >= total:
            self._finish(state, "length")

    # ----- ending requests --------------------------------------------------------------------

    def _release(self, state: RequestState) -> None:
        for r in state.rows:
            self._rows[r] = None
        self._released.extend(state.rows)
        del self._running[state.id]
        self._unpin(state)

    def _unpin(self, state: RequestState) -> None:
        if state.adapter_slot and self.adapter_slots is not None:
            self.adapter_slots.unpin(state.adapter_slot)
        state.adapter_slot = 0

    def _finish(self, state: RequestState, reason: FinishReason) -> None:
        self._release(state)
        self._resolve(state, reason)

    def _fail(self, state: RequestState, error: Exception) -> None:
        self._release(state)
        state.handle.future.set_exception(error)

    def _resolve(self, state: RequestState, reason: FinishReason) -> None:
        if state.frames:
            tokens = np.stack(state.frames, axis=1)
        else:
            tokens = np.zeros((self.num_codebooks, 0), np.int32)
        state.handle.future.set_result(
            GenerationResult(
                tokens.astype(np.int32), reason, state.prompt.length, state.request.seed
            )
        )
