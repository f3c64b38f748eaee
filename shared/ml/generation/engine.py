"""The batched generation engine: many requests, one model, continuous batching.

One engine owns a HeartMuLa with static KV caches of `max_rows` rows. A request takes one row
(two with classifier-free guidance: a conditional and an unconditional row) from admission
until it ends, then its rows go to the next request. At every frame boundary the engine
1. drops requests that were aborted (so abort costs at most one frame),
2. runs one backbone step for every running request at once, each row at its own position,
3. admits waiting requests into free rows with one prefill of prompt + history each,
4. samples one frame (codebook 0 + 7 local-decoder steps) for all rows together.
Workers call `submit` from many threads while `start()` runs the loop in one thread; tests and
one-shot runs call `generate`, which drives the same loop inline.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from shared.ml.generation.sampling import RowSampling, TokenSampler
from shared.ml.models.checkpoint import resolve_device, resolve_dtype
from shared.ml.models.heartmula import (
    CODEC_CODES,
    HeartMuLa,
    heartmula_folder,
    load_heartmula,
)
from shared.ml.models.prompt import Prompt, PromptBuilder

FRAME_MS = 80
# Decode attention reads the cache in blocks of this many positions, so shapes repeat.
KV_BLOCK = 256

FinishReason = Literal["length", "eos", "aborted"]


class RequestError(ValueError):
    """A request the engine refuses; `field` names the offending parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ContextOverflowError(RequestError):
    """Prompt + history + new frames do not fit the model's context."""


@dataclass(frozen=True)
class GenerationRequest:
    tags: str
    lyrics: str = ""
    duration_s: float = 120.0
    temperature: float = 1.0
    top_k: int = 50
    cfg_scale: float = 1.5
    seed: int = 0
    history: np.ndarray | None = None  # [8, T] codes to continue from
    stop_at_eos: bool = True  # False: audio EOS is never sampled, every frame is filled

    @property
    def frames(self) -> int:
        return round(self.duration_s * 1000) // FRAME_MS

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def validate(self) -> None:
        if not math.isfinite(self.duration_s) or self.frames < 1:
            raise RequestError("duration_s", f"must be at least {FRAME_MS / 1000} s")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise RequestError("temperature", "must be a positive number")
        if self.top_k < 1:
            raise RequestError("top_k", "must be at least 1")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale > 0):
            raise RequestError("cfg_scale", "must be a positive number")
        if not 0 <= self.seed < 2**63:
            raise RequestError("seed", "must be in [0, 2**63)")
        if self.history is not None:
            h = self.history
            if h.ndim != 2 or h.shape[0] != 8 or h.shape[1] < 1:
                raise RequestError("history", f"must have shape [8, T>=1], got {list(h.shape)}")
            if not np.issubdtype(h.dtype, np.integer) or h.min() < 0 or h.max() >= CODEC_CODES:
                raise RequestError("history", f"codes must be integers in [0, {CODEC_CODES})")


@dataclass
class GenerationResult:
    tokens: np.ndarray  # [8, T] int32: the new frames only (history not repeated)
    finish_reason: FinishReason
    prompt_length: int  # prompt rows in tokens (tags + muq slot + lyrics)
    seed: int


ProgressCallback = Callable[[int, int], None]  # (frames done, frames requested)


class GenerationHandle:
    """A submitted request: wait for its result or cancel it (effective within one frame)."""

    def __init__(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length
        self.future: Future[GenerationResult] = Future()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancelled.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()


@dataclass
class _Job:
    request: GenerationRequest
    prompt: Prompt
    handle: GenerationHandle
    on_progress: ProgressCallback | None
    should_abort: Callable[[], bool] | None
    frames: list[np.ndarray] = field(default_factory=list)

    def aborted(self) -> bool:
        return self.handle.cancel_requested or bool(self.should_abort and self.should_abort())


@dataclass
class _Running:
    job: _Job
    rows: list[int]  # batch rows: [conditional] or [conditional, unconditional]
    next_position: int = 0  # where the last sampled frame is fed next step

    @property
    def end(self) -> int:
        """One past its highest row: the batch must span rows 0..end-1 to include it."""
        return max(self.rows) + 1


class GenerationEngine:
    def __init__(
        self,
        model: HeartMuLa,
        prompts: PromptBuilder,
        max_rows: int = 16,
        max_seq_len: int | None = None,
    ) -> None:
        config = model.config
        self.eos_id = prompts.gen_config.audio_eos_id  # gen_config.json, 8193 when official
        if not CODEC_CODES < self.eos_id < config.audio_vocab_size:
            raise ValueError(
                f"gen_config.json: audio_eos_id {self.eos_id} must lie between the codec codes "
                f"(< {CODEC_CODES}) and the audio vocabulary size {config.audio_vocab_size}"
            )
        self.model = model
        self.prompts = prompts
        self.max_rows = max_rows
        model.setup_caches(max_rows, max_seq_len)
        self.context = model.backbone.cache_len
        invalid = [CODEC_CODES, *range(self.eos_id + 1, config.audio_vocab_size)]
        self.sampler = TokenSampler(config.audio_vocab_size, invalid, self.eos_id, model.device)
        self.hidden = torch.zeros(
            max_rows, config.backbone.embed_dim, dtype=model.dtype, device=model.device
        )
        self._rows: list[_Running | None] = [None] * max_rows
        self._running: list[_Running] = []
        self._pending: deque[_Job] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path,
        version: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_rows: int = 16,
    ) -> GenerationEngine:
        """Load tokenizer, gen_config and HeartMuLa-oss-{version} from a model directory."""
        dev = resolve_device(device)
        model = load_heartmula(heartmula_folder(model_dir, version), dev, resolve_dtype(dtype, dev))
        return cls(model, PromptBuilder.from_model_dir(model_dir), max_rows=max_rows)

    @property
    def active_requests(self) -> int:
        return len(self._running)

    @property
    def pending_requests(self) -> int:
        with self._lock:
            return len(self._pending)

    # ----- submitting -------------------------------------------------------------------------

    def submit(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None = None,
        should_abort: Callable[[], bool] | None = None,
    ) -> GenerationHandle:
        """Queue a request; invalid or oversized requests raise here, before any work."""
        request.validate()
        if request.guided and self.max_rows < 2:
            raise RequestError("cfg_scale", "guidance needs two batch rows; this engine has one")
        prompt = self.prompts.build(request.tags, request.lyrics)
        history = 0 if request.history is None else request.history.shape[1]
        needed = prompt.length + history + request.frames
        if needed > self.context:
            room = self.context - prompt.length - history
            raise ContextOverflowError(
                "duration_s",
                f"prompt ({prompt.length} tokens) + history ({history} frames) + "
                f"{request.frames} new frames = {needed} positions, over the model's "
                f"{self.context}-position context; at most {max(room, 0)} new frames "
                f"({max(room, 0) * FRAME_MS / 1000:.2f} s) fit",
            )
        handle = GenerationHandle(prompt.length)
        with self._lock:
            self._pending.append(_Job(request, prompt, handle, on_progress, should_abort))
            self._lock.notify()
        return handle

    def generate(
        self, requests: Sequence[GenerationRequest], on_progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """Run requests to completion in this thread, batched together."""
        if self._thread is not None:
            raise RuntimeError("generate() drives the engine inline; the loop thread is running")
        handles = [self.submit(r, on_progress) for r in requests]
        while not all(h.done() for h in handles):
            self.step()
        return [h.result() for h in handles]

    # ----- background loop --------------------------------------------------------------------

    def start(self) -> None:
        """Run the frame loop in a daemon thread until stop()."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(
                target=self._loop, name="generation-engine", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop; requests still waiting or running fail (nobody waits forever)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
            pending, self._pending = list(self._pending), deque()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        stopped = RuntimeError("the generation engine was stopped")
        self._fail_running(stopped)
        for job in pending:
            job.handle.future.set_exception(stopped)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._pending or self._running):
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 (a failed batch must not kill the loop)
                self._fail_running(error)

    # ----- one frame --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Advance every request by one frame and admit what fits."""
        for run in [r for r in self._running if r.job.aborted()]:
            self._finish(run, "aborted")
        self._drop_aborted_pending()
        if self._running:
            self._feed_last_frames()
        self._admit()
        if not self._running:
            return
        n = max(r.end for r in self._running)
        rows = self._row_sampling(n)
        codes = self.model.sample_frame(
            self.hidden[:n], lambda logits, k: self.sampler.pick(logits, k, rows)
        )
        codes = codes.to("cpu", torch.int32).numpy()
        for run in list(self._running):
            self._record_frame(run, codes[run.rows[0]])

    def _drop_aborted_pending(self) -> None:
        with self._lock:
            waiting = list(self._pending)
        aborted = [j for j in waiting if j.aborted()]  # callbacks run outside the lock
        with self._lock:
            for job in aborted:
                self._pending.remove(job)
        for job in aborted:
            self._resolve(job, "aborted")

    def _feed_last_frames(self) -> None:
        """One backbone step for all running rows, each at its own position."""
        n = max(r.end for r in self._running)
        frames = np.zeros((n, 1, self.model.config.audio_num_codebooks), dtype=np.int64)
        positions = np.zeros((n, 1), dtype=np.int64)
        for run in self._running:
            frames[run.rows, 0] = run.job.frames[-1]
            positions[run.rows, 0] = run.next_position
            run.next_position += 1
        kv_len = min(self.context, -(-(int(positions.max()) + 1) // KV_BLOCK) * KV_BLOCK)
        device = self.model.device
        x = self.model.embed_frames(torch.from_numpy(frames).to(device))
        out = self.model.backbone(x, torch.from_numpy(positions).to(device), slice(0, n), kv_len)
        self.hidden[:n] = out[:, -1]

    def _admit(self) -> None:
        """Waiting requests take the lowest free rows, first come first served."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                job = self._pending[0]
                free = [r for r, owner in enumerate(self._rows) if owner is None]
                needed = 2 if job.request.guided else 1
                if len(free) < needed:
                    return
                self._pending.popleft()
            run = _Running(job, free[:needed])
            for r in run.rows:
                self._rows[r] = run
            self._running.append(run)
            try:
                self._prefill(run)
            except Exception as error:  # noqa: BLE001 (e.g. out of memory: this request only)
                self._release(run)
                job.handle.future.set_exception(error)

    def _prefill(self, run: _Running) -> None:
        """Prompt (+ history) of one request through the backbone in one call."""
        job, device = run.job, self.model.device
        tokens, mask = job.prompt.tokens, job.prompt.mask
        if job.request.history is not None:
            h_tokens, h_mask = self.prompts.history_rows(torch.from_numpy(job.request.history))
            tokens, mask = torch.cat([tokens, h_tokens]), torch.cat([mask, h_mask])
        length, b = tokens.shape[0], len(run.rows)
        unconditional = torch.tensor([False, True][:b], device=device)
        x = self.model.embed_sequence(
            tokens.to(device).expand(b, -1, -1),
            mask.to(device).expand(b, -1, -1),
            job.prompt.muq_index,
            unconditional,
        )
        positions = torch.arange(length, device=device).expand(b, -1)
        rows = torch.tensor(run.rows, device=device)
        out = self.model.backbone(x, positions, rows, kv_len=length)
        self.hidden[run.rows] = out[:, -1]
        run.next_position = length

    def _row_sampling(self, n: int) -> RowSampling:
        owner = np.zeros(n, dtype=np.int64)
        cond, uncond, ints, floats, eos = [], [], [], [], []
        for i, run in enumerate(self._running):
            req = run.job.request
            cond.append(run.rows[0])
            uncond.append(run.rows[-1])
            owner[run.rows] = i
            ints.append((req.top_k, req.seed, len(run.job.frames)))
            floats.append((req.cfg_scale, req.temperature))
            eos.append(req.stop_at_eos)
        device = self.model.device
        ints_t = torch.tensor(ints, dtype=torch.int64).to(device)
        floats_t = torch.tensor(floats, dtype=torch.float32).to(device)
        return RowSampling(
            cond=torch.tensor(cond).to(device),
            uncond=torch.tensor(uncond).to(device),
            owner=torch.from_numpy(owner).to(device),
            cfg_scale=floats_t[:, 0],
            temperature=floats_t[:, 1],
            top_k=ints_t[:, 0],
            seed=ints_t[:, 1],
            frame=ints_t[:, 2],
            eos_allowed=torch.tensor(eos).to(device),
            max_top_k=max(i[0] for i in ints),
        )

    def _record_frame(self, run: _Running, frame: np.ndarray) -> None:
        job = run.job
        if (frame >= self.eos_id).any():
            self._finish(run, "eos")
            return
        job.frames.append(frame)
        if job.on_progress is not None:
            try:
                job.on_progress(len(job.frames), job.request.frames)
            except Exception as error:  # noqa: BLE001 (the caller's failure ends its request)
                self._release(run)
                job.handle.future.set_exception(error)
                return
        if len(job.frames) >= job.request.frames:
            self._finish(run, "length")

    # ----- ending requests --------------------------------------------------------------------

    def _release(self, run: _Running) -> None:
        for r in run.rows:
            self._rows[r] = None
        self._running.remove(run)

    def _finish(self, run: _Running, reason: FinishReason) -> None:
        self._release(run)
        self._resolve(run.job, reason)

    def _resolve(self, job: _Job, reason: FinishReason) -> None:
        books = self.model.config.audio_num_codebooks
        tokens = np.stack(job.frames, axis=1) if job.frames else np.zeros((books, 0), np.int32)
        job.handle.future.set_result(
            GenerationResult(tokens.astype(np.int32), reason, job.prompt.length, job.request.seed)
        )

    def _fail_running(self, error: Exception) -> None:
        for run in list(self._running):
            self._release(run)
            run.job.handle.future.set_exception(error)
