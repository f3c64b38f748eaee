"""The official HeartMuLa prompt: tags, a muq slot and lyrics in the text column.

Layout (rows × 9 columns, text column last, audio columns zero and masked off):
    [BOS <tag>tags</tag> EOS] [muq slot, text id 0] [BOS lyrics EOS]
Tags and lyrics are plain strings: never file paths (the reference reads a file when the
string happens to name one, which a server must not do).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from shared.core.prompt_text import (
    MUQ_SLOT_ROWS,
    GenConfig,
    normalize_lyrics,
    normalize_tags,
    text_ids,
)

__all__ = ["GenConfig", "Prompt", "PromptBuilder", "normalize_tags"]


@dataclass(frozen=True)
class Prompt:
    tokens: torch.Tensor  # [rows, 9] int64
    mask: torch.Tensor  # [rows, 9] bool
    muq_index: int

    @property
    def length(self) -> int:
        return self.tokens.shape[0]


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, gen_config: GenConfig, num_codebooks: int = 8) -> None:
        self.tokenizer = tokenizer
        self.gen_config = gen_config
        self.num_codebooks = num_codebooks

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> PromptBuilder:
        tokenizer_path = model_dir / "tokenizer.json"
        config_path = model_dir / "gen_config.json"
        for path in (tokenizer_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(f"missing {path.name} in model directory {model_dir}")
        return cls(Tokenizer.from_file(str(tokenizer_path)), GenConfig.from_file(config_path))

    def build(self, tags: str, lyrics: str = "") -> Prompt:
        tag_ids = text_ids(self.tokenizer, self.gen_config, normalize_tags(tags))
        lyric_ids = text_ids(self.tokenizer, self.gen_config, normalize_lyrics(lyrics))
        rows = len(tag_ids) + MUQ_SLOT_ROWS + len(lyric_ids)
        tokens = torch.full((rows, self.num_codebooks + 1), self.gen_config.empty_id)
        tokens[: len(tag_ids), -1] = torch.tensor(tag_ids)
        tokens[len(tag_ids) + MUQ_SLOT_ROWS :, -1] = torch.tensor(lyric_ids)
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        mask[:, -1] = True
        return Prompt(tokens=tokens, mask=mask, muq_index=len(tag_ids))

    def history_rows(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """History codes [8, T] → rows [T, 9] (audio columns on, text column empty) and mask."""
        t = frames.shape[1]
        tokens = torch.full((t, self.num_codebooks + 1), self.gen_config.empty_id)
        tokens[:, :-1] = frames.T.long()
        mask = torch.ones(tokens.shape, dtype=torch.bool)
        mask[:, -1] = False
        return tokens, mask
