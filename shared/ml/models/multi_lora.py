"""Many LoRA adapters in one batch: each row adds its own adapter's low-rank update.

The way S-LoRA and Punica serve many tenants: the base weights are shared and never merged;
every adapted projection keeps all resident adapters stacked in preallocated slot tensors
(`a` [slots, in, r], `b` [slots, r, out], the adapter's scale folded into `b`), and a forward
pass gathers each row's A and B by its slot index and adds x A B with two batched matmuls.
Slot 0 is "no adapter" (zeros); an adapter of a smaller rank is zero-padded to the slots' rank
and an adapter that leaves a projection alone has zeros there, both exact. Which slot each batch
row uses is set by the caller (`select`) before each model call; with no selection the
projections run the base model alone, so batches without adapters cost nothing extra.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from shared.core.lora_targets import LORA_PROJECTIONS
from shared.ml.models.heartmula import HeartMuLa
from shared.ml.training.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, target_pattern

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterCapacity:
    """What an engine can serve: resident adapters, their highest rank, the projections."""

    slots: int
    max_rank: int
    targets: tuple[str, ...] = LORA_PROJECTIONS


class AdapterError(ValueError):
    """An adapter this engine cannot serve (rank, targets, shapes, format); says why."""


@dataclass(frozen=True)
class LoRAWeights:
    """One adapter, read and checked against an engine: per adapted projection (its module
    name), A [in, max_rank] and B scaled [max_rank, out], zero-padded, on the CPU."""

    rank: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]


class LoRALinear(nn.Module):
    """A projection plus the batch rows' own low-rank updates (see the module docstring)."""

    def __init__(self, base: nn.Linear, selection: SlotSelection, slots: int, rank: int) -> None:
        super().__init__()
        self.base = base
        self.selection = selection
        out_dim, in_dim = base.weight.shape
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("a", torch.zeros(slots, in_dim, rank, **like), persistent=False)
        self.register_buffer("b", torch.zeros(slots, rank, out_dim, **like), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (what callers of an nn.Linear read, as PEFT's layers expose it)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [B, S, out]
        slots = self.selection.slots  # [B] or None
        if slots is None:
            return y
        return torch.baddbmm(y, torch.bmm(x, self.a[slots]), self.b[slots])


class SlotSelection:
    """The adapter slot of each row of the batch being run: one per model, read by every
    adapted projection."""

    slots: torch.Tensor | None = None


class MultiLoRA:
    """`capacity.slots` adapter slots (plus slot 0: none) of rank `capacity.max_rank` on the
    projections of `model` that `capacity.targets` name (LoRA target names, as fine-tunes take
    them). Wraps those projections in place."""

    def __init__(self, model: HeartMuLa, capacity: AdapterCapacity) -> None:
        self.capacity = capacity
        self.max_rank = capacity.max_rank
        self.targets = capacity.targets
        self.selection = SlotSelection()
        pattern = re.compile(target_pattern(capacity.targets))
        self.layers: dict[str, LoRALinear] = {}
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and pattern.fullmatch(name):
                wrapped = LoRALinear(module, self.selection, capacity.slots + 1, self.max_rank)
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, wrapped)
                self.layers[name] = wrapped

    def select(self, slots: torch.Tensor | None) -> None:
        """Rows of the next model call use these slots ([B] on the device; None: no adapters)."""
        self.selection.slots = slots

    def install(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into `slot`; projections it leaves alone get zeros."""
        for name, layer in self.layers.items():
            a, b = weights.layers.get(name, (None, None))
            if a is None or b is None:
                layer.a[slot].zero_()
                layer.b[slot].zero_()
            else:
                layer.a[slot].copy_(a)
                layer.b[slot].copy_(b)

    def read(self, files: dict[str, bytes]) -> LoRAWeights:
        """An adapter in PEFT's format, checked against these slots: AdapterError if its rank
        is over `max_rank`, it adapts a projection not served here, or shapes do not match."""
        try:
            config = json.loads(files[ADAPTER_CONFIG])
            rank, alpha = int(config["r"]), float(config["lora_alpha"])
        except (KeyError, TypeError, ValueError) as error:
            raise AdapterError(f"{ADAPTER_CONFIG} is not a LoRA config ({error!r})") from None
        if config.get("peft_type") != "LORA" or config.get("use_dora"):
            raise AdapterError("only plain LoRA adapters are served (not DoRA or other PEFT types)")
        if rank > self.max_rank:
            raise AdapterError(
                f"rank {rank} is over the {self.max_rank} this worker serves "
                "(HEARTCLUSTER_ADAPTER_MAX_RANK)"
            )
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        try:
            tensors = load_safetensors(files[ADAPTER_WEIGHTS])
        except SafetensorError as error:
            raise AdapterError(f"{ADAPTER_WEIGHTS} is not readable: {error}") from None
        names = {_module_name(key) for key in tensors}
        unserved = sorted(names - set(self.layers))
        if unserved:
            raise AdapterError(
                f"it adapts {unserved[0]}, which this worker does not serve (serves: "
                f"{', '.join(self.targets)}; HEARTCLUSTER_ADAPTER_TARGETS)"
            )
        layers = {}
        for name in sorted(names):
            base = self.layers[name].base.weight  # [out, in]
            a = tensors.get(f"{PEFT_PREFIX}{name}.lora_A.weight")  # [r, in]
            b = tensors.get(f"{PEFT_PREFIX}{name}.lora_B.weight")  # [out, r]
            if a is None or b is None:
                raise AdapterError(f"{name}: lora_A and lora_B must both be present")
            if a.shape != (rank, base.shape[1]) or b.shape != (base.shape[0], rank):
                raise AdapterError(
                    f"{name}: shapes {list(a.shape)} / {list(b.shape)} do not fit the base "
                    f"model's {list(base.shape)} at rank {rank} (another base model?)"
                )
            if not (a.isfinite().all() and b.isfinite().all()):
                raise AdapterError(f"{name}: weights are not all finite")
            padded_a = torch.zeros(base.shape[1], self.max_rank, dtype=base.dtype)
            padded_b = torch.zeros(self.max_rank, base.shape[0], dtype=base.dtype)
            padded_a[:, :rank] = a.T.to(base.dtype)
            padded_b[:rank] = (b.T.float() * scale).to(base.dtype)
            layers[name] = (padded_a, padded_b)
        return LoRAWeights(rank, layers)


def _module_name(key: str) -> str:
    """`base_model.model.X.lora_A.weight` → `X`."""
    if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
        raise AdapterError(f"unexpected tensor {key!r} in {ADAPTER_WEIGHTS}")
    return key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0]
