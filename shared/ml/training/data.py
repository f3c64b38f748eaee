"""A fine-tune's data: dataset songs cut into context-sized examples, a held-out split, and a
data order that can be saved and resumed mid-epoch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.ml.models.prompt import PromptBuilder
from shared.ml.training.objective import Example


@dataclass(frozen=True)
class SongItem:
    """One ready dataset item: its prompt text and codec codes [8, T]."""

    tags: str
    lyrics: str
    tokens: np.ndarray


def cut_examples(songs: list[SongItem], prompts: PromptBuilder, context: int) -> list[Example]:
    """Each song's prompt + frames, long songs cut into consecutive pieces that fit the
    context (each piece repeats the song's prompt)."""
    examples = []
    for song in songs:
        prompt = prompts.build(song.tags, song.lyrics)
        room = context - prompt.length + 1  # the last frame of a piece is only a target
        if room < 1:
            raise ValueError(f"the prompt of {song.tags!r} alone fills the {context} positions")
        frames = torch.from_numpy(np.ascontiguousarray(song.tokens.T)).long()  # [T, 8]
        for start in range(0, frames.shape[0], room):
            examples.append(Example(prompt, frames[start : start + room]))
    return examples


def split_examples(
    examples: list[Example], validation_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded shuffle, at least one training example."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = min(round(len(examples) * validation_fraction), len(examples) - 1)
    return [examples[i] for i in order[held:]], [examples[i] for i in order[:held]]


class DataOrder:
    """Examples in a seeded shuffle, reshuffled every epoch; `position` (examples taken so
    far) is all a checkpoint needs to continue exactly where it stopped."""

    def __init__(self, size: int, seed: int, position: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.position = position

    def _epoch(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def take(self, count: int) -> list[int]:
        indices = []
        for _ in range(count):
            epoch, offset = divmod(self.position, self.size)
            indices.append(self._epoch(epoch)[offset])
            self.position += 1
        return indices
