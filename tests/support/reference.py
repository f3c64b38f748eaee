"""The official checkpoints' tensor names and shapes (copied from the team's reference lists)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parents[1] / "data"


def official_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from tests/data/NAME (lines like `key (3072, 512) float32`)."""
    shapes = {}
    for line in (DATA / name).read_text().splitlines():
        key, rest = line.split(" ", 1)
        shape = rest.rsplit(" ", 1)[0].strip("()").rstrip(",")
        shapes[key] = tuple(int(d) for d in shape.split(",") if d.strip())
    return shapes
