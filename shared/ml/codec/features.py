"""The HeartCodec encoder's pretrained feature streams, under the official module names.

Four streams at 25 Hz per audio channel: a MusicFM-style conformer on a 128-band mel of the
24 kHz audio (hidden states 2 and 11: "acoustic" and "semantic"), a Whisper encoder and a
WavLM base model on the audio resampled to 16 kHz (WavLM: mean of hidden states 6–9), each
50 Hz stream averaged over frame pairs. Left and right channels are concatenated per frame.

Transformers' building blocks are used unchanged; the layer loops are driven here because only
some hidden states are needed (the later layers of WavLM and the conformer are never run).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torchaudio
from torch import Tensor, nn
from transformers import (
    Wav2Vec2ConformerConfig,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
    WhisperFeatureExtractor,
)
from transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer import (
    Wav2Vec2ConformerEncoder,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from shared.core.constants import CODEC_SAMPLE_RATE, CODEC_SAMPLES_PER_FRAME, WHISPER_SAMPLE_RATE
from shared.ml.codec.config import LATENT_FRAMES_PER_CODE

# 960: one 25 Hz feature frame (the latent rate) at 24 kHz
FEATURE_FRAME_SAMPLES = CODEC_SAMPLES_PER_FRAME // LATENT_FRAMES_PER_CODE
TAIL_SAMPLES = 240  # zeros after each chunk, as the model was trained with
CONFORMER_STATES = (2, 11)  # acoustic, semantic
WAVLM_STATES = range(6, 10)  # averaged

# The released architecture; encoder_config.json values are merged over these.
DEFAULT_FEATURES_CONFIG: dict[str, Any] = {
    "whisper_config": {
        "d_model": 768,
        "encoder_layers": 12,
        "encoder_attention_heads": 12,
        "encoder_ffn_dim": 3072,
        "num_mel_bins": 80,
        "max_source_positions": 1500,
        "activation_function": "gelu",
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "scale_embedding": False,
    },
    "wavlm_config": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu",
        "hidden_dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "feat_proj_dropout": 0.1,
        "layerdrop": 0.05,
        "layer_norm_eps": 1e-5,
        "feat_extract_norm": "group",
        "feat_extract_activation": "gelu",
        "conv_dim": [512] * 7,
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_bias": False,
        "num_conv_pos_embeddings": 128,
        "num_conv_pos_embedding_groups": 16,
        "num_buckets": 320,
        "max_bucket_distance": 800,
        "do_stable_layer_norm": False,
        "add_adapter": False,
    },
    "muencoder_config": {
        "sample_rate": CODEC_SAMPLE_RATE,
        "n_fft": 2048,
        "hop_length": 240,
        "n_mels": 128,
        "conv_dim": 512,
        "mean": 6.768444971712967,
        "std": 18.417922652295623,
        "conformer_config": {
            "hidden_size": 1024,
            "num_hidden_layers": 12,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "hidden_act": "swish",
            "position_embeddings_type": "rotary",
            "rotary_embedding_base": 10000,
            "max_source_positions": 5000,
            "layer_norm_eps": 1e-5,
            "conv_depthwise_kernel_size": 31,
            "num_conv_pos_embeddings": 128,
            "num_conv_pos_embedding_groups": 16,
            "hidden_dropout": 0.1,
            "attention_dropout": 0.1,
            "activation_dropout": 0.1,
            "conformer_conv_dropout": 0.1,
            "layerdrop": 0.0,
        },
    },
}


def merge_config(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge: a config file may name only the fields it changes."""
    merged = copy.deepcopy(defaults)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class MelSTFT(nn.Module):
    """MusicFM's power mel in dB (the checkpoint stores its window and filter bank)."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> None:
        super().__init__()
        # torchaudio checks the filter values while building it, which meta tensors cannot do.
        with torch.device("cpu"):
            self.mel_stft = torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels
            )
        self.amplitude_to_db = torchaudio.transforms.AmplitudeToDB()

    def forward(self, waveform: Tensor) -> Tensor:
        # STFT and logarithm in fp32 whatever the weights' dtype.
        return self.amplitude_to_db(self.mel_stft.float()(waveform.float()))


class Res2dModule(nn.Module):
    """Residual 2-D conv block of MusicFM's front end."""

    def __init__(self, idim: int, odim: int, stride: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(idim, odim, 3, padding=1, stride=stride)
        self.bn1 = nn.BatchNorm2d(odim)
        self.conv2 = nn.Conv2d(odim, odim, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(odim)
        self.relu = nn.ReLU()
        self.has_shortcut_conv = idim != odim or stride[0] > 1
        if self.has_shortcut_conv:
            self.conv3 = nn.Conv2d(idim, odim, 3, padding=1, stride=stride)
            self.bn3 = nn.BatchNorm2d(odim)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = self.bn3(self.conv3(x)) if self.has_shortcut_conv else x
        return self.relu(shortcut + out)


class Conv2dSubsampling(nn.Module):
    """Mel [B, bands, T] → [B, T/4, odim]: two stride-2 residual blocks, then a projection."""

    def __init__(self, hidden: int, odim: int, n_bands: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            Res2dModule(1, hidden, (2, 2)), Res2dModule(hidden, hidden, (2, 2))
        )
        self.linear = nn.Linear(hidden * n_bands // 4, odim)

    def forward(self, mel: Tensor) -> Tensor:
        x = self.conv(mel.unsqueeze(1))  # [B, C, bands/4, T/4]
        return self.linear(x.permute(0, 3, 1, 2).flatten(2))


class MuEncoder(nn.Module):
    """MusicFM-style conformer (inference part only): waveform → (acoustic, semantic) at 25 Hz."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.mean = float(config["mean"])
        self.std = float(config["std"])
        self.preprocessor_melspec_2048 = MelSTFT(
            config["sample_rate"], config["n_fft"], config["hop_length"], config["n_mels"]
        )
        conformer_config = Wav2Vec2ConformerConfig(**config["conformer_config"])
        conformer_config._attn_implementation = "eager"
        needed = max(CONFORMER_STATES)
        if conformer_config.num_hidden_layers < needed:
            raise ValueError(f"the conformer needs at least {needed} layers (num_hidden_layers)")
        self.conv = Conv2dSubsampling(
            config["conv_dim"], conformer_config.hidden_size, config["n_mels"]
        )
        self.conformer = Wav2Vec2ConformerEncoder(conformer_config)

    @property
    def hidden_size(self) -> int:
        return self.conformer.config.hidden_size

    def forward(self, waveform: Tensor) -> tuple[Tensor, Tensor]:
        # Incomplete 25 Hz frames are dropped, and the last mel frame (the STFT's centre pad).
        samples = waveform.shape[-1] // FEATURE_FRAME_SAMPLES * FEATURE_FRAME_SAMPLES
        mel = self.preprocessor_melspec_2048(waveform[..., :samples])[..., :-1]
        mel = ((mel - self.mean) / self.std).to(self.conv.linear.weight.dtype)
        hidden = self.conformer.dropout(self.conv(mel))
        rotary = self.conformer.embed_positions(hidden)
        states: dict[int, Tensor] = {}
        for index, layer in enumerate(self.conformer.layers[: max(CONFORMER_STATES)], start=1):
            hidden = layer(hidden, relative_position_embeddings=rotary)
            states[index] = hidden
        return states[CONFORMER_STATES[0]], states[CONFORMER_STATES[1]]


class HeartCodecFeatureExtractors(nn.Module):
    """Stereo 24 kHz chunks [B, 2, n·1920 + 240] → four aligned streams [B, n·2, 2·dim]."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        whisper_config = WhisperConfig(**config["whisper_config"])
        whisper_config._attn_implementation = "eager"
        self.whisper_encoder = WhisperEncoder(whisper_config)
        self.whisper_processor = WhisperFeatureExtractor(
            feature_size=whisper_config.num_mel_bins,
            sampling_rate=WHISPER_SAMPLE_RATE,
            hop_length=160,
            chunk_length=30,
            n_fft=400,
            padding_value=0.0,
            return_attention_mask=False,
        )
        wavlm_config = WavLMConfig(**config["wavlm_config"])
        needed = max(WAVLM_STATES)
        if wavlm_config.num_hidden_layers < needed:
            raise ValueError(f"WavLM needs at least {needed} layers (num_hidden_layers)")
        self.wavlm_encoder = WavLMModel(wavlm_config)
        self.muencoder = MuEncoder(config["muencoder_config"])
        # Built on CPU and not stored in the checkpoint: a filter built on CUDA differs in the
        # last bits, which is enough to change RVQ token ids.
        with torch.device("cpu"):
            self.resample_24k_to_16k = torchaudio.transforms.Resample(
                CODEC_SAMPLE_RATE, WHISPER_SAMPLE_RATE
            )
        self.resample_24k_to_16k.register_buffer(
            "kernel", self.resample_24k_to_16k.kernel, persistent=False
        )

    @property
    def output_dims(self) -> tuple[int, int, int, int]:
        """Channels of (acoustic, semantic, whisper, wavlm): two audio channels each."""
        mu = self.muencoder.hidden_size
        return (
            2 * mu,
            2 * mu,
            2 * self.whisper_encoder.config.d_model,
            2 * self.wavlm_encoder.config.hidden_size,
        )

    def _wavlm(self, waveform_16k: Tensor) -> Tensor:
        wavlm = self.wavlm_encoder
        weight = wavlm.feature_extractor.conv_layers[0].conv.weight
        extracted = wavlm.feature_extractor(waveform_16k.to(weight.dtype)).transpose(1, 2)
        hidden, _ = wavlm.feature_projection(extracted)
        encoder = wavlm.encoder
        hidden = encoder.dropout(encoder.layer_norm(hidden + encoder.pos_conv_embed(hidden)))
        position_bias = None
        kept = []
        for index, layer in enumerate(encoder.layers[: max(WAVLM_STATES)]):
            hidden, position_bias = layer(hidden, position_bias=position_bias, index=index)
            if index + 1 in WAVLM_STATES:
                kept.append(hidden)
        return torch.stack(kept, dim=1).mean(dim=1)

    def _whisper(self, waveform_16k: Tensor) -> Tensor:
        # Whisper's own log-mel (padded to its 30 s window), computed on CPU as in training.
        mel = self.whisper_processor(
            waveform_16k.float().cpu().numpy(),
            sampling_rate=WHISPER_SAMPLE_RATE,
            return_tensors="pt",
            do_normalize=False,
        ).input_features
        weight = self.whisper_encoder.conv1.weight
        mel = mel.to(device=weight.device, dtype=weight.dtype)
        return self.whisper_encoder(mel).last_hidden_state

    @staticmethod
    def _pair_mean(features: Tensor) -> Tensor:
        """50 Hz → 25 Hz by averaging neighbouring frames."""
        return features.reshape(features.shape[0], -1, 2, features.shape[-1]).mean(dim=2)

    @staticmethod
    def _join_channels(features: Tensor, batch: int) -> Tensor:
        """[B·2, T, D] → [B, T, 2·D], left channel's features first."""
        _, frames, dim = features.shape
        paired = features.reshape(batch, 2, frames, dim).permute(0, 2, 1, 3)
        return paired.reshape(batch, frames, 2 * dim)

    @torch.no_grad()
    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch = audio.shape[0]
        content = audio.shape[-1] - TAIL_SAMPLES
        waveform = audio.flatten(0, 1).float()
        acoustic, semantic = self.muencoder(waveform)
        waveform_16k = self.resample_24k_to_16k.float()(waveform)
        frames = content // FEATURE_FRAME_SAMPLES
        wavlm = self._wavlm(waveform_16k)
        if wavlm.shape[1] != 2 * frames:
            raise RuntimeError(f"WavLM gave {wavlm.shape[1]} frames, expected {2 * frames}")
        whisper = self._whisper(waveform_16k)[:, : 2 * frames]
        streams = (acoustic, semantic, self._pair_mean(whisper), self._pair_mean(wavlm))
        for name, stream in zip(("acoustic", "semantic", "whisper", "wavlm"), streams, strict=True):
            if stream.shape[1] != frames:
                raise RuntimeError(f"{name} gave {stream.shape[1]} frames, expected {frames}")
        return tuple(self._join_channels(s, batch) for s in streams)  # type: ignore[return-value]
