"""The objective HeartMuLa was trained with, teacher forced over whole sequences.

A training sequence is the official prompt (tags, muq slot, lyrics) followed by the song's
frames, exactly as an extend job feeds them. The backbone's hidden state before frame t predicts
frame t's codebook 0; the local decoder, run over [that hidden state, emb(c0) .. emb(c6)],
predicts codebooks 1..7. Prompt rows carry no loss. An example drawn unconditional sees
`unconditional_text_embedding` in every text row (and the muq slot), as the guidance half of a
generation batch does, so classifier-free guidance keeps working after fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.ml.models.heartmula import HeartMuLa
from shared.ml.models.prompt import Prompt, PromptBuilder


@dataclass(frozen=True)
class Example:
    """One training sequence: a prompt and at most (context - prompt rows) frames."""

    prompt: Prompt
    frames: torch.Tensor  # [T, 8] int64 codec codes

    @property
    def positions(self) -> int:
        return self.prompt.length + self.frames.shape[0] - 1  # the last frame is no input


@dataclass(frozen=True)
class Losses:
    codebook0: torch.Tensor  # mean CE of the backbone's codebook-0 head over every frame
    codebooks_rest: torch.Tensor  # mean CE of the local decoder over codebooks 1..7

    @property
    def total(self) -> torch.Tensor:
        return self.codebook0 + self.codebooks_rest


def _inputs(
    model: HeartMuLa, prompts: PromptBuilder, examples: list[Example], unconditional: torch.Tensor
) -> torch.Tensor:
    """Backbone inputs [B, S, D], right-padded with zeros (causal: padding is never seen)."""
    rows = []
    for example, uncond in zip(examples, unconditional, strict=True):
        history, history_mask = prompts.history_rows(example.frames[:-1].T)
        tokens = torch.cat([example.prompt.tokens, history]).to(model.device)
        mask = torch.cat([example.prompt.mask, history_mask]).to(model.device)
        rows.append(
            model.embed_sequence(
                tokens[None], mask[None], example.prompt.muq_index, uncond.view(1)
            )[0]
        )
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [B, S, D]


def compute_losses(
    model: HeartMuLa,
    prompts: PromptBuilder,
    examples: list[Example],
    unconditional: torch.Tensor,
    checkpointing: bool = False,
) -> Losses:
    """Cross-entropy of a batch of examples; `unconditional` [B] bool picks text dropout."""
    device = model.device
    hidden = model.backbone.forward_causal(
        _inputs(model, prompts, examples, unconditional), checkpointing
    )  # [B, S, D]
    # The hidden state at position L-1+t (the row before frame t) predicts frame t.
    before_frame = torch.cat(
        [hidden[i, ex.prompt.length - 1 : ex.positions] for i, ex in enumerate(examples)]
    )  # [N, D], N = frames in the batch
    codes = torch.cat([ex.frames for ex in examples]).to(device)  # [N, 8]
    books = model.config.audio_num_codebooks
    loss0 = F.cross_entropy(model.codebook0_head(before_frame).float(), codes[:, 0])
    # Local decoder: [hidden, emb(c0), .., emb(c6)] at positions 0..7; output k predicts c(k+1).
    embedded = torch.stack([model.embed_audio(k, codes[:, k]) for k in range(books - 1)], dim=1)
    local = model.projection(torch.cat([before_frame[:, None], embedded], dim=1))  # [N, 8, Dd]
    out = model.decoder.forward_causal(local, checkpointing)[:, 1:]  # [N, 7, Dd]
    logits = torch.einsum("nkd,kdv->nkv", out, model.audio_head)  # [N, 7, V]
    loss_rest = F.cross_entropy(logits.float().flatten(0, 1), codes[:, 1:].flatten())
    return Losses(loss0, loss_rest)
