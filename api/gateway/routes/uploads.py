"""/v1/uploads: input files (audio, or .npy token arrays) for jobs: create, list, get, delete."""

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
from api.gateway.tenancy import over_quota, tenancy
from shared.core.audio import AudioLimits, probe_audio
from shared.core.constants import FRAMES_PER_SECOND, frames_for_seconds
from shared.core.jobs import Upload, new_id
from shared.core.quotas import QuotaExceeded
from shared.core.retention import Deleter
from shared.core.schemas import UploadList, UploadOut, upload_out
from shared.core.storage import content_type_for, upload_key
from shared.core.tokens import read_tokens

bp = Blueprint("uploads", __name__, url_prefix="/v1/uploads")
bp.before_request(authenticate)

MAX_PAGE = 200


def probe_tokens(path: Path, max_seconds: float) -> float:
    """Duration in seconds of a tokens .npy ([8, T] codec codes), checked from its header
    before the array is read; InputError if it is not one."""
    with path.open("rb") as stream:
        codes = read_tokens(stream, path.name, max_frames=frames_for_seconds(max_seconds))
    return codes.shape[1] / FRAMES_PER_SECOND


def _filename(raw: str | None, limit: int) -> str:
    """A safe name to store the upload under; 422 naming `filename` when it is too long (as
    sent, or once made safe: folding to ASCII can lengthen it, as 'ﬃ' becomes 'ffi')."""
    safe = secure_filename(raw or "") or "upload"
    length = max(len(raw or ""), len(safe))
    if length > limit:
        raise ApiError(
            422,
            "invalid_params",
            f"the file name is {length} characters; at most {limit} allowed "
            "(HEARTCLUSTER_MAX_FILENAME_CHARS)",
            "filename",
        )
    return safe


@bp.post("")
@documented(
    {
        201: Reply("Stored; `kind` says which of the two it is", UploadOut),
        413: "The file is over {settings.max_upload_bytes} bytes",
        429: "The upload would pass the tenant's storage quota (`error.field`: `storage_bytes`)",
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
    """Store a multipart `file` after checking it: audio (any format libsndfile reads, within
    the channel, rate, length and decoded-size limits, decoded block by block) or a .npy token
    array (checked from its header). 201 with the upload; 413 over HEARTCLUSTER_MAX_UPLOAD_BYTES.
    """
    svc = services()
    settings = svc.settings
    file = request.files.get("file")
    if file is None:
        raise ApiError(422, "invalid_params", "send the file as multipart field 'file'", "file")
    filename = _filename(file.filename, settings.max_filename_chars)
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
        quotas = tenancy().quotas
        try:
            quotas.admit_upload(current_tenant(), quotas.get(current_tenant()), size)
        except QuotaExceeded as error:
            raise over_quota(error) from None
        try:
            if path.suffix.lower() == ".npy":
                kind, sample_rate, channels = "tokens", None, None
                duration = probe_tokens(path, settings.max_upload_seconds)
            else:
                kind = "audio"
                info = probe_audio(path, AudioLimits.for_uploads(settings), name=path.name)
                duration, sample_rate, channels = info.duration_s, info.sample_rate, info.channels
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


@bp.get("")
@documented(
    {
        200: Reply("The page of uploads, newest first", UploadList),
        422: "A bad `limit` or `cursor`",
    },
    query={
        "limit": {"schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50}},
        "cursor": {
            "description": "`next_cursor` of the previous page",
            "schema": {"type": "string", "minLength": 1},
        },
    },
)
def list_uploads() -> ResponseReturnValue:
    """The tenant's uploads, newest first; pages by `limit` (1-200) and `cursor`."""
    try:
        limit = int(request.args.get("limit", "50"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(422, "invalid_params", f"limit must be 1 to {MAX_PAGE}", "limit")
    try:
        uploads, cursor = services().uploads.list(
            current_tenant(), limit=limit, cursor=request.args.get("cursor")
        )
    except ValueError as error:
        raise ApiError(422, "invalid_params", str(error), "cursor") from None
    return jsonify({"uploads": [upload_out(u) for u in uploads], "next_cursor": cursor})


@bp.get("/<upload_id>")
@documented({200: Reply("The upload", UploadOut), 404: "No such upload (or another tenant's)"})
def get_upload(upload_id: str) -> ResponseReturnValue:
    """One upload (another tenant's is a 404)."""
    upload = services().uploads.get_for_tenant(current_tenant(), upload_id)
    if upload is None:
        raise ApiError(404, "not_found", f"no upload {upload_id}")
    return jsonify(upload_out(upload))


@bp.delete("/<upload_id>")
@documented(
    {204: Reply("Deleted: the file and its record"), 404: "No such upload (or another tenant's)"}
)
def delete_upload(upload_id: str) -> ResponseReturnValue:
    """Delete an upload's file and record (204); jobs that already read it keep their results,
    queued ones that still need it fail naming it."""
    svc = services()
    if not Deleter(svc.redis, svc.store).delete_upload(current_tenant(), upload_id):
        raise ApiError(404, "not_found", f"no upload {upload_id}")
    return "", 204
