"""LoRA target names: the projections fine-tunes may adapt and GPU workers serve. No torch: the
gateway checks both against each other at submit."""

from __future__ import annotations

# A projection of both transformers (`q_proj`) or of one (`decoder.w1`).
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")
LORA_PARTS = ("backbone", "decoder")
LORA_TARGETS = (
    *LORA_PROJECTIONS,
    *(f"{part}.{name}" for part in LORA_PARTS for name in LORA_PROJECTIONS),
)


def lora_projections(target: str) -> set[tuple[str, str]]:
    """The (transformer, projection) pairs a target names: `q_proj` both, `decoder.w1` one.
    Raises ValueError for a name that is not a target."""
    part, _, name = target.rpartition(".")
    if name not in LORA_PROJECTIONS or (part and part not in LORA_PARTS):
        raise ValueError(f"unknown LoRA target {target!r}")
    return {(p, name) for p in ([part] if part else LORA_PARTS)}
