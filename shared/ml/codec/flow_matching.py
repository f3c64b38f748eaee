"""Codes → 25 Hz latents by flow matching (heartlib's FlowMatching), one window at a time.

The condition is the RVQ lookup of the codes through `cond_feature_emb`, repeated ×2 in
time (12.5 → 25 Hz). An Euler solver integrates the estimator's velocity from noise (t=0)
to the latent (t=1) with classifier-free guidance; a window may start with known latents
(the in-context prefix), which are blended in along the path and restored at the end.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shared.ml.codec.config import LATENT_FRAMES_PER_CODE, HeartCodecConfig
from shared.ml.codec.estimator import FlowEstimator
from shared.ml.codec.rvq import ResidualVQ

# Called after each Euler step with the number of steps done; may raise to stop.
StepCallback = Callable[[int], None]


class FlowMatching(nn.Module):
    def __init__(self, config: HeartCodecConfig) -> None:
        super().__init__()
        self.vq_embed = ResidualVQ(
            num_quantizers=config.num_quantizers,
            codebook_size=config.codebook_size,
            dim=config.dim,
            codebook_dim=config.codebook_dim,
        )
        self.cond_feature_emb = nn.Linear(config.dim, config.dim)
        self.zero_cond_embedding1 = nn.Parameter(torch.zeros(config.dim))
        self.estimator = FlowEstimator(config)
        self.latent_dim = config.out_channels

    def condition(self, codes: torch.Tensor, valid_frames: int | None = None) -> torch.Tensor:
        """Codes [B, Q, N] → condition [B, 2N, dim] at 25 Hz.

        Latent frames from `valid_frames` on (padding the model should not follow) carry the
        learned `zero_cond_embedding1` instead of a code condition.
        """
        cond = self.cond_feature_emb(self.vq_embed.decode(codes))
        cond = cond.repeat_interleave(LATENT_FRAMES_PER_CODE, dim=1)
        if valid_frames is not None and valid_frames < cond.shape[1]:
            cond[:, valid_frames:] = self.zero_cond_embedding1.to(cond.dtype)
        return cond

    def solve(
        self,
        cond: torch.Tensor,
        noise: torch.Tensor,
        prefix: torch.Tensor | None = None,
        steps: int = 10,
        guidance: float = 1.25,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """Euler-integrate noise [B, F, latent] to latents under condition [B, F, dim].

        `prefix` [B, P, latent] are known latents for the first P frames (in context): at
        time t those frames are set to (1-t)·noise + t·prefix before each step, the estimator
        sees them as an extra input channel block, and they are returned unchanged. With
        guidance > 1 the velocity is uncond + guidance · (cond − uncond), where the
        unconditional branch has the whole condition zeroed.
        """
        frames = noise.shape[1]
        known = 0 if prefix is None else prefix.shape[1]
        context = torch.zeros_like(noise)
        if prefix is not None:
            context[:, :known] = prefix
        guided = guidance > 1.0
        if guided:
            fixed = torch.cat(
                [torch.cat([context, context]), torch.cat([torch.zeros_like(cond), cond])],
                dim=-1,
            )
        else:
            fixed = torch.cat([context, cond], dim=-1)
        if fixed.shape[1] != frames:
            raise ValueError(f"condition has {cond.shape[1]} frames, noise has {frames}")

        t_span = torch.linspace(0.0, 1.0, steps + 1)
        x = noise.clone()
        for step in range(steps):
            t, dt = t_span[step].item(), (t_span[step + 1] - t_span[step]).item()
            if known:
                x[:, :known] = (1 - (1 - 1e-6) * t) * noise[:, :known] + t * context[:, :known]
            batch = torch.cat([x, x]) if guided else x
            times = torch.full((batch.shape[0],), t, device=x.device)
            velocity = self.estimator(torch.cat([batch, fixed], dim=-1), times)
            if guided:
                uncond, cond_v = velocity.chunk(2)
                velocity = uncond + guidance * (cond_v - uncond)
            x = x + dt * velocity
            if on_step is not None:
                on_step(step + 1)
        if known:
            x[:, :known] = context[:, :known]
        return x
