"""HeartCodec's residual vector quantizer (8 codebooks × 8192 codes × 32 dims).

Names follow vector-quantize-pytorch's ResidualVQ as stored in the official checkpoint under
`flow_matching.vq_embed.`: a shared project_in (512→32) / project_out (32→512) and per layer
`layers.k._codebook.{embed, embed_avg, cluster_size, initted}` buffers. Only `embed` is used
at inference; the EMA statistics are kept so that official files load strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.core.constants import CODEC_CODES, NUM_CODEBOOKS


class Codebook(nn.Module):
    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("initted", torch.tensor(True))
        self.register_buffer("cluster_size", torch.zeros(1, codebook_size))
        self.register_buffer("embed_avg", torch.zeros(1, codebook_size, dim))
        self.register_buffer("embed", torch.zeros(1, codebook_size, dim))


class _Layer(nn.Module):
    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self._codebook = Codebook(codebook_size, dim)


class ResidualVQ(nn.Module):
    def __init__(
        self,
        num_quantizers: int = NUM_CODEBOOKS,
        codebook_size: int = CODEC_CODES,
        dim: int = 512,
        codebook_dim: int = 32,
    ) -> None:
        super().__init__()
        self.project_in = nn.Linear(dim, codebook_dim)
        self.project_out = nn.Linear(codebook_dim, dim)
        self.layers = nn.ModuleList(
            _Layer(codebook_size, codebook_dim) for _ in range(num_quantizers)
        )

    @property
    def num_quantizers(self) -> int:
        return len(self.layers)

    @property
    def codebook_size(self) -> int:
        return self.layers[0]._codebook.embed.shape[1]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, Q, T] → features [B, T, dim]: sum of the Q code vectors, projected out."""
        if codes.shape[1] != self.num_quantizers:
            raise ValueError(f"expected {self.num_quantizers} codebooks, got {codes.shape[1]}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        summed = sum(layer._codebook.embed[0][codes[:, k]] for k, layer in enumerate(self.layers))
        return self.project_out(summed)

    def quantize(self, features: torch.Tensor) -> torch.Tensor:
        """Features [B, T, dim] → codes [B, Q, T] by residual nearest-neighbour search."""
        residual = self.project_in(features)
        codes = []
        for layer in self.layers:
            embed = layer._codebook.embed[0]
            # argmin ||r - e||² = argmax (2 r·e - ||e||²)
            scores = 2 * residual @ embed.T - embed.pow(2).sum(-1)
            index = scores.argmax(dim=-1)
            codes.append(index)
            residual = residual - embed[index]
        return torch.stack(codes, dim=1)


def normalize_initted(tensors: dict[str, torch.Tensor]) -> None:
    """Official files store `initted` as shape [] or [1]; the module holds a scalar."""
    for key, value in tensors.items():
        if key.endswith("._codebook.initted"):
            tensors[key] = value.reshape(())
