"""HeartCodec encoder: audio of any rate, mono or stereo → tokens [8, frames] at 12.5 Hz.

Loads the official `HeartCodec-oss-encoder/` folder (encoder_config.json + encoder.safetensors,
tensors named `encoder.*`) and quantizes with the RVQ of the decoder checkpoint
`HeartCodec-oss/` (only its `flow_matching.vq_embed.*` tensors are read): the encoder release
carries no quantizer of its own.

Audio is resampled to 24 kHz stereo on CPU, cut into 29.76 s chunks (372 frames each) that
run through the network in batches; frames = samples_24k // 1920 + 1, which is
int(seconds · 12.5) + 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from shared.core.constants import CODEC_SAMPLE_RATE, CODEC_SAMPLES_PER_FRAME
from shared.core.progress import AbortCheck, Progress, check_abort
from shared.ml.codec.decoder import CODEC_FOLDER
from shared.ml.codec.features import (
    DEFAULT_FEATURES_CONFIG,
    TAIL_SAMPLES,
    HeartCodecFeatureExtractors,
    merge_config,
)
from shared.ml.codec.query import HeartCodecQueryEncoder
from shared.ml.codec.rvq import ResidualVQ, normalize_initted
from shared.ml.models.checkpoint import (
    CheckpointError,
    assign_state,
    read_tensors,
    resolve_device,
    resolve_dtype,
    shard_files,
)

ENCODER_FOLDER = "HeartCodec-oss-encoder"
CONFIG_NAME = "encoder_config.json"
WEIGHTS_NAME = "encoder.safetensors"
ENCODER_PREFIX = "encoder."
RVQ_PREFIX = "flow_matching.vq_embed."

VERSION = "vqv12"
CHUNK_SAMPLES = 714_240  # 29.76 s at 24 kHz
FRAMES_PER_CHUNK = CHUNK_SAMPLES // CODEC_SAMPLES_PER_FRAME  # 372

DEFAULT_ENCODER_CONFIG: dict[str, Any] = {
    "version": VERSION,
    "chunk_samples": CHUNK_SAMPLES,
    "feature_extractors": DEFAULT_FEATURES_CONFIG,
    "query": {"dim": 512, "num_layers": 6, "head_dim": 128, "interval": 2},
}


class EncoderNotFoundError(CheckpointError):
    """The model directory has no encoder checkpoint, so audio cannot be tokenized."""


class HeartCodecEncoderNetwork(nn.Module):
    """Stereo 24 kHz chunks [B, 2, 714240 + 240] → latents [B, 372, dim] (official names)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        if config.get("version") != VERSION or config.get("chunk_samples") != CHUNK_SAMPLES:
            raise CheckpointError(
                f"unsupported encoder config: version {config.get('version')!r}, chunk_samples "
                f"{config.get('chunk_samples')!r} (expected {VERSION!r}, {CHUNK_SAMPLES})"
            )
        self.feature_extractors = HeartCodecFeatureExtractors(config["feature_extractors"])
        self.query = HeartCodecQueryEncoder(self.feature_extractors.output_dims, **config["query"])

    def forward(self, audio: Tensor) -> Tensor:
        features = self.feature_extractors(audio)
        dtype = self.query.cls_token.dtype
        return self.query(*(f.to(dtype) for f in features))


def read_encoder_config(folder: Path) -> dict[str, Any]:
    """encoder_config.json merged over the released defaults (the file may name only changes)."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"encoder config not found: {path}")
    try:
        overrides = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    return merge_config(DEFAULT_ENCODER_CONFIG, overrides)


def token_frames(samples_24k: int) -> int:
    """Token frames for audio of this many 24 kHz samples: a partial last frame counts."""
    return samples_24k // CODEC_SAMPLES_PER_FRAME + 1


def _nested(prefix: str, module: nn.Module) -> nn.Module:
    """Wrap `module` so its state-dict names carry `prefix` (errors then name official keys)."""
    for name in reversed(prefix.rstrip(".").split(".")):
        holder = nn.Module()
        holder.add_module(name, module)
        module = holder
    return module


def _weight_norm_names(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Older files store weight norm as `weight_g`/`weight_v`; torch's parametrization names
    them `parametrizations.weight.original0`/`original1`. Accept both."""
    renamed = {}
    for key, value in tensors.items():
        for old, new in (("weight_g", "original0"), ("weight_v", "original1")):
            if key.endswith("." + old):
                key = f"{key[: -len(old)]}parametrizations.weight.{new}"
        renamed[key] = value
    return renamed


def load_codec_rvq(codec_folder: Path, device: torch.device) -> ResidualVQ:
    """The decoder checkpoint's RVQ (fp32: nearest-code search is precision sensitive)."""
    tensors = read_tensors(shard_files(codec_folder), device, torch.float32, prefix=RVQ_PREFIX)
    normalize_initted(tensors)
    project_in = tensors.get(RVQ_PREFIX + "project_in.weight")
    embed = tensors.get(RVQ_PREFIX + "layers.0._codebook.embed")
    if project_in is None or embed is None:
        missing = "project_in.weight" if project_in is None else "layers.0._codebook.embed"
        raise CheckpointError(f"{codec_folder}: missing tensor(s): {RVQ_PREFIX}{missing}")
    layer_prefix = RVQ_PREFIX + "layers."
    layers = {k[len(layer_prefix) :].split(".")[0] for k in tensors if k.startswith(layer_prefix)}
    codebook_dim, dim = project_in.shape
    with torch.device("meta"):
        rvq = ResidualVQ(len(layers), embed.shape[1], dim, codebook_dim)
    assign_state(_nested(RVQ_PREFIX, rvq), tensors, codec_folder)
    return rvq.eval().requires_grad_(False)


class HeartCodecEncoder:
    """The loaded encoder network and RVQ on one device; `tokenize` turns audio into tokens."""

    def __init__(
        self, network: HeartCodecEncoderNetwork, quantizer: ResidualVQ, batch_size: int = 4
    ) -> None:
        if network.query.dim != quantizer.project_in.in_features:
            raise CheckpointError(
                f"encoder latents have {network.query.dim} dims but the codec's RVQ expects "
                f"{quantizer.project_in.in_features}: encoder and codec checkpoints do not match"
            )
        self.network = network.eval().requires_grad_(False)
        self.quantizer = quantizer.eval().requires_grad_(False)
        self.batch_size = batch_size
        self.device = quantizer.project_in.weight.device

    @torch.inference_mode()
    def tokenize(
        self,
        audio: np.ndarray | Tensor,
        sample_rate: int,
        *,
        batch_size: int | None = None,
        on_progress: Progress | None = None,
        should_abort: AbortCheck | None = None,
    ) -> np.ndarray:
        """Audio [channels, samples] or [samples] (1 or 2 channels) → int32 tokens [8, frames].

        `batch_size` chunks (default: the encoder's) run through the network at once;
        `on_progress("encoding", chunks done / chunks)` is called after each batch;
        `should_abort()` is checked before each batch and raises Aborted.
        """
        batch_size = batch_size or self.batch_size
        stereo = _stereo_24k(audio, sample_rate)
        frames = token_frames(stereo.shape[-1])
        chunks = math.ceil(frames / FRAMES_PER_CHUNK)
        stereo = F.pad(stereo, (0, chunks * CHUNK_SAMPLES - stereo.shape[-1]))
        stereo = stereo.reshape(2, chunks, CHUNK_SAMPLES).transpose(0, 1)  # [chunks, 2, S]
        codes = []
        for start in range(0, chunks, batch_size):
            check_abort(should_abort, f"encoding aborted after {start} of {chunks} chunks")
            batch = F.pad(stereo[start : start + batch_size], (0, TAIL_SAMPLES))
            latents = self.network(batch.to(self.device))
            codes.append(self.quantizer.quantize(latents.float()).cpu())  # [B, Q, 372]
            if on_progress is not None:
                on_progress("encoding", min(start + batch_size, chunks) / chunks)
        tokens = torch.cat(codes, dim=0).permute(1, 0, 2).flatten(1)[:, :frames]
        return tokens.numpy().astype(np.int32)


def _stereo_24k(audio: np.ndarray | Tensor, sample_rate: int) -> Tensor:
    """Validate and convert to float32 [2, samples] at 24 kHz on CPU (mono is duplicated).

    Resampling stays on CPU like the reference's, whose filters were built there.
    """
    from torchaudio.functional import resample

    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        raise ValueError(f"sample_rate must be an integer number of Hz, got {sample_rate!r}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    wave = torch.as_tensor(audio).detach().to("cpu", torch.float32)
    if wave.ndim == 1:
        wave = wave.unsqueeze(0)
    if wave.ndim != 2 or wave.shape[0] not in (1, 2):
        raise ValueError(
            f"audio must be shaped [samples] or [channels, samples] with 1 or 2 channels, "
            f"got {tuple(wave.shape)}"
        )
    if wave.shape[-1] == 0:
        raise ValueError("audio is empty")
    if not torch.isfinite(wave).all():
        raise ValueError("audio contains NaN or infinite samples")
    wave = wave.expand(2, -1)
    if sample_rate != CODEC_SAMPLE_RATE:
        wave = resample(wave, int(sample_rate), CODEC_SAMPLE_RATE)
    return wave


def load_encoder(
    model_dir: Path, device: str | None = None, dtype: str | None = None
) -> HeartCodecEncoder:
    """Load `model_dir/HeartCodec-oss-encoder/` with the RVQ of `model_dir/HeartCodec-oss/`.

    fp32 unless a dtype is asked for (as the reference recommends); the RVQ is always fp32.
    Raises EncoderNotFoundError (a CheckpointError) naming the folder when there is no encoder.
    """
    folder = Path(model_dir) / ENCODER_FOLDER
    if not folder.is_dir():
        raise EncoderNotFoundError(
            f"encoder checkpoint folder not found: {folder} (put HeartMuLa/HeartCodec-oss-encoder "
            "there to enable encoding)"
        )
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"encoder weights not found: {weights}")
    config = read_encoder_config(folder)
    target = resolve_device(device)
    with torch.device("meta"):
        network = HeartCodecEncoderNetwork(config)
    weight_dtype = resolve_dtype(dtype or "fp32", target)
    tensors = _weight_norm_names(read_tensors([weights], target, weight_dtype))
    assign_state(_nested(ENCODER_PREFIX, network), tensors, weights)
    # Buffers the file does not hold (the 24→16 kHz filter) were built on CPU: move them.
    network.to(target)
    return HeartCodecEncoder(network, load_codec_rvq(Path(model_dir) / CODEC_FOLDER, target))
