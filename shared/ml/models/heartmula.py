"""HeartMuLa: the music language model (global backbone + local decoder over 8 codebooks).

Parameter names follow the official checkpoint (torchtune naming), so a real
`HeartMuLa-oss-3B/` folder loads without renaming. One 80 ms frame is 9 columns: 8 audio
codebooks and a text column (last). The backbone predicts codebook 0 from the sequence; the
small local decoder then predicts codebooks 1..7 from [backbone hidden, previous codes].
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.core.constants import AUDIO_EOS_ID, AUDIO_VOCAB, CONTEXT_POSITIONS, NUM_CODEBOOKS
from shared.ml.models.checkpoint import CheckpointError, assign_state, read_tensors, shard_files
from shared.ml.models.llama import Transformer, TransformerSpec

# torchtune's flavors: layers, heads, kv heads, width, MLP width, context positions.
FLAVORS: dict[str, TransformerSpec] = {
    "llama-3B": TransformerSpec(28, 24, 8, 3072, 8192, CONTEXT_POSITIONS),  # unrelated-literal: MLP
    "llama-300M": TransformerSpec(3, 8, 4, 3072, 8192, 2048),  # unrelated-literal: MLP
    "llama-7B": TransformerSpec(32, 32, 8, 4096, 14336, CONTEXT_POSITIONS),
    "llama-400M": TransformerSpec(4, 8, 4, 3072, 8192, 2048),  # unrelated-literal: MLP
}


@dataclass(frozen=True)
class HeartMuLaConfig:
    """The model's config.json.

    Official files name flavors (`backbone_flavor`, `decoder_flavor`). Custom and tiny models
    may instead give explicit sizes in `backbone_spec` / `decoder_spec` objects whose fields are
    those of `TransformerSpec` (num_layers, num_heads, num_kv_heads, embed_dim,
    intermediate_dim, max_seq_len, and optionally norm_eps and the rope_* settings); an
    explicit spec wins over the flavor name.
    """

    backbone: TransformerSpec
    decoder: TransformerSpec
    text_vocab_size: int = 128_256
    audio_vocab_size: int = AUDIO_VOCAB
    audio_num_codebooks: int = NUM_CODEBOOKS
    muq_dim: int = 512
    backbone_flavor: str = "llama-3B"
    decoder_flavor: str = "llama-300M"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeartMuLaConfig:
        specs = {}
        for part in ("backbone", "decoder"):
            flavor = data.get(f"{part}_flavor", "custom")
            explicit = data.get(f"{part}_spec")
            if explicit is not None:
                specs[part] = TransformerSpec(**explicit)
            elif flavor in FLAVORS:
                specs[part] = FLAVORS[flavor]
            else:
                raise ValueError(
                    f"config.json: unknown {part}_flavor {flavor!r} (known: {sorted(FLAVORS)}) "
                    f"and no {part}_spec with explicit sizes"
                )
            specs[f"{part}_flavor"] = flavor
        known = ("text_vocab_size", "audio_vocab_size", "audio_num_codebooks", "muq_dim")
        config = cls(
            backbone=specs["backbone"],
            decoder=specs["decoder"],
            backbone_flavor=specs["backbone_flavor"],
            decoder_flavor=specs["decoder_flavor"],
            **{k: int(data[k]) for k in known if k in data},
        )
        if config.audio_vocab_size <= AUDIO_EOS_ID:
            raise ValueError(f"audio_vocab_size must exceed {AUDIO_EOS_ID} (the audio EOS id)")
        return config

    def to_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["HeartMuLa"],
            "backbone_flavor": self.backbone_flavor,
            "decoder_flavor": self.decoder_flavor,
            "backbone_spec": asdict(self.backbone),
            "decoder_spec": asdict(self.decoder),
            "text_vocab_size": self.text_vocab_size,
            "audio_vocab_size": self.audio_vocab_size,
            "audio_num_codebooks": self.audio_num_codebooks,
            "muq_dim": self.muq_dim,
        }


# Picks one token per row from float32 logits [rows, vocab] for the given codebook.
TokenPicker = Callable[[torch.Tensor, int], torch.Tensor]


class HeartMuLa(nn.Module):
    def __init__(self, config: HeartMuLaConfig) -> None:
        super().__init__()
        self.config = config
        bdim, ddim = config.backbone.embed_dim, config.decoder.embed_dim
        vocab, books = config.audio_vocab_size, config.audio_num_codebooks
        self.backbone = Transformer(config.backbone)
        self.decoder = Transformer(config.decoder)
        self.text_embeddings = nn.Embedding(config.text_vocab_size, bdim)
        self.audio_embeddings = nn.Embedding(vocab * books, bdim)
        self.unconditional_text_embedding = nn.Embedding(1, bdim)
        self.projection = nn.Linear(bdim, ddim, bias=False)
        self.codebook0_head = nn.Linear(bdim, vocab, bias=False)
        self.audio_head = nn.Parameter(torch.empty(books - 1, ddim, vocab))
        self.muq_linear = nn.Linear(config.muq_dim, bdim)

    @property
    def dtype(self) -> torch.dtype:
        return self.projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.projection.weight.device

    def setup_caches(self, rows: int, seq_len: int | None = None) -> None:
        """Allocate static caches for `rows` batch rows (decoder cache holds one frame)."""
        seq_len = seq_len or self.config.backbone.max_seq_len
        self.backbone.setup_caches(rows, seq_len)
        self.decoder.setup_caches(rows, self.config.audio_num_codebooks)

    def embed_audio(self, codebook: int, tokens: torch.Tensor) -> torch.Tensor:
        return self.audio_embeddings(tokens + codebook * self.config.audio_vocab_size)

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Audio frames [B, S, 8] → backbone input [B, S, D] (sum over the 8 codebooks)."""
        offsets = torch.arange(self.config.audio_num_codebooks, device=frames.device)
        ids = frames + offsets * self.config.audio_vocab_size
        return self.audio_embeddings(ids).sum(dim=2)

    def embed_sequence(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        muq_index: int,
        unconditional: torch.Tensor,
    ) -> torch.Tensor:
        """Prompt/history rows [B, S, 9] with column mask → backbone input [B, S, D].

        Each position sums the embeddings of its active columns. Rows flagged unconditional
        (the guidance half of a request) see `unconditional_text_embedding` in place of every
        text embedding and of the muq slot.
        """
        b, s, _ = tokens.shape
        text = self.text_embeddings(tokens[:, :, -1])
        uncond = self.unconditional_text_embedding.weight.view(1, 1, -1)
        text = torch.where(unconditional.view(b, 1, 1), uncond, text)
        offsets = torch.arange(self.config.audio_num_codebooks, device=tokens.device)
        audio = self.audio_embeddings(tokens[:, :, :-1] + offsets * self.config.audio_vocab_size)
        columns = torch.cat([audio, text.unsqueeze(2)], dim=2)
        h = (columns * mask.unsqueeze(-1).to(columns.dtype)).sum(dim=2)
        # The muq slot carries a style embedding; released weights have no style encoder, so
        # it is muq_linear(zeros) (its bias) like the reference, or the unconditional vector.
        muq = self.muq_linear(torch.zeros(self.config.muq_dim, dtype=h.dtype, device=h.device))
        h[:, muq_index] = torch.where(unconditional.view(b, 1), uncond.view(1, -1), muq)
        return h

    def sample_frame(self, hidden: torch.Tensor, pick: TokenPicker) -> torch.Tensor:
        """Last backbone hidden [n, D] of rows 0..n-1 → one frame of codes [n, 8].

        Codebook 0 comes from `codebook0_head`; the local decoder then runs over
        [hidden, emb(c0)] at positions 0-1 and one new code embedding per step after that
        (every row at the same positions: each step attends exactly to what is written).
        """
        rows = slice(0, hidden.shape[0])
        code = pick(self.codebook0_head(hidden).float(), 0)
        codes = [code]
        x = torch.stack([hidden, self.embed_audio(0, code)], dim=1)
        start = 0
        for k in range(1, self.config.audio_num_codebooks):
            out = self.decoder(self.projection(x), start, rows)
            logits = torch.mm(out[:, -1], self.audio_head[k - 1]).float()
            code = pick(logits, k)
            codes.append(code)
            start += x.shape[1]
            x = self.embed_audio(k, code).unsqueeze(1)
        return torch.stack(codes, dim=1)


def load_heartmula(folder: Path, device: torch.device, dtype: torch.dtype) -> HeartMuLa:
    """Load a `HeartMuLa-oss-*` folder (config.json + safetensors shards) unchanged."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"HeartMuLa config not found: {config_path}")
    config = HeartMuLaConfig.from_dict(json.loads(config_path.read_text()))
    with torch.device("meta"):
        model = HeartMuLa(config)
    assign_state(model, read_tensors(shard_files(folder), device, dtype), folder)
    return model.eval().requires_grad_(False)


def heartmula_folder(model_dir: Path, version: str | None = None) -> Path:
    """`MODEL_DIR/HeartMuLa-oss-{version}`; without a version, the only such folder present."""
    if version:
        return model_dir / f"HeartMuLa-oss-{version}"
    found = sorted(p for p in model_dir.glob("HeartMuLa-oss-*") if p.is_dir())
    if len(found) != 1:
        names = [p.name for p in found] or "none"
        raise CheckpointError(
            f"cannot choose a HeartMuLa model in {model_dir} (found: {names}); name the version"
        )
    return found[0]
