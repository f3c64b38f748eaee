"""Fixtures for the model layer: one engine per module over the session's tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.ml.generation.engine import GenerationEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> GenerationEngine:
    return GenerationEngine.from_model_dir(tiny_model_dir, "tiny", device="cpu", max_rows=8)
