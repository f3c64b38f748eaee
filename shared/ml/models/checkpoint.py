"""Reading and writing checkpoint folders of safetensors shards (HF transformers layout).

Models are built on the meta device and then take the loaded tensors as their parameters, so
a multi-gigabyte model is never randomly initialised first and never held twice in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not match the architecture."""


def resolve_device(name: str | None = None) -> torch.device:
    """An explicit device, or the best available: cuda, then mps, then cpu."""
    if name and name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """An explicit dtype (bf16/fp16/fp32), or bf16 on CUDA, fp16 on MPS and fp32 on CPU."""
    if name and name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)} or auto")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: those its index lists, else every *.safetensors."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {folder}")
    return files


def read_tensors(
    files: list[Path], device: torch.device, dtype: torch.dtype | None = None, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The tensors of the given files whose names start with `prefix`, on `device`.

    Floating tensors are cast to `dtype` if given. Other tensors are never read, so one part of
    a large checkpoint (the codec's RVQ, say) loads without the rest.
    """
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if not key.startswith(prefix):
                    continue
                t = f.get_tensor(key)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                tensors[key] = t
    return tensors


def assign_state(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Make `tensors` the module's parameters after checking every name and shape.

    Errors name the offending tensor, so a wrong or truncated download is obvious.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise CheckpointError(f"{source}: missing tensor(s): {shown}")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s): {', '.join(unexpected[:5])}")
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                f"expected {tuple(ref.shape)}"
            )
    module.load_state_dict(tensors, strict=True, assign=True)


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, num_shards: int) -> None:
    """Write tensors as model-0000i-of-0000n.safetensors plus the index (HF layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    per_shard = -(-len(keys) // num_shards)
    weight_map: dict[str, str] = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
