"""/v1/uploads: input files (audio, or .npy token arrays) for encode and decode jobs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import soundfile
from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.utils import secure_filename

from api.app import services
from api.auth import authenticate, current_tenant
from api.errors import ApiError
from shared.jobs import Upload, new_id
from shared.schemas import upload_out
from shared.storage import content_type_for, upload_key

bp = Blueprint("uploads", __name__, url_prefix="/v1/uploads")
bp.before_request(authenticate)

CODEBOOKS = 8
CODEBOOK_SIZE = 8192  # valid codec codes are 0..8191
FRAMES_PER_SECOND = 12.5


def probe_audio(path: Path, max_seconds: float) -> tuple[float, int, int]:
    """(duration_s, sample_rate, channels) of an audio file; ValueError if it is not one.

    Stand-in until shared/audio.py's read_audio lands: the one place uploads are judged audio.
    """
    try:
        info = soundfile.info(str(path))
    except RuntimeError as error:  # soundfile's errors derive from it
        raise ValueError(f"not a readable audio file ({error})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise ValueError("the audio file holds no samples")
    duration = info.frames / info.samplerate
    if duration > max_seconds:
        raise ValueError(f"audio is {duration:.1f} s long; at most {max_seconds:g} s allowed")
    return duration, info.samplerate, info.channels


def probe_tokens(path: Path, max_seconds: float) -> float:
    """Duration in seconds of a tokens .npy: integer codes, shape [8, T]; ValueError if not."""
    try:
        codes = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"not a .npy array ({error})") from None
    if codes.ndim != 2 or codes.shape[0] != CODEBOOKS or codes.shape[1] == 0:
        raise ValueError(f"tokens must have shape [{CODEBOOKS}, T>0], got {list(codes.shape)}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got {codes.dtype}")
    if codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
        raise ValueError(f"token values must be 0..{CODEBOOK_SIZE - 1}")
    duration = codes.shape[1] / FRAMES_PER_SECOND
    if duration > max_seconds:
        raise ValueError(f"tokens span {duration:.1f} s; at most {max_seconds:g} s allowed")
    return duration


@bp.post("")
def create_upload() -> ResponseReturnValue:
    """Store a multipart `file` after checking it: audio (any format libsndfile reads) or a
    .npy token array. 201 with the upload; 413 over HEARTCLUSTER_MAX_UPLOAD_BYTES."""
    svc = services()
    settings = svc.settings
    file = request.files.get("file")
    if file is None:
        raise ApiError(422, "invalid_params", "send the file as multipart field 'file'", "file")
    filename = secure_filename(file.filename or "") or "upload"
    with tempfile.TemporaryDirectory(prefix="hc-upload-") as tmp:
        path = Path(tmp) / filename
        file.save(path)
        size = path.stat().st_size
        if size > settings.max_upload_bytes:
            raise ApiError(
                413,
                "too_large",
                f"upload is {size} bytes; at most {settings.max_upload_bytes} allowed",
                "file",
            )
        if size == 0:
            raise ApiError(422, "invalid_file", "the file is empty", "file")
        try:
            if path.suffix.lower() == ".npy":
                kind, sample_rate, channels = "tokens", None, None
                duration = probe_tokens(path, settings.max_upload_seconds)
            else:
                kind = "audio"
                duration, sample_rate, channels = probe_audio(path, settings.max_upload_seconds)
        except ValueError as error:
            raise ApiError(422, "invalid_file", f"{filename}: {error}", "file") from None
        upload_id = new_id()
        key = upload_key(current_tenant(), upload_id, filename)
        svc.store.put_file(key, path, content_type=content_type_for(filename))
    upload = svc.uploads.create(
        Upload(
            id=upload_id,
            tenant=current_tenant(),
            key=key,
            filename=filename,
            kind=kind,
            bytes=size,
            duration_s=round(duration, 3),
            sample_rate=sample_rate,
            channels=channels,
        )
    )
    response = jsonify(upload_out(upload))
    response.status_code = 201
    return response
