"""The math of one engine step, no policy: feed, prefill, sample.

The runner owns the model's static KV caches (`max_rows` rows), the last backbone hidden state
of every row and the token sampler. Given a StepPlan it runs one backbone step for every fed
row at once (each row at its own position), prefills each admitted request, then samples one
frame (codebook 0 + the local decoder's steps) for all rows together. Speed work (batched
prefill, torch.compile, CUDA graphs) belongs here; who runs where is the scheduler's business.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shared.core.constants import CODEC_CODES
from shared.ml.generation.plan import Feed, Prefill, StepOutput, StepPlan
from shared.ml.generation.sampling import RowSampling, SamplingParams, TokenSampler
from shared.ml.models.heartmula import HeartMuLa
from shared.ml.models.prompt import PromptBuilder

# Decode attention reads the cache in blocks of this many positions, so shapes repeat.
KV_BLOCK = 256


class ModelRunner:
    def __init__(
        self,
        model: HeartMuLa,
        prompts: PromptBuilder,
        eos_id: int,
        max_rows: int,
        max_seq_len: int | None = None,
    ) -> None:
        config = model.config
        if not CODEC_CODES < eos_id < config.audio_vocab_size:
            raise ValueError(
                f"gen_config.json: audio_eos_id {eos_id} must lie between the codec codes "
                f"(< {CODEC_CODES}) and the audio vocabulary size {config.audio_vocab_size}"
            )
        self.model = model
        self.prompts = prompts
        model.setup_caches(max_rows, max_seq_len)
        self.context = model.backbone.cache_len
        invalid = [CODEC_CODES, *range(eos_id + 1, config.audio_vocab_size)]
        self.sampler = TokenSampler(config.audio_vocab_size, invalid, eos_id, model.device)
        self.hidden = torch.zeros(
            max_rows, config.backbone.embed_dim, dtype=model.dtype, device=model.device
        )

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        """Feed, prefill, then sample one frame for every request that has its hidden state."""
        if plan.feeds:
            self.feed(plan.feeds)
        failed: dict[int, Exception] = {}
        for prefill in plan.prefills:
            try:
                self.prefill(prefill)
            except Exception as error:  # noqa: BLE001 (e.g. out of memory: this request only)
                failed[prefill.request_id] = error
        draws = [f.draw for f in plan.feeds]
        draws += [p.draw for p in plan.prefills if p.request_id not in failed]
        return StepOutput(self.sample(draws) if draws else None, failed)

    def feed(self, feeds: Sequence[Feed]) -> None:
        """One backbone step for all fed rows, each at its own position."""
        n = max(max(f.rows) for f in feeds) + 1
        frames = np.zeros((n, 1, self.model.config.audio_num_codebooks), dtype=np.int64)
        positions = np.zeros((n, 1), dtype=np.int64)
        for f in feeds:
            frames[f.rows, 0] = f.frame
            positions[f.rows, 0] = f.position
        kv_len = min(self.context, -(-(int(positions.max()) + 1) // KV_BLOCK) * KV_BLOCK)
        device = self.model.device
        x = self.model.embed_frames(torch.from_numpy(frames).to(device))  # [n, 1, D]
        out = self.model.backbone(x, torch.from_numpy(positions).to(device), slice(0, n), kv_len)
        self.hidden[:n] = out[:, -1]

    def prefill(self, prefill: Prefill) -> None:
        """Prompt (+ history) of one request through the backbone in one call; the
        unconditional row of a guided request sees the prompt without its conditioning."""
        device, prompt = self.model.device, prefill.prompt
        tokens, mask = prompt.tokens, prompt.mask  # [L, 9]
        if prefill.history is not None:
            h_tokens, h_mask = self.prompts.history_rows(torch.from_numpy(prefill.history))
            tokens, mask = torch.cat([tokens, h_tokens]), torch.cat([mask, h_mask])
        length, b = tokens.shape[0], len(prefill.rows)
        unconditional = torch.tensor([False, True][:b], device=device)
        x = self.model.embed_sequence(
            tokens.to(device).expand(b, -1, -1),
            mask.to(device).expand(b, -1, -1),
            prompt.muq_index,
            unconditional,
        )  # [b, L, D]
        positions = torch.arange(length, device=device).expand(b, -1)
        rows = torch.tensor(prefill.rows, device=device)
        out = self.model.backbone(x, positions, rows, kv_len=length)
        self.hidden[prefill.rows] = out[:, -1]

    def sample(self, draws: Sequence[SamplingParams]) -> np.ndarray:
        """One frame of codes [n, 8] int32 for batch rows 0..n-1 (n: past the highest row)."""
        n = max(max(d.cond_row, d.uncond_row) for d in draws) + 1
        rows = RowSampling.batch(draws, n, self.model.device)
        codes = self.model.sample_frame(
            self.hidden[:n], lambda logits, k: self.sampler.pick(logits, k, rows)
        )
        return codes.to("cpu", torch.int32).numpy()
