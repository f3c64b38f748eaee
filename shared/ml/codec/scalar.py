"""HeartCodec's scalar (SQ) codec: 25 Hz latents ↔ one audio channel (heartlib's ScalarModel).

Causal weight-normed convolutions with PReLU activations; residual units with dilations
1, 3, 5, 7, 9; strided (transposed) convolutions change the rate, and a pre/post processor
halves/doubles it once more (hop 2 · 5·4·4·4·3 = 1920 samples). Latents are quantised to
9 levels per unit (round(9x)/9) before decoding. Weight norm uses torch's parametrizations,
which gives the checkpoint's `…parametrizations.weight.original0/original1` names.

The decoder path turns latents into audio. The encoder path (audio → latents) is not needed
to detokenize; it is modelled because the official file holds its weights and loads strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from shared.ml.codec.config import HeartCodecConfig

DILATIONS = (1, 3, 5, 7, 9)
LATENT_LEVELS = 9


class CausalConv1d(nn.Conv1d):
    """A Conv1d that sees only the past: left-padded by dilation · (kernel − 1)."""

    def __init__(
        self, n_in: int, n_out: int, kernel_size: int, stride: int = 1, dilation: int = 1
    ) -> None:
        super().__init__(n_in, n_out, kernel_size, stride=stride, dilation=dilation)
        self.left_pad = dilation * (kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """Upsampling by `stride` with kernel 2·stride; the trailing `stride` samples are dropped."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int, stride: int) -> None:
        super().__init__(n_in, n_out, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[..., : -self.stride[0]]


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, dilation: int, kernel_size: int) -> None:
        super().__init__()
        self.conv1 = weight_norm(CausalConv1d(channels, channels, kernel_size, dilation=dilation))
        self.conv2 = weight_norm(CausalConv1d(channels, channels, 1))
        self.activation1 = nn.PReLU()
        self.activation2 = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.activation2(self.conv2(self.activation1(self.conv1(x))))


class DownsampleLayer(nn.Module):
    def __init__(self, n_in: int, n_out: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.layer = weight_norm(CausalConv1d(n_in, n_out, kernel_size, stride=stride))
        self.activation = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.layer(x))


class UpsampleLayer(nn.Module):
    def __init__(self, n_in: int, n_out: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.layer = weight_norm(CausalConvTranspose1d(n_in, n_out, kernel_size, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, stride: int, kernel_size: int, res_kernel: int):
        super().__init__()
        self.convs = nn.ModuleList(ResidualUnit(n_in, d, res_kernel) for d in DILATIONS)
        self.down_conv = DownsampleLayer(n_in, n_out, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.convs:
            x = unit(x)
        return self.down_conv(x)


class DecoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, stride: int, kernel_size: int, res_kernel: int):
        super().__init__()
        self.up_conv = UpsampleLayer(n_in, n_out, kernel_size, stride)
        self.convs = nn.ModuleList(ResidualUnit(n_out, d, res_kernel) for d in DILATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up_conv(x)
        for unit in self.convs:
            x = unit(x)
        return x


class PreProcessor(nn.Module):
    """Convolve, then average-pool by `factor` (halves the rate)."""

    def __init__(self, channels: int, factor: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = CausalConv1d(channels, channels, kernel_size)
        self.activation = nn.PReLU()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool1d(self.activation(self.conv(x)), self.factor)


class PostProcessor(nn.Module):
    """Repeat every sample `factor` times, then convolve (doubles the rate)."""

    def __init__(self, channels: int, factor: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = CausalConv1d(channels, channels, kernel_size)
        self.activation = nn.PReLU()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x.repeat_interleave(self.factor, dim=-1)))


class ScalarModel(nn.Module):
    def __init__(self, config: HeartCodecConfig) -> None:
        super().__init__()
        base, kernel, res = config.init_channel, config.default_kernel_size, config.res_kernel_size
        down = list(zip(config.downsample_factors, config.downsample_kernel_sizes, strict=True))
        up = list(zip(config.upsample_factors, config.upsample_kernel_sizes, strict=True))
        top = base * 2 ** len(down)
        self.encoder = nn.ModuleList(
            [
                weight_norm(CausalConv1d(config.num_bands, base, kernel)),
                PreProcessor(base, config.num_samples, kernel),
                *(
                    EncoderBlock(base * 2**i, base * 2 ** (i + 1), stride, k, res)
                    for i, (stride, k) in enumerate(down)
                ),
                weight_norm(CausalConv1d(top, config.latent_hidden_dim, kernel)),
            ]
        )
        top = base * 2 ** len(up)
        delay = config.delay_kernel_size
        self.decoder = nn.ModuleList(
            [
                # The one non-causal layer: it looks (delay − 1)/2 latent frames ahead.
                weight_norm(
                    nn.Conv1d(config.latent_hidden_dim, top, delay, padding=(delay - 1) // 2)
                ),
                *(
                    DecoderBlock(top // 2**i, top // 2 ** (i + 1), stride, k, res)
                    for i, (stride, k) in enumerate(up)
                ),
                PostProcessor(base, config.num_samples, kernel),
                weight_norm(CausalConv1d(base, config.num_bands, kernel)),
            ]
        )

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio [B, 1, S] → latents [B, latent_hidden_dim, S / hop] in (−1, 1)."""
        x = audio
        for layer in self.encoder:
            x = layer(x)
        return torch.tanh(x)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, latent_hidden_dim, F] → audio [B, 1, F · hop]."""
        x = torch.round(LATENT_LEVELS * latents) / LATENT_LEVELS
        for layer in self.decoder:
            x = layer(x)
        return x
