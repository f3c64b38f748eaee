"""What the scheduler hands the model runner for one step, and what comes back.

Plain values: the scheduler decides who runs and where, the runner does the math, and neither
reaches into the other's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.ml.generation.sampling import SamplingParams
from shared.ml.models.prompt import Prompt


@dataclass(frozen=True)
class Feed:
    """A running request: its last frame enters the backbone at its next position."""

    request_id: int
    rows: list[int]  # [conditional] or [conditional, unconditional]
    frame: np.ndarray  # [8] codes sampled last step
    position: int
    draw: SamplingParams  # the frame it samples after this step


@dataclass(frozen=True)
class Prefill:
    """A request admitted this step: prompt (+ history) through the backbone in one call."""

    request_id: int
    rows: list[int]
    prompt: Prompt
    history: np.ndarray | None  # [8, T] codes to continue from
    draw: SamplingParams  # its first new frame
    adapter_slot: int = 0  # its LoRA adapter's slot; 0: none


@dataclass(frozen=True)
class AdapterInstall:
    """An adapter to copy into a device slot before this step's prefill."""

    slot: int
    weights: Any  # the engine's checked adapter weights (opaque to the scheduler)


@dataclass(frozen=True)
class StepPlan:
    feeds: list[Feed]
    prefills: list[Prefill]
    released: list[int] = field(default_factory=list)  # rows freed since the last plan
    installs: list[AdapterInstall] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.feeds or self.prefills)


@dataclass(frozen=True)
class StepOutput:
    codes: np.ndarray | None  # [n, 8] int32, one frame per batch row; None if nothing sampled
    failed: dict[int, Exception]  # request id → why its prefill failed (it sampled nothing)
