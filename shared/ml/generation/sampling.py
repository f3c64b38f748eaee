"""Per-row top-k sampling with counter-based randomness.

Each request draws its noise from a hash of (seed, frame, codebook, token id) instead of a
shared generator, so its tokens depend only on its own inputs and seed, never on which other
requests share the batch, and no generator state has to be carried between frames. Sampling
is the Gumbel-max trick over the top-k candidates: argmax(logit / T + Gumbel) draws from
softmax(logit / T) restricted to the top k, exactly what the reference's
argmax(p / Exp(1)) draw does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32): int64 products wrap modulo 2**64 on every
    backend, and the low 32 bits of the wrapped product are those of the true one."""
    return (x * c) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xor-shift-multiply, 'lowbias32' constants)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_from_hash(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes → float32 uniforms strictly inside (0, 1)."""
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def _noise_key(seed: torch.Tensor, frame: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """hash(seed, hash(frame, codebook)): the key every token's noise of one draw hangs on."""
    counter = hash32(frame * 16 + codebook.to(frame.device))
    return hash32((seed & _MASK32) ^ hash32((seed >> 32) ^ counter))


@dataclass(frozen=True)
class SamplingParams:
    """One request's draw of one frame: where its logits are and how to sample them."""

    cond_row: int  # batch row of its conditional logits
    uncond_row: int  # batch row of its unconditional logits (cond_row without guidance)
    cfg_scale: float
    temperature: float
    top_k: int
    seed: int  # non-negative
    frame: int  # the request's own frame counter: its noise never depends on the batch
    eos_allowed: bool  # False for requests that must fill every frame


@dataclass
class RowSampling:
    """Sampling state of the rows that draw tokens this frame (one per request), on device.

    `cond` and `uncond` index the logits rows of each request (equal when it has no guidance);
    `owner` maps every batch row to the request row whose token it receives (both rows of a
    guided request get its one draw), so top-k and the vocabulary-wide guidance run once per
    request, not once per batch row.
    """

    cond: torch.Tensor  # [p] int64
    uncond: torch.Tensor  # [p] int64
    owner: torch.Tensor  # [n] int64
    cfg_scale: torch.Tensor  # [p] float32
    temperature: torch.Tensor  # [p] float32
    top_k: torch.Tensor  # [p] int64
    seed: torch.Tensor  # [p] int64, non-negative
    frame: torch.Tensor  # [p] int64
    eos_allowed: torch.Tensor  # [p] bool
    max_top_k: int

    @classmethod
    def batch(
        cls, draws: Sequence[SamplingParams], num_rows: int, device: torch.device
    ) -> RowSampling:
        """Stack the draws of one frame, field by field, for batch rows 0..num_rows-1."""
        owner = torch.zeros(num_rows, dtype=torch.int64)
        for i, draw in enumerate(draws):
            owner[[draw.cond_row, draw.uncond_row]] = i

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device)

        return cls(
            cond=column([d.cond_row for d in draws], torch.int64),
            uncond=column([d.uncond_row for d in draws], torch.int64),
            owner=owner.to(device),
            cfg_scale=column([d.cfg_scale for d in draws], torch.float32),
            temperature=column([d.temperature for d in draws], torch.float32),
            top_k=column([d.top_k for d in draws], torch.int64),
            seed=column([d.seed for d in draws], torch.int64),
            frame=column([d.frame for d in draws], torch.int64),
            eos_allowed=column([d.eos_allowed for d in draws], torch.bool),
            max_top_k=max(d.top_k for d in draws),
        )


class TokenSampler:
    """Draws one token per request from guided, temperature-scaled, top-k filtered logits."""

    def __init__(
        self, vocab_size: int, invalid_ids: list[int], eos_id: int, device: torch.device
    ) -> None:
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.invalid = torch.tensor(invalid_ids, dtype=torch.int64, device=device)
        self.token_ids = torch.arange(vocab_size, device=device, dtype=torch.int64)
        self.token_hash = hash32(self.token_ids)

    def row_keys(self, rows: RowSampling, codebook: int) -> torch.Tensor:
        """The noise key [p] of each row's draw for one codebook."""
        return _noise_key(rows.seed, rows.frame, torch.tensor(codebook))

    def frame_keys(self, rows: RowSampling, books: int) -> torch.Tensor:
        """The keys [p, books] of every codebook of this frame at once (one hash per frame
        instead of one per codebook); column k equals `row_keys(rows, k)`."""
        codebooks = torch.arange(books, device=rows.seed.device)
        return _noise_key(rows.seed.unsqueeze(1), rows.frame.unsqueeze(1), codebooks)

    def pick(
        self,
        logits: torch.Tensor,
        codebook: int,
        rows: RowSampling,
        key: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float logits [n, vocab] for all batch rows → token ids [n] (int64).

        `key`: this codebook's noise keys [p] when already computed (see `frame_keys`)."""
        uncond = logits.index_select(0, rows.uncond)  # index_select: a fraction of x[index]
        guided = logits.index_select(0, rows.cond) - uncond  # in place from here on
        guided = guided.mul_(rows.cfg_scale.unsqueeze(1)).add_(uncond)
        guided.index_fill_(1, self.invalid, float("-inf"))  # a few columns, not a vocab pass
        guided[:, self.eos_id].masked_fill_(~rows.eos_allowed, float("-inf"))
        k = min(rows.max_top_k, self.vocab_size)
        values, ids = guided.topk(k, dim=-1)
        # Temperature after the cut: dividing by T > 0 keeps the order, and only k values pay.
        values = values / rows.temperature.unsqueeze(1)
        rank = self.token_ids[:k]  # 0..k-1
        values = values.masked_fill(rank >= rows.top_k.unsqueeze(1), float("-inf"))
        if key is None:
            key = self.row_keys(rows, codebook)
        u = uniform_from_hash(hash32(key.unsqueeze(1) ^ self.token_hash.take(ids)))
        choice = (values - torch.log(-torch.log(u))).argmax(dim=-1, keepdim=True)
        tokens = ids.gather(1, choice).squeeze(1)
        return tokens.index_select(0, rows.owner)
