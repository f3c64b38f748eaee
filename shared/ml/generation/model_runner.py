"""The math of one engine step, no policy: prefill the newcomers, then one frame for all rows.

The runner owns the model's static KV caches (`max_rows` rows) and, on the device, everything a
frame step reads: each row's last hidden state, last sampled codes, next position and sampling
settings. Those change only when requests join (a prefill) or leave (rows released), so a frame
step uploads nothing and copies one thing back: the sampled codes [rows, 8].

All requests admitted at one frame boundary prefill in one padded backbone call. The frame step
itself (backbone step for every fed row, then codebook 0 and the local decoder's 7 steps with
sampling) runs on the lowest `bucket` rows, a power of two, with the attention length rounded
up to a power of two, top-k to a power of two, and the draws (one per request: the two rows of
a guided request share one) to a power of two: static shapes per (rows, keys, k, draws), which
is what `torch.compile` and CUDA graphs (one graph per shape, CUDA only) need. Who runs where is
the scheduler's business.

With LoRA adapters (`MultiLoRA`), each row also holds its adapter's slot: written when it joins,
reset when it leaves; adapters the plan installs are copied into their slots before the
prefill, and every model call tells the adapted projections the slots of its rows. A step with
no adapter row skips the low-rank updates altogether (`StepShape.adapters`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shared.core.constants import CODEC_CODES
from shared.ml.generation.plan import Prefill, StepOutput, StepPlan
from shared.ml.generation.sampling import RowSampling, TokenSampler
from shared.ml.models.heartmula import HeartMuLa
from shared.ml.models.multi_lora import MultiLoRA
from shared.ml.models.prompt import PromptBuilder

# Decode attention reads at least this many cache positions, then powers of two, so that a
# 3-minute song meets a handful of shapes.
KV_BLOCK = 256


def power_of_two_at_least(n: int, floor: int = 1) -> int:
    size = floor
    while size < n:
        size *= 2
    return size


@dataclass(frozen=True)
class StepShape:
    """The static shape of one frame step: what a compiled step or a CUDA graph is keyed on."""

    rows: int  # batch rows 0..rows-1 run (a power of two, at most max_rows)
    kv_len: int  # cache positions attended
    top_k: int  # top-k width of the sampler
    draws: int  # sampling rows: one per request (its conditional row), padded
    adapters: bool = False  # some row has a LoRA adapter


class RowState:
    """Per-row device tensors the frame step reads and advances (one entry per batch row)."""

    def __init__(self, rows: int, books: int, dim: int, model: HeartMuLa) -> None:
        device = model.device

        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.hidden = zeros(rows, dim, dtype=model.dtype)  # last backbone output
        self.codes = zeros(rows, books)  # last sampled frame: fed at the next step
        self.position = zeros(rows)  # where that frame enters the backbone
        self.active = zeros(rows, dtype=torch.bool)  # held by a running request
        self.fed = zeros(rows, dtype=torch.bool)  # has sampled a frame that the next step feeds
        self.frame = zeros(rows)  # frames sampled so far (the noise counter)
        index = torch.arange(rows, device=device)
        self.cond, self.uncond = index.clone(), index.clone()  # logits rows of the row's draw
        self.cfg_scale = zeros(rows, dtype=torch.float32) + 1
        self.temperature = zeros(rows, dtype=torch.float32) + 1
        self.top_k = zeros(rows) + 1
        self.seed = zeros(rows)
        self.eos_allowed = zeros(rows, dtype=torch.bool)
        self.adapter_slot = zeros(rows)  # its LoRA adapter's slot; 0: none
        # Set at joins and leaves: the conditional row of every running request, lowest first
        # (padded with row 0), and each row's place in that list.
        self.draws = zeros(rows)
        self.owner = zeros(rows)

    def sampling(self, shape: StepShape) -> RowSampling:
        """The draws of rows 0..rows-1: one per request, gathered from its conditional row."""
        draws = self.draws[: shape.draws]

        def per_draw(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, draws)

        return RowSampling(
            cond=draws,
            uncond=per_draw(self.uncond),
            owner=self.owner[: shape.rows],
            cfg_scale=per_draw(self.cfg_scale),
            temperature=per_draw(self.temperature),
            top_k=per_draw(self.top_k),
            seed=per_draw(self.seed),
            frame=per_draw(self.frame),
            eos_allowed=per_draw(self.eos_allowed),
            max_top_k=shape.top_k,
        )

    @property
    def stepped(self) -> tuple[torch.Tensor, ...]:
        """What a frame step changes besides the caches."""
        return (self.hidden, self.codes, self.position, self.frame, self.fed)

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.stepped]

    def restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self.stepped, saved, strict=True):
            t.copy_(s)


class ModelRunner:
    def __init__(
        self,
        model: HeartMuLa,
        prompts: PromptBuilder,
        eos_id: int,
        max_rows: int,
        max_seq_len: int | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        adapters: MultiLoRA | None = None,
    ) -> None:
        config = model.config
        if not CODEC_CODES < eos_id < config.audio_vocab_size:
            raise ValueError(
                f"gen_config.json: audio_eos_id {eos_id} must lie between the codec codes "
                f"(< {CODEC_CODES}) and the audio vocabulary size {config.audio_vocab_size}"
            )
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError(f"cuda_graphs: needs a CUDA device, the model is on {model.device}")
        self.model = model
        self.prompts = prompts
        self.max_rows = max_rows
        self.adapters = adapters
        model.setup_caches(max_rows, max_seq_len)
        self.context = model.backbone.cache_len
        invalid = [CODEC_CODES, *range(eos_id + 1, config.audio_vocab_size)]
        self.sampler = TokenSampler(config.audio_vocab_size, invalid, eos_id, model.device)
        self.state = RowState(
            max_rows, config.audio_num_codebooks, config.backbone.embed_dim, model
        )
        # Host mirrors (set at join and release only): which rows run, their top-k, and the
        # conditional row of the request holding each.
        self._active = [False] * max_rows
        self._top_k = [0] * max_rows
        self._adapter_slot = [0] * max_rows
        self._cond = [0] * max_rows
        self._num_draws = 0
        self._step: Callable[[StepShape], torch.Tensor] = self.frame_step
        if compile:
            # One compiled variant per StepShape; allow as many as the shapes we may meet.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._step = torch.compile(self.frame_step, dynamic=False)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[StepShape, torch.cuda.CUDAGraph] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        """Release rows, prefill newcomers, then sample one frame for every running row."""
        if plan.released:
            self.release(plan.released)
        for install in plan.installs:
            assert self.adapters is not None  # the scheduler plans installs only with slots
            self.adapters.install(install.slot, install.weights)
        failed = self.admit(plan.prefills)
        if not any(self._active):
            return StepOutput(None, failed)
        positions = [f.position for f in plan.feeds]
        positions += [p.prompt.length + _history_len(p) for p in plan.prefills]
        try:
            codes = self.run_step(self.shape(max(positions) + 1))
        finally:
            self._select(None)  # outside a step the model is the base model
        return StepOutput(codes.to("cpu", torch.int32).numpy(), failed)

    # ----- joins and leaves -------------------------------------------------------------------

    def release(self, rows: list[int]) -> None:
        """Rows whose request ended: idle until a newcomer takes them."""
        index = torch.tensor(rows, device=self.model.device)
        for t in (self.state.active, self.state.fed):
            t[index] = False
        self.state.position[index] = 0
        self.state.adapter_slot[index] = 0
        for t in (self.state.cond, self.state.uncond):
            t[index] = index  # an idle row draws from itself: always inside any bucket
        for r in rows:
            self._active[r] = False
            self._adapter_slot[r] = 0
        self._set_draws()

    def admit(self, prefills: Sequence[Prefill]) -> dict[int, Exception]:
        """Prefill all newcomers in one call; if that fails, one by one to find who fails."""
        if not prefills:
            return {}
        try:
            self.prefill(prefills)
            done, failed = list(prefills), {}
        except Exception as error:  # noqa: BLE001 (e.g. out of memory: isolate the culprit)
            if len(prefills) == 1:
                return {prefills[0].request_id: error}
            done, failed = [], {}
            for p in prefills:
                try:
                    self.prefill([p])
                    done.append(p)
                except Exception as single:  # noqa: BLE001 (this request only)
                    failed[p.request_id] = single
        self.join(done)
        return failed

    def prefill(self, prefills: Sequence[Prefill]) -> None:
        """Prompts (+ history) of several requests through the backbone in one padded call.

        Each request's rows see its own prompt; the unconditional row of a guided request sees
        it without conditioning. Shorter prompts are padded at the end: the padding writes
        cache positions that the row's first frames overwrite before anyone attends to them.
        """
        device = self.model.device
        embedded, rows, last, slots = [], [], [], []
        for p in prefills:
            tokens, mask = p.prompt.tokens, p.prompt.mask  # [L, 9]
            if p.history is not None:
                h_tokens, h_mask = self.prompts.history_rows(torch.from_numpy(p.history))
                tokens, mask = torch.cat([tokens, h_tokens]), torch.cat([mask, h_mask])
            b = len(p.rows)
            unconditional = torch.tensor([False, True][:b], device=device)
            x = self.model.embed_sequence(
                tokens.to(device).expand(b, -1, -1),
                mask.to(device).expand(b, -1, -1),
                p.prompt.muq_index,
                unconditional,
            )  # [b, L, D]
            embedded.append(x)
            rows += p.rows
            last += [tokens.shape[0] - 1] * b
            slots += [p.adapter_slot] * b
        length = max(x.shape[1] for x in embedded)
        x = torch.cat(
            [torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1])) for x in embedded]
        )
        positions = torch.arange(length, device=device).expand(len(rows), -1)
        index = torch.tensor(rows, device=device)
        self._select(torch.tensor(slots, device=device) if any(slots) else None)
        try:
            out = self.model.backbone(x, positions, index, kv_len=length)  # [B, length, D]
        finally:
            self._select(None)
        self.state.hidden[index] = out[torch.arange(len(rows), device=device), last]

    def join(self, prefills: Sequence[Prefill]) -> None:
        """Write the newcomers' sampling settings and positions into the row state."""
        if not prefills:
            return
        rows, values = [], {name: [] for name in _DRAW_FIELDS}
        for p in prefills:
            d = p.draw
            for r in p.rows:
                rows.append(r)
                self._active[r] = True
                self._top_k[r] = d.top_k
                self._adapter_slot[r] = p.adapter_slot
                self._cond[r] = d.cond_row
                values["cond"].append(d.cond_row)
                values["uncond"].append(d.uncond_row)
                values["cfg_scale"].append(d.cfg_scale)
                values["temperature"].append(d.temperature)
                values["top_k"].append(d.top_k)
                values["seed"].append(d.seed)
                values["frame"].append(d.frame)
                values["eos_allowed"].append(d.eos_allowed)
                values["position"].append(p.prompt.length + _history_len(p))
                values["adapter_slot"].append(p.adapter_slot)
        index = torch.tensor(rows, device=self.model.device)
        for name, column in values.items():
            target = getattr(self.state, name)
            target[index] = torch.tensor(column, dtype=target.dtype).to(target.device)
        self.state.active[index] = True
        self.state.fed[index] = False
        self._set_draws()

    def _set_draws(self) -> None:
        """One draw per running request, at its conditional row; every row points to its
        request's draw (idle rows to the first: their tokens are never read)."""
        draws = sorted({self._cond[r] for r, a in enumerate(self._active) if a})
        self._num_draws = len(draws)
        place = {row: i for i, row in enumerate(draws)}
        owner = [place[self._cond[r]] if a else 0 for r, a in enumerate(self._active)]
        padded = draws + [0] * (self.max_rows - len(draws))
        device = self.model.device
        self.state.draws.copy_(torch.tensor(padded, dtype=torch.int64).to(device))
        self.state.owner.copy_(torch.tensor(owner, dtype=torch.int64).to(device))

    # ----- the frame step ---------------------------------------------------------------------

    def shape(self, positions_needed: int) -> StepShape:
        highest = max(r for r, a in enumerate(self._active) if a)
        top_k = max(k for k, a in zip(self._top_k, self._active, strict=True) if a)
        rows = min(power_of_two_at_least(highest + 1), self.max_rows)
        return StepShape(
            rows=rows,
            kv_len=min(power_of_two_at_least(positions_needed, KV_BLOCK), self.context),
            top_k=min(power_of_two_at_least(top_k), self.sampler.vocab_size),
            draws=min(power_of_two_at_least(self._num_draws), rows),
            adapters=any(
                slot and a for slot, a in zip(self._adapter_slot, self._active, strict=True)
            ),
        )

    def run_step(self, shape: StepShape) -> torch.Tensor:
        """One frame step: eager, compiled, or the replay of this shape's CUDA graph."""
        if not self.cuda_graphs:
            return self._step(shape)
        graph = self._graphs.get(shape)
        if graph is None:
            graph = self._graphs[shape] = self._capture(shape)
        graph.replay()
        return self.state.codes[: shape.rows]

    def _capture(self, shape: StepShape) -> torch.cuda.CUDAGraph:
        """Record the step for this shape. The warm-up runs it for real on a side stream, so
        the state it advances is put back (its cache writes are the ones the replay repeats)."""
        saved = self.state.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(shape)
        torch.cuda.current_stream().wait_stream(side)
        self.state.restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._step(shape)
        return graph

    def frame_step(self, shape: StepShape) -> torch.Tensor:
        """Feed every fed row's last frame, then sample one frame for rows 0..rows-1.

        Static shapes, no host reads: rows joined this step (not fed) keep their prefill hidden
        state, and their throwaway backbone write at their next position is overwritten when
        their first frame is fed there. Returns the new codes [rows, 8] (a view of the state).
        """
        s, n = self.state, shape.rows
        self._select(s.adapter_slot[:n] if shape.adapters else None)
        fed = s.fed[:n]
        x = self.model.embed_frames(s.codes[:n].unsqueeze(1))  # [n, 1, D]
        out = self.model.backbone(x, s.position[:n].unsqueeze(1), slice(0, n), shape.kv_len)
        hidden = torch.where(fed.unsqueeze(1), out[:, -1], s.hidden[:n])
        s.hidden[:n] = hidden
        rows = s.sampling(shape)
        keys = self.sampler.frame_keys(rows, s.codes.shape[1]).unbind(1)  # 8 x [draws]
        codes = self.model.sample_frame(
            hidden, lambda logits, k: self.sampler.pick(logits, k, rows, keys[k])
        )
        s.codes[:n] = codes
        s.position[:n] += fed.long()
        s.frame[:n] += s.active[:n].long()
        s.fed[:n] = s.active[:n]
        return s.codes[:n]

    def _select(self, slots: torch.Tensor | None) -> None:
        """The adapter slots of the next model call's rows (None: no adapters)."""
        if self.adapters is not None:
            self.adapters.select(slots)


_DRAW_FIELDS = (
    "cond",
    "uncond",
    "cfg_scale",
    "temperature",
    "top_k",
    "seed",
    "frame",
    "eos_allowed",
    "position",
    "adapter_slot",
)


def _history_len(prefill: Prefill) -> int:
    return 0 if prefill.history is None else prefill.history.shape[1]
