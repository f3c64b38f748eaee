"""Audio token arrays ([8, T] codec codes at 12.5 frames/s): checks and .npy bytes.

No torch: the gateway checks uploaded token files with the same rules the workers apply.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

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


def _header(stream: BinaryIO, field: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from a .npy header, reading nothing past it."""
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            return npy_format.read_array_header_1_0(stream)
        if version == (2, 0):
            return npy_format.read_array_header_2_0(stream)
    except (ValueError, SyntaxError, EOFError) as error:
        raise InputError(field, f"not a .npy array: {error}") from None
    raise InputError(field, f"not a .npy array: format version {version} is not supported")


def read_tokens(data: bytes | BinaryIO, field: str, max_frames: int | None = None) -> np.ndarray:
    """.npy bytes or a seekable stream → checked [8, T] int32 tokens, or an InputError naming
    `field`. Shape, dtype and `max_frames` are checked from the header, and the data it declares
    must be what the file holds, before anything is allocated for the array."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    shape, fortran_order, dtype = _header(stream, field)
    if len(shape) != 2 or shape[0] != NUM_CODEBOOKS or shape[1] < 1:
        raise InputError(field, f"tokens must have shape [8, T>=1], got {list(shape)}")
    if dtype.kind not in "iu":
        raise InputError(field, f"tokens must be integers, got {dtype}")
    if max_frames is not None and shape[1] > max_frames:
        raise InputError(field, f"tokens hold {shape[1]} frames; at most {max_frames} allowed")
    declared = shape[0] * shape[1] * dtype.itemsize
    start = stream.tell()
    held = stream.seek(0, io.SEEK_END) - start
    if held != declared:
        raise InputError(
            field, f"the .npy header declares {declared} bytes of data; the file holds {held}"
        )
    stream.seek(start)
    order = "F" if fortran_order else "C"
    tokens = np.frombuffer(stream.read(declared), dtype=dtype).reshape(shape, order=order)
    return check_tokens(tokens, field)


def tokens_bytes(tokens: np.ndarray) -> bytes:
    """[8, T] tokens → .npy bytes (int32)."""
    buffer = io.BytesIO()
    np.save(buffer, tokens.astype(np.int32), allow_pickle=False)
    return buffer.getvalue()
