"""Token uploads: .npy files checked from their header before any array is allocated."""

from __future__ import annotations

import io

import numpy as np
import pytest

from shared.core.tokens import InputError, read_tokens, tokens_bytes


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _header_only(shape: tuple[int, ...], descr: str = "<i4", version: int = 1) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    if version == 1:
        np.lib.format.write_array_header_1_0(buffer, header)
    else:
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


def test_round_trip_from_bytes_and_from_a_stream() -> None:
    codes = np.arange(8 * 30).reshape(8, 30) % 8192
    assert (read_tokens(tokens_bytes(codes), "f") == codes).all()
    fortran = _npy(np.asfortranarray(codes.astype(">i8")))
    tokens = read_tokens(io.BytesIO(fortran), "f", max_frames=30)
    assert tokens.dtype == np.int32 and (tokens == codes).all()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_header_only((8, 10**12)) + b"\0" * 64, "declares 32000000000000 bytes.*holds 64"),
        (_header_only((8, 10**12), version=2) + b"\0" * 64, "declares 32000000000000 bytes"),
        (_header_only((8, 4)) + b"\0" * 8, "declares 128 bytes of data; the file holds 8"),
        (_header_only((8, 4)) + b"\0" * 200, "declares 128 bytes of data; the file holds 200"),
        (_header_only((7, 4)) + b"\0" * 112, r"shape \[8, T>=1\], got \[7, 4\]"),
        (_header_only((8, 0)), r"shape \[8, T>=1\]"),
        (_header_only((8, 4), "<f4") + b"\0" * 128, "must be integers, got float32"),
        (_npy(np.array([None] * 16, dtype=object).reshape(8, 2)), "must be integers, got object"),
        (b"\x93NUMPY\x09\x00", "version"),
        (b"not numpy", "not a .npy array"),
        (b"", "not a .npy array"),
    ],
)
def test_bad_token_files_are_refused_before_reading_their_data(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        read_tokens(data, "tokens_upload_id")
    assert caught.value.field == "tokens_upload_id"


def test_frame_limit_is_read_from_the_header() -> None:
    with pytest.raises(InputError, match="10000 frames; at most 7500 allowed"):
        read_tokens(_header_only((8, 10_000)), "f", max_frames=7500)
