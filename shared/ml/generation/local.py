"""Local one-shot runs: the engine in this process, no cluster (the `heartcluster generate` CLI)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared.ml.generation.engine import GenerationEngine, GenerationRequest, GenerationResult
from shared.ml.models.tiny import NOISE_WARNING, TINY_VERSION


def generate_tokens(
    model_dir: Path,
    request: GenerationRequest,
    version: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[np.ndarray, GenerationResult]:
    """Generate with a progress bar; returns (history + new tokens [8, T], engine result)."""
    engine = GenerationEngine.from_model_dir(model_dir, version, device, dtype, max_rows=2)
    if engine.model.config.backbone_flavor == "custom" or version == TINY_VERSION:
        print(f"warning: {NOISE_WARNING}", file=sys.stderr)
    with tqdm(total=request.frames, unit="frame", file=sys.stderr) as bar:

        def progress(
            stage: str, fraction: float, done: int | None = None, total: int | None = None
        ) -> None:
            bar.update((done or 0) - bar.n)

        (result,) = engine.generate([request], on_progress=progress)
    tokens = result.tokens
    if request.history is not None:
        tokens = np.concatenate([request.history.astype(np.int32), tokens], axis=1)
    return tokens, result
