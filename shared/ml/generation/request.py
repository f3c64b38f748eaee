"""What callers hand the generation engine and what they get back."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

import numpy as np

from shared.core.constants import CODEC_CODES, FRAME_S, NUM_CODEBOOKS, frames_for_seconds

FinishReason = Literal["length", "eos", "aborted"]


class RequestError(ValueError):
    """A request the engine refuses; `field` names the offending parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ContextOverflowError(RequestError):
    """Prompt + history + new frames do not fit the model's context."""


@dataclass(frozen=True)
class AdapterRef:
    """A request's LoRA adapter: its id, and how to read its files (PEFT format) when it is
    not resident; that read runs in the submitting thread, never in the engine's loop."""

    id: str
    files: Callable[[], dict[str, bytes]]


@dataclass(frozen=True)
class GenerationRequest:
    tags: str
    lyrics: str = ""
    duration_s: float = 120.0
    temperature: float = 1.0
    top_k: int = 50
    cfg_scale: float = 1.5  # 1.0: unguided (one batch row); above 1: guided (two rows)
    seed: int = 0
    history: np.ndarray | None = None  # [8, T] codes to continue from
    stop_at_eos: bool = True  # False: audio EOS is never sampled, every frame is filled
    adapter: AdapterRef | None = None  # its rows add this LoRA adapter's update

    @property
    def frames(self) -> int:
        return frames_for_seconds(self.duration_s)

    @property
    def history_frames(self) -> int:
        return 0 if self.history is None else self.history.shape[1]

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def validate(self) -> None:
        if not math.isfinite(self.duration_s) or self.frames < 1:
            raise RequestError("duration_s", f"must be at least {FRAME_S} s")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise RequestError("temperature", "must be a positive number")
        if self.top_k < 1:
            raise RequestError("top_k", "must be at least 1")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 1.0):
            # Below 1 leans towards the unconditional logits, which the reference never does
            # (it samples cfg <= 1 unguided): refused rather than silently reinterpreted.
            raise RequestError(
                "cfg_scale", f"must be at least 1 (1 means no guidance), got {self.cfg_scale}"
            )
        if not 0 <= self.seed < 2**63:
            raise RequestError("seed", "must be in [0, 2**63)")
        if self.history is not None:
            h = self.history
            if h.ndim != 2 or h.shape[0] != NUM_CODEBOOKS or h.shape[1] < 1:
                raise RequestError(
                    "history", f"must have shape [{NUM_CODEBOOKS}, T>=1], got {list(h.shape)}"
                )
            if not np.issubdtype(h.dtype, np.integer) or h.min() < 0 or h.max() >= CODEC_CODES:
                raise RequestError("history", f"codes must be integers in [0, {CODEC_CODES})")


@dataclass
class GenerationResult:
    tokens: np.ndarray  # [8, T] int32: the new frames only (history not repeated)
    finish_reason: FinishReason
    prompt_length: int  # prompt rows in tokens (tags + muq slot + lyrics)
    seed: int


class GenerationHandle:
    """A submitted request: wait for its result or cancel it (effective within one frame)."""

    def __init__(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length
        self.future: Future[GenerationResult] = Future()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancelled.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()
