"""A plain per-frame generation loop in the style of the official heartlib one: the baseline.

One song, no engine: guidance as a batch of two rows, one `sample_frame` call per frame with a
reference-style top-k sampler (temperature, top-k cut, softmax, multinomial), the new frame
checked for EOS and kept on the host every frame, then embedded and fed back. Like heartlib
(torchtune caches), each backbone step attends over the whole cache with a causal mask unless
`exact_keys` asks for only the positions written so far (leaner than the reference). The
local decoder is the model's own `sample_frame` (exact keys: leaner than heartlib's masked
8-slot cache), so model speedups help both sides. Same model, same math; what differs from
the engine is the per-frame overhead it pays.
"""

from __future__ import annotations

import numpy as np
import torch

from shared.ml.generation.request import GenerationRequest
from shared.ml.models.heartmula import HeartMuLa, TokenPicker
from shared.ml.models.prompt import PromptBuilder


def reference_pick(request: GenerationRequest, generator: torch.Generator) -> TokenPicker:
    """heartlib's guided `sample_topk`: one token per song, repeated to both rows."""

    def pick(logits: torch.Tensor, _codebook: int) -> torch.Tensor:
        cond, uncond = logits[:1], logits[-1:]
        guided = uncond + (cond - uncond) * request.cfg_scale
        guided = guided / request.temperature
        pivot = guided.topk(request.top_k, dim=-1).values[:, -1:]
        guided = guided.masked_fill(guided < pivot, float("-inf"))
        probs = guided.softmax(dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return token.expand(logits.shape[0])

    return pick


@torch.inference_mode()
def reference_generate(
    model: HeartMuLa,
    prompts: PromptBuilder,
    request: GenerationRequest,
    eos_id: int,
    exact_keys: bool = False,
) -> np.ndarray:
    """Codes [8, T] of one song; the model's caches must hold at least two rows."""
    device = model.device
    rows = 2 if request.guided else 1
    prompt = prompts.build(request.tags, request.lyrics)
    x = model.embed_sequence(
        prompt.tokens.to(device).expand(rows, -1, -1),
        prompt.mask.to(device).expand(rows, -1, -1),
        prompt.muq_index,
        torch.tensor([False, True][:rows], device=device),
    )
    length = prompt.length
    positions = torch.arange(length, device=device).expand(rows, -1)
    hidden = model.backbone(x, positions, slice(0, rows), length)[:, -1]
    generator = torch.Generator(device=device).manual_seed(request.seed)
    pick = reference_pick(request, generator)
    frames = []
    for t in range(request.frames):
        frame = model.sample_frame(hidden, pick)  # [rows, 8]
        if bool((frame[0] >= eos_id).any()):
            break
        frames.append(frame[0].cpu().numpy())
        position = torch.full((rows, 1), length + t, device=device)
        x = model.embed_frames(frame.unsqueeze(1))
        keys = length + t + 1 if exact_keys else model.backbone.cache_len
        hidden = model.backbone(x, position, slice(0, rows), keys)[:, -1]
    return np.stack(frames, axis=1) if frames else np.zeros((8, 0), np.int64)
