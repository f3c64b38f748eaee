"""/v1/uploads: input files (audio, or .npy token arrays) for encode and decode jobs."""

from __future__ import annotations

import tempfile
from pathlib import Path

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.utils import secure_filename

from api.gateway.apidoc import Body, Reply, documented
from api.gateway.app import services
from api.gateway.auth import authenticate, current_tenant
from api.gateway.errors import ApiError
from shared.core.audio import read_audio
from shared.core.jobs import Upload, new_id
from shared.core.schemas import UploadOut, upload_out
from shared.core.storage import content_type_for, upload_key
from shared.core.tokens import FRAMES_PER_SECOND, read_tokens

bp = Blueprint("uploads", __name__, url_prefix="/v1/uploads")
bp.before_request(authenticate)


def probe_audio(path: Path, max_seconds: float) -> tuple[float, int, int]:
    """(duration_s, sample_rate, channels) of an audio file; ValueError if it is not one.

    The whole file is decoded (read_audio), so truncated files and non-finite samples are
    refused here rather than when a worker reads them.
    """
    audio, rate = read_audio(path, max_seconds, name=path.name)
    return audio.shape[1] / rate, rate, audio.shape[0]


def probe_tokens(path: Path, max_seconds: float) -> float:
    """Duration in seconds of a tokens .npy ([8, T] codec codes); ValueError if not one."""
    codes = read_tokens(path.read_bytes(), path.name)
    duration = codes.shape[1] / FRAMES_PER_SECOND
    if duration > max_seconds:
        raise ValueError(
            f"{path.name}: tokens span {duration:.1f} s; at most {max_seconds:g} s allowed"
        )
    return duration


@bp.post("")
@documented(
    {
        201: Reply("Stored; `kind` says which of the two it is", UploadOut),
        413: "The file is over {settings.max_upload_bytes} bytes",
        422: "No `file` part, an empty file, audio libsndfile cannot decode or over "
        "{settings.max_upload_seconds:g} s, or a .npy that is not an [8, T] integer token array",
    },
    body=Body(
        media_type="multipart/form-data",
        schema={
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": {
                    "type": "string",
                    "contentMediaType": "application/octet-stream",
                    "description": "A part with a filename: a name ending in .npy is a token "
                    "array ([8, T] codec codes, at most {settings.max_upload_seconds:g} s); any "
                    "other is audio (WAV, FLAC, OGG, MP3: whatever libsndfile decodes).",
                }
            },
        },
        encoding={"file": {"contentType": "audio/*, application/octet-stream"}},
    ),
)
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
            raise ApiError(422, "invalid_file", str(error), "file") from None
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
