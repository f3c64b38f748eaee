"""LoRA adapters on HeartMuLa with PEFT, saved in PEFT's own format (adapter_config.json +
adapter_model.safetensors, keys under `base_model.model.`), so the ecosystem's tools read them
and `PeftModel.from_pretrained` loads them onto our model unchanged."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save as save_safetensors

from shared.core.lora_targets import LORA_PROJECTIONS, lora_projections
from shared.ml.models.heartmula import HeartMuLa

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Where each projection LoRA may target lives in a layer: SwiGLU w1/w2/w3 in `mlp`, the rest
# in `attn`.
BLOCK = {name: "mlp" if name.startswith("w") else "attn" for name in LORA_PROJECTIONS}


def target_pattern(targets: Sequence[str]) -> str:
    """A PEFT target regex from names like `q_proj` (both transformers) or `decoder.w1`."""
    alternatives = [
        rf"{part}\.layers\.\d+\.{BLOCK[name]}\.{re.escape(name)}"
        for target in targets
        for part, name in sorted(lora_projections(target))
    ]
    return rf"^(?:{'|'.join(alternatives)})$"


def lora_config(rank: int, alpha: int, dropout: float, targets: Sequence[str]) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_pattern(targets),
    )


def add_lora(model: HeartMuLa, config: LoraConfig, seed: int) -> PeftModel:
    """The model with fresh LoRA layers (seeded A, zero B: it starts as the base model); only
    they train. `remove_lora` takes them out again, leaving the base model untouched."""
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def remove_lora(peft_model: PeftModel) -> HeartMuLa:
    return peft_model.unload()


def adapter_files(peft_model: PeftModel) -> dict[str, bytes]:
    """adapter_config.json and adapter_model.safetensors (fp32 weights), PEFT's layout."""
    config = peft_model.peft_config["default"]
    config_dict = config.to_dict()
    config_dict["inference_mode"] = True
    weights = {
        name: tensor.detach().float().cpu().contiguous()
        for name, tensor in get_peft_model_state_dict(peft_model).items()
    }
    return {
        ADAPTER_CONFIG: json.dumps(config_dict, indent=2, sort_keys=True, default=list).encode(),
        ADAPTER_WEIGHTS: save_safetensors(weights),
    }


def adapter_weights(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The trainable LoRA tensors by name (what a checkpoint keeps)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_weights(peft_model: PeftModel, weights: dict[str, torch.Tensor]) -> None:
    set_peft_model_state_dict(peft_model, weights)
