"""Fixtures for the model layer: one tiny model directory per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.generation.engine import GenerationEngine
from shared.models.tiny import write_tiny_models


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("models")
    write_tiny_models(model_dir, seed=0)
    return model_dir


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> GenerationEngine:
    return GenerationEngine.from_model_dir(tiny_model_dir, "tiny", device="cpu", max_rows=8)
