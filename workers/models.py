"""The models of one worker process, loaded once and shared by all its task threads.

A GPU-queue worker holds one GenerationEngine (its frame loop in a background thread, so
concurrent generate jobs batch together) and one codec decoder, with a CodecBatcher over it
(its own loop thread, so concurrent decodes share estimator batches); a CPU-queue worker holds
the codec encoder; a train-queue worker holds the base model it fine-tunes (LoRA layers are added
per job and taken out after). Each is loaded on first use, or up front by `preload`.

Songs with a LoRA adapter (`adapter_id`) run on a second engine whose model has that adapter
merged into its weights: correct and simple, one adapter at a time per worker (a request for
another adapter waits until the current one's requests are done). Multi-adapter batches will
replace this.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from shared.core.config import Settings
from shared.ml.codec.batching import CodecBatcher
from shared.ml.codec.decoder import load_codec
from shared.ml.codec.encoder import EncoderNotFoundError, HeartCodecEncoder, load_encoder
from shared.ml.generation.engine import GenerationEngine
from shared.ml.models.checkpoint import CheckpointError, resolve_device, resolve_dtype
from shared.ml.models.heartmula import HeartMuLa, heartmula_folder, load_heartmula
from shared.ml.models.prompt import PromptBuilder
from shared.ml.models.tiny import NOISE_WARNING, TINY_VERSION, write_tiny_models
from shared.ml.training.lora import merge_adapter
from shared.ml.transcribe import Transcriber, load_transcriber
from workers import metrics

log = logging.getLogger(__name__)

TINY_MODELS_DIR = "tiny-models"
CODEC_MAX_BATCH = 8  # songs whose windows share one estimator batch
_COMPLETE = ".complete"


def ensure_model_dir(settings: Settings) -> Path:
    """HEARTCLUSTER_MODEL_DIR, or tiny models written once under the data dir (noise!)."""
    if settings.model_dir is not None:
        path = Path(settings.model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"HEARTCLUSTER_MODEL_DIR={path} is not a directory")
        return path
    path = Path(settings.data_dir).resolve() / TINY_MODELS_DIR
    log.warning("HEARTCLUSTER_MODEL_DIR is unset: using tiny models in %s; %s", path, NOISE_WARNING)
    if (path / _COMPLETE).is_file():
        return path
    # Several workers may start at once: build aside, then move into place atomically.
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        write_tiny_models(staging)
        (staging / _COMPLETE).write_text(NOISE_WARNING + "\n")
        os.rename(staging, path)
    except OSError:
        if not (path / _COMPLETE).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


class WorkerModels:
    """Lazily loaded, thread-safe singletons of the models this process serves."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_dir = ensure_model_dir(settings)
        folder = heartmula_folder(self.model_dir, settings.model_version)
        self.model_version = folder.name.removeprefix("HeartMuLa-oss-")
        self.tiny = self.model_version == TINY_VERSION
        self._load_lock = threading.Lock()
        self._engine: GenerationEngine | None = None
        self._batcher: CodecBatcher | None = None
        self._encoder: HeartCodecEncoder | None = None
        self._transcriber: Transcriber | None = None
        self._trainable: HeartMuLa | None = None
        self.train_lock = threading.Lock()  # one fine-tune at a time on the trainable model
        self._prompts: PromptBuilder | None = None
        self._adapter_turn = threading.Condition()
        self._adapter_engine: tuple[str, GenerationEngine] | None = None
        self._adapter_users = 0

    def engine(self) -> GenerationEngine:
        with self._load_lock:
            if self._engine is None:
                s = self.settings
                log.info("loading HeartMuLa-oss-%s from %s", self.model_version, self.model_dir)
                engine = GenerationEngine.from_model_dir(
                    self.model_dir, self.model_version, s.device, s.dtype, s.engine_max_rows
                )
                engine.start()
                self._engine = engine
            return self._engine

    def codec_batcher(self) -> CodecBatcher:
        """The codec decoder behind its batching loop, the only way jobs decode: concurrent
        jobs' windows share estimator batches, and the loop is the codec's only user."""
        with self._load_lock:
            if self._batcher is None:
                log.info("loading the HeartCodec decoder from %s", self.model_dir)
                codec = load_codec(self.model_dir, self.settings.device)
                self._batcher = CodecBatcher(codec, CODEC_MAX_BATCH, on_batch=metrics.codec_batch)
                self._batcher.start()
            return self._batcher

    def encoder(self) -> HeartCodecEncoder:
        with self._load_lock:
            if self._encoder is None:
                log.info("loading the HeartCodec encoder from %s", self.model_dir)
                self._encoder = load_encoder(
                    self.model_dir, self.settings.device, self.settings.dtype
                )
            return self._encoder

    def transcriber(self) -> Transcriber:
        with self._load_lock:
            if self._transcriber is None:
                log.info("loading HeartTranscriptor from %s", self.model_dir)
                self._transcriber = load_transcriber(
                    self.model_dir, self.settings.device, self.settings.dtype
                )
            return self._transcriber

    def prompts(self) -> PromptBuilder:
        with self._load_lock:
            if self._prompts is None:
                self._prompts = PromptBuilder.from_model_dir(self.model_dir)
            return self._prompts

    def _base_model(self, dtype: torch.dtype | None = None) -> HeartMuLa:
        device = resolve_device(self.settings.device)
        folder = heartmula_folder(self.model_dir, self.settings.model_version)
        return load_heartmula(folder, device, dtype or resolve_dtype(self.settings.dtype, device))

    def trainable(self) -> HeartMuLa:
        """The base model fine-tunes add their LoRA layers to: fp32 on CPU; bf16 weights on a
        GPU (the LoRA weights train in fp32 under bf16 autocast), so the 3B fits 24 GB."""
        with self._load_lock:
            if self._trainable is None:
                device = resolve_device(self.settings.device)
                dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
                log.info("loading HeartMuLa-oss-%s to fine-tune", self.model_version)
                self._trainable = self._base_model(dtype)
            return self._trainable

    @contextmanager
    def adapter_engine(
        self, adapter_id: str, files: Callable[[], dict[str, bytes]]
    ) -> Iterator[GenerationEngine]:
        """An engine running the base model with adapter `adapter_id` merged in (`files` reads
        the adapter when it is not the one loaded). One adapter at a time: a request for
        another waits until the current adapter's requests are done, then replaces it."""
        with self._adapter_turn:
            while (
                self._adapter_engine is not None
                and self._adapter_engine[0] != adapter_id
                and self._adapter_users
            ):
                self._adapter_turn.wait()
            if self._adapter_engine is None or self._adapter_engine[0] != adapter_id:
                if self._adapter_engine is not None:
                    self._adapter_engine[1].stop()
                    self._adapter_engine = None
                log.info("loading HeartMuLa-oss-%s with adapter %s", self.model_version, adapter_id)
                model = merge_adapter(self._base_model(), files())
                engine = GenerationEngine(
                    model, self.prompts(), max_rows=self.settings.engine_max_rows
                )
                engine.start()
                self._adapter_engine = (adapter_id, engine)
            self._adapter_users += 1
            engine = self._adapter_engine[1]
        try:
            yield engine
        finally:
            with self._adapter_turn:
                self._adapter_users -= 1
                self._adapter_turn.notify_all()

    def preload(self, queues: set[str]) -> None:
        """Load what the consumed queues need, so the first job does not pay for it."""
        if "gpu" in queues:
            self.engine()
            self.codec_batcher()
        if "train" in queues:
            self.trainable()
        if "cpu" in queues:
            # Both optional: their jobs fail saying which folder is missing.
            try:
                self.encoder()
            except EncoderNotFoundError as error:
                log.warning("%s; encode jobs will fail until it is there", error)
            try:
                self.transcriber()
            except CheckpointError as error:
                log.warning("%s; transcribe jobs will fail until it is there", error)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()
        if self._batcher is not None:
            self._batcher.stop()
        if self._adapter_engine is not None:
            self._adapter_engine[1].stop()
