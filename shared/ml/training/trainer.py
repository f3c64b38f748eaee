"""The fine-tune loop: AdamW on the LoRA weights, linear warmup then cosine decay, gradient
clipping, gradient accumulation, held-out loss, and checkpoints that resume exactly.

A checkpoint holds the adapter, optimizer, scheduler, step, every RNG state and the data
order's position, so a run stopped at a checkpoint and resumed takes the very same steps as an
uninterrupted one. Nothing here knows about jobs or object stores: the caller passes where
checkpoints live and how progress is reported.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from peft import PeftModel

from shared.core.progress import AbortCheck, Progress, check_abort
from shared.ml.models.heartmula import HeartMuLa
from shared.ml.models.prompt import PromptBuilder
from shared.ml.training.data import DataOrder
from shared.ml.training.lora import (
    adapter_files,
    adapter_weights,
    add_lora,
    load_adapter_weights,
    lora_config,
    remove_lora,
)
from shared.ml.training.objective import Example, Losses, compute_losses

MAX_GRAD_NORM = 1.0
EVAL_BATCH = 8


@dataclass(frozen=True)
class TrainConfig:
    rank: int
    alpha: int
    dropout: float
    targets: tuple[str, ...]
    learning_rate: float
    steps: int
    batch_size: int
    grad_accumulation: int
    warmup_steps: int
    uncond_prob: float
    checkpoint_every: int
    seed: int


class CheckpointStore(Protocol):
    """Where one run's latest checkpoint lives (the object store under the job's keys)."""

    def load(self) -> bytes | None: ...

    def save(self, data: bytes) -> None: ...


@dataclass
class TrainResult:
    files: dict[str, bytes]  # adapter_config.json, adapter_model.safetensors
    metrics: list[dict[str, Any]]  # one line per optimizer step (and evaluation)
    resumed_from: int  # the step the run continued from (0: a fresh run)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the full rate, then cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


class Trainer:
    def __init__(
        self,
        model: HeartMuLa,
        prompts: PromptBuilder,
        train: list[Example],
        validation: list[Example],
        config: TrainConfig,
        checkpoints: CheckpointStore,
    ) -> None:
        if not train:
            raise ValueError("no training examples")
        self.base = model
        self.prompts = prompts
        self.train_set = train
        self.validation = validation
        self.config = config
        self.checkpoints = checkpoints
        self.cuda = model.device.type == "cuda"
        self.peft: PeftModel = add_lora(
            model,
            lora_config(config.rank, config.alpha, config.dropout, config.targets),
            config.seed,
        )
        trainable = [p for p in self.peft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config.warmup_steps, config.steps)
        )
        self.trainable = trainable
        self.order = DataOrder(len(train), config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)  # text dropout draws
        self.step = 0
        self.metrics: list[dict[str, Any]] = []

    def close(self) -> None:
        """Take the LoRA layers out again: the worker's base model serves the next job."""
        remove_lora(self.peft)

    # ----- the math -----------------------------------------------------------------------

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def losses(self, examples: list[Example], unconditional: torch.Tensor) -> Losses:
        with self._autocast():
            return compute_losses(
                self.base, self.prompts, examples, unconditional, checkpointing=self.cuda
            )

    @torch.no_grad()
    def evaluate(self, examples: list[Example], should_abort: AbortCheck | None = None) -> Losses:
        """Mean conditional loss over `examples` (dropout off), weighted by frames."""
        self.peft.eval()
        total0 = total_rest = frames = 0.0
        for start in range(0, len(examples), EVAL_BATCH):
            check_abort(should_abort, f"fine-tune stopped evaluating at step {self.step}")
            batch = examples[start : start + EVAL_BATCH]
            n = sum(ex.frames.shape[0] for ex in batch)
            losses = self.losses(batch, torch.zeros(len(batch), dtype=torch.bool))
            total0 += losses.codebook0.item() * n
            total_rest += losses.codebooks_rest.item() * n
            frames += n
        self.peft.train()
        return Losses(torch.tensor(total0 / frames), torch.tensor(total_rest / frames))

    def _optimizer_step(self, should_abort: AbortCheck | None) -> Losses:
        c = self.config
        parts0, parts_rest = [], []
        for _ in range(c.grad_accumulation):
            check_abort(should_abort, f"fine-tune stopped at step {self.step}")
            batch = [self.train_set[i] for i in self.order.take(c.batch_size)]
            unconditional = torch.rand(len(batch), generator=self.generator) < c.uncond_prob
            losses = self.losses(batch, unconditional)
            (losses.total / c.grad_accumulation).backward()
            parts0.append(losses.codebook0.item())
            parts_rest.append(losses.codebooks_rest.item())
        torch.nn.utils.clip_grad_norm_(self.trainable, MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        mean = len(parts0)
        return Losses(torch.tensor(sum(parts0) / mean), torch.tensor(sum(parts_rest) / mean))

    # ----- the run ------------------------------------------------------------------------

    def run(
        self,
        progress: Progress,
        should_abort: AbortCheck | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> TrainResult:
        c = self.config
        resumed_from = self._restore()
        self.peft.train()
        if resumed_from == 0 and self.validation:
            losses = self.evaluate(self.validation, should_abort)
            self.metrics.append({"step": 0, **_eval_line(losses)})
        started, steps_here = clock(), 0
        while self.step < c.steps:
            losses = self._optimizer_step(should_abort)
            steps_here += 1
            elapsed = max(clock() - started, 1e-9)
            line: dict[str, Any] = {
                "step": self.step,
                "loss": losses.total.item(),
                "loss_codebook0": losses.codebook0.item(),
                "loss_codebooks_1_7": losses.codebooks_rest.item(),
                "learning_rate": self.scheduler.get_last_lr()[0],
                "examples_per_s": steps_here * c.batch_size * c.grad_accumulation / elapsed,
                "eta_s": (c.steps - self.step) * elapsed / steps_here,
            }
            at_checkpoint = self.step % c.checkpoint_every == 0 or self.step == c.steps
            if at_checkpoint and self.validation:
                line |= _eval_line(self.evaluate(self.validation, should_abort))
            self.metrics.append(line)
            progress(
                "training",
                self.step / c.steps,
                self.step,
                c.steps,
                message=_progress_message(line),
            )
            if at_checkpoint:
                check_abort(should_abort, f"fine-tune stopped at step {self.step}")
                self.checkpoints.save(self._state_bytes())
        return TrainResult(adapter_files(self.peft), self.metrics, resumed_from)

    # ----- checkpoints --------------------------------------------------------------------

    def _state_bytes(self) -> bytes:
        state = {
            "step": self.step,
            "adapter": adapter_weights(self.peft),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_position": self.order.position,
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.cuda else [],
            "rng_dropout_draws": self.generator.get_state(),
            "metrics": [json.dumps(line) for line in self.metrics],
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def _restore(self) -> int:
        """Continue from the stored checkpoint, if any: the step it was taken at."""
        data = self.checkpoints.load()
        if data is None:
            return 0
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        load_adapter_weights(self.peft, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.order.position = int(state["data_position"])
        torch.set_rng_state(state["rng_torch"])
        if self.cuda and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.generator.set_state(state["rng_dropout_draws"])
        self.metrics = [json.loads(line) for line in state["metrics"]]
        return self.step


def _eval_line(losses: Losses) -> dict[str, float]:
    return {
        "val_loss": losses.total.item(),
        "val_loss_codebook0": losses.codebook0.item(),
        "val_loss_codebooks_1_7": losses.codebooks_rest.item(),
    }


def _progress_message(line: dict[str, Any]) -> str:
    text = f"step {line['step']} loss {line['loss']:.4f} lr {line['learning_rate']:.2e}"
    if "val_loss" in line:
        text += f" val_loss {line['val_loss']:.4f}"
    return f"{text} {line['examples_per_s']:.2f} ex/s eta {line['eta_s']:.0f} s"
