"""The models of one worker process, loaded once and shared by all its task threads.

A GPU-queue worker holds one GenerationEngine (its frame loop in a background thread, so
concurrent generate jobs batch together) and one codec decoder, with a CodecBatcher over it
(its own loop thread, so concurrent decodes share estimator batches); a CPU-queue worker holds
the codec encoder; a train-queue worker holds the base model it fine-tunes (LoRA layers are added
per job and taken out after). Each is loaded on first use, or up front by `preload`.

Songs with a LoRA adapter (`adapter_id`) run on the same engine as every other song: each batch
row adds its own adapter's update, up to HEARTCLUSTER_ADAPTER_SLOTS adapters stay resident on the
device (least recently used evicted first), and a job reads its adapter from the object store in
its own thread when the adapter is not resident.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from shared.core.config import Settings
from shared.core.inputs import InputResolver
from shared.core.jobs import Job
from shared.core.jobtypes import ADAPTER_FILES
from shared.core.storage import METADATA
from shared.core.tokens import InputError
from shared.ml.codec.batching import CodecBatcher
from shared.ml.codec.decoder import load_codec
from shared.ml.codec.encoder import EncoderNotFoundError, HeartCodecEncoder, load_encoder
from shared.ml.generation.engine import AdapterCapacity, AdapterRef, GenerationEngine
from shared.ml.models.checkpoint import CheckpointError, resolve_device, resolve_dtype
from shared.ml.models.heartmula import HeartMuLa, heartmula_folder, load_heartmula
from shared.ml.models.prompt import PromptBuilder
from shared.ml.models.tiny import NOISE_WARNING, TINY_VERSION, write_tiny_models
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

    def engine(self) -> GenerationEngine:
        with self._load_lock:
            if self._engine is None:
                s = self.settings
                log.info("loading HeartMuLa-oss-%s from %s", self.model_version, self.model_dir)
                engine = GenerationEngine.from_model_dir(
                    self.model_dir,
                    self.model_version,
                    s.device,
                    s.dtype,
                    s.engine_max_rows,
                    compile=s.engine_compile,
                    cuda_graphs=s.engine_cuda_graphs,
                    adapters=AdapterCapacity(
                        s.adapter_slots, s.adapter_max_rank, s.adapter_targets
                    ),
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

    def adapter(self, finetune: Job, resolver: InputResolver) -> AdapterRef:
        """The LoRA adapter of a succeeded fine-tune, for the engine: its files are read from
        the object store (in the job's thread) only when it is not resident. One trained on
        another base model version cannot be served here."""

        def files() -> dict[str, bytes]:
            _, metadata = resolver.artifact(finetune, (METADATA,))
            version = json.loads(metadata).get("model_version")
            if version != self.model_version:
                raise InputError(
                    "adapter_id",
                    f"adapter {finetune.id} was trained on HeartMuLa-oss-{version}; this worker "
                    f"serves HeartMuLa-oss-{self.model_version}",
                )
            return {name: resolver.artifact(finetune, (name,))[1] for name in ADAPTER_FILES}

        return AdapterRef(finetune.id, files)

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
