"""The text of HeartMuLa's prompt, torch-free: how tags and lyrics are normalised and tokenised,
and so how many context positions a prompt takes.

`shared.ml.models.prompt` builds the model's prompt tensors from these same functions, and the
gateway counts prompt rows with them at submit, so "prompt + frames fit the context" is decided
the same way at the door and in the worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

from shared.core.constants import AUDIO_EOS_ID

MUQ_SLOT_ROWS = 1  # the row between tags and lyrics that carries the muq embedding


@dataclass(frozen=True)
class GenConfig:
    """gen_config.json: the special ids of the tokenizer and the model."""

    text_bos_id: int = 128000
    text_eos_id: int = 128001
    audio_eos_id: int = AUDIO_EOS_ID
    empty_id: int = 0

    @classmethod
    def from_file(cls, path: Path) -> GenConfig:
        data = json.loads(path.read_text())
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})


def normalize_tags(tags: str) -> str:
    """'Piano, Happy ' or '<tag>piano,happy</tag>' → '<tag>piano,happy</tag>'."""
    body = tags.strip().lower().removeprefix("<tag>").removesuffix("</tag>")
    parts = [p.strip() for p in body.split(",")]
    return "<tag>" + ",".join(p for p in parts if p) + "</tag>"


def normalize_lyrics(lyrics: str) -> str:
    return lyrics.strip().lower()


def text_ids(tokenizer: Tokenizer, gen_config: GenConfig, text: str) -> list[int]:
    """Token ids of `text` with exactly one BOS first and one EOS last."""
    ids = tokenizer.encode(text).ids
    bos, eos = gen_config.text_bos_id, gen_config.text_eos_id
    if not ids or ids[0] != bos:
        ids = [bos, *ids]
    if ids[-1] != eos:
        ids = [*ids, eos]
    return ids


class PromptCounter:
    """Prompt rows (tags + muq slot + lyrics) of a request, exactly with the model's tokenizer.

    Without one (no model directory at the gateway) it counts an upper bound: UTF-8 bytes plus
    the framing rows, since a byte-level BPE (Llama 3's, HeartMuLa's) never makes more tokens
    than bytes. The bound refuses nothing that fits and may refuse long lyrics that would.
    """

    def __init__(self, tokenizer: Tokenizer | None, gen_config: GenConfig | None) -> None:
        self.tokenizer = tokenizer
        self.gen_config = gen_config or GenConfig()

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def _rows(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.encode()) + 2
        return len(text_ids(self.tokenizer, self.gen_config, text))

    def rows(self, tags: str, lyrics: str) -> int:
        """Context positions the prompt of `tags` and `lyrics` takes."""
        tag_rows = self._rows(normalize_tags(tags))
        return tag_rows + MUQ_SLOT_ROWS + self._rows(normalize_lyrics(lyrics))


@lru_cache(maxsize=4)
def prompt_counter(model_dir: Path | None) -> PromptCounter:
    """The counter of a model directory (tokenizer.json, gen_config.json), loaded once; the
    byte bound when there is no model directory or it holds no tokenizer."""
    if model_dir is None or not (model_dir / "tokenizer.json").is_file():
        return PromptCounter(None, None)
    config = model_dir / "gen_config.json"
    return PromptCounter(
        Tokenizer.from_file(str(model_dir / "tokenizer.json")),
        GenConfig.from_file(config) if config.is_file() else None,
    )
