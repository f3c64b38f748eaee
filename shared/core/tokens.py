"""Audio token arrays ([8, T] codec codes at 12.5 frames/s): checks and .npy bytes.

No torch: the gateway checks uploaded token files with the same rules the workers apply.
"""

from __future__ import annotations

import io

import numpy as np

from shared.core.constants import CODEC_CODES, NUM_CODEBOOKS


class InputError(ValueError):
    """A job input (tokens, audio, a referenced job) that cannot be used; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_tokens(tokens: np.ndarray, field: str) -> np.ndarray:
    """Tokens as the codec takes them ([8, T>=1] ints in the codec range) or a named error."""
    if tokens.ndim != 2 or tokens.shape[0] != NUM_CODEBOOKS or tokens.shape[1] < 1:
        shape = list(tokens.shape)
        raise InputError(field, f"tokens must have shape [{NUM_CODEBOOKS}, T>=1], got {shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise InputError(field, f"tokens must be integers, got {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= CODEC_CODES:
        raise InputError(field, f"token ids must be in [0, {CODEC_CODES})")
    return tokens.astype(np.int32)


def read_tokens(data: bytes, field: str) -> np.ndarray:
    """.npy bytes → checked [8, T] int32 tokens, or an InputError naming `field`."""
    try:
        tokens = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as error:
        raise InputError(field, f"not a .npy array: {error}") from error
    return check_tokens(tokens, field)


def tokens_bytes(tokens: np.ndarray) -> bytes:
    """[8, T] tokens → .npy bytes (int32)."""
    buffer = io.BytesIO()
    np.save(buffer, tokens.astype(np.int32), allow_pickle=False)
    return buffer.getvalue()
