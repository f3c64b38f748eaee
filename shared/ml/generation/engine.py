"""The batched generation engine: many requests, one model, continuous batching.

Each step is three calls, like vLLM v1's engine core: the Scheduler decides who runs and in
which batch rows (bookkeeping, no tensors), the ModelRunner does that step's math (feed the
last frames, prefill new requests, sample one frame for all rows), and the Scheduler records
the frames, ending requests that are done and freeing their rows. Workers call `submit` from
many threads while `start()` runs the loop in one thread; tests and one-shot runs call
`generate`, which drives the same loop inline.

With `adapters` (an AdapterCapacity), requests may name a LoRA adapter: rows with different
adapters and rows without one share every step (shared/ml/models/multi_lora.py), the adapters
staying resident in device slots, least recently used evicted first (adapter_slots.py).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from shared.core.progress import AbortCheck, Progress
from shared.ml.generation.adapter_slots import AdapterSlots
from shared.ml.generation.model_runner import ModelRunner
from shared.ml.generation.request import (
    AdapterRef,
    ContextOverflowError,
    FinishReason,
    GenerationHandle,
    GenerationRequest,
    GenerationResult,
    RequestError,
)
from shared.ml.generation.scheduler import Scheduler
from shared.ml.models.checkpoint import resolve_device, resolve_dtype
from shared.ml.models.heartmula import HeartMuLa, heartmula_folder, load_heartmula
from shared.ml.models.multi_lora import AdapterCapacity, AdapterError, LoRAWeights, MultiLoRA
from shared.ml.models.prompt import PromptBuilder

__all__ = [
    "AdapterCapacity",
    "AdapterRef",
    "ContextOverflowError",
    "FinishReason",
    "GenerationEngine",
    "GenerationHandle",
    "GenerationRequest",
    "GenerationResult",
    "RequestError",
]


class GenerationEngine:
    def __init__(
        self,
        model: HeartMuLa,
        prompts: PromptBuilder,
        max_rows: int = 16,
        max_seq_len: int | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        adapters: AdapterCapacity | None = None,
    ) -> None:
        """`compile`: torch.compile the frame step (one variant per step shape; slow to
        compile on CPU). `cuda_graphs`: replay one CUDA graph per step shape (CUDA only).
        `adapters`: serve LoRA adapters (wraps the model's adapted projections in place)."""
        eos_id = prompts.gen_config.audio_eos_id  # gen_config.json, 8193 when official
        self.model = model
        self.prompts = prompts
        self.max_rows = max_rows
        self.lora = MultiLoRA(model, adapters) if adapters and adapters.slots else None
        self.runner = ModelRunner(
            model,
            prompts,
            eos_id,
            max_rows,
            max_seq_len,
            compile=compile,
            cuda_graphs=cuda_graphs,
            adapters=self.lora,
        )
        self.scheduler = Scheduler(
            max_rows,
            self.runner.context,
            eos_id,
            model.config.audio_num_codebooks,
            AdapterSlots(self.lora.capacity.slots) if self.lora is not None else None,
            self.read_adapter if self.lora is not None else None,
        )
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path,
        version: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_rows: int = 16,
        compile: bool = False,
        cuda_graphs: bool = False,
        adapters: AdapterCapacity | None = None,
    ) -> GenerationEngine:
        """Load tokenizer, gen_config and HeartMuLa-oss-{version} from a model directory."""
        dev = resolve_device(device)
        model = load_heartmula(heartmula_folder(model_dir, version), dev, resolve_dtype(dtype, dev))
        return cls(
            model,
            PromptBuilder.from_model_dir(model_dir),
            max_rows=max_rows,
            compile=compile,
            cuda_graphs=cuda_graphs,
            adapters=adapters,
        )

    @property
    def active_requests(self) -> int:
        return self.scheduler.num_running

    @property
    def pending_requests(self) -> int:
        return self.scheduler.num_pending

    # ----- submitting -------------------------------------------------------------------------

    def submit(
        self,
        request: GenerationRequest,
        on_progress: Progress | None = None,
        should_abort: AbortCheck | None = None,
    ) -> GenerationHandle:
        """Queue a request; invalid or oversized requests raise here, before any work.

        `on_progress` hears ("generating", fraction, frames done, frames requested) after
        every frame; `should_abort` is asked every frame and ends the request "aborted".
        """
        request.validate()
        prompt = self.prompts.build(request.tags, request.lyrics)
        return self.scheduler.add(request, prompt, on_progress, should_abort)

    def generate(
        self, requests: Sequence[GenerationRequest], on_progress: Progress | None = None
    ) -> list[GenerationResult]:
        """Run requests to completion in this thread, batched together."""
        if self._thread is not None:
            raise RuntimeError("generate() drives the engine inline; the loop thread is running")
        handles = [self.submit(r, on_progress) for r in requests]
        while not all(h.done() for h in handles):
            self.step()
        return [h.result() for h in handles]

    def read_adapter(self, adapter: AdapterRef) -> LoRAWeights:
        """Read and check an adapter's files for this engine (RequestError naming adapter_id
        if it cannot be served)."""
        assert self.lora is not None  # the scheduler reads adapters only where they are served
        try:
            return self.lora.read(adapter.files())
        except AdapterError as error:
            raise RequestError("adapter_id", f"adapter {adapter.id}: {error}") from None

    # ----- background loop --------------------------------------------------------------------

    def start(self) -> None:
        """Run the frame loop in a daemon thread until stop()."""
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(
                target=self._loop, name="generation-engine", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop; requests still waiting or running fail (nobody waits forever)."""
        self._stopping.set()
        self.scheduler.wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.scheduler.fail_all(RuntimeError("the generation engine was stopped"))

    def _loop(self) -> None:
        while True:
            self.scheduler.wait_for_work(self._stopping.is_set)
            if self._stopping.is_set():
                return
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 (a failed batch must not kill the loop)
                self.scheduler.fail_running(error)

    # ----- one frame --------------------------------------------------------------------------

    def step(self) -> None:
        """Advance every running request by one frame and admit what fits."""
        plan = self.scheduler.schedule()
        if plan.empty:
            return
        output = self.runner.execute(plan)
        self.scheduler.update_from_output(plan, output)
