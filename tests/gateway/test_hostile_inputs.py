"""Hostile inputs against the real gateway (Flask test client, real redis-server): each is
refused at the door with a 4xx JSON error naming the field or limit, before anything is stored,
and the bombs are refused without the gateway reading or decoding them whole (Python heap peak
measured with tracemalloc around the request)."""

from __future__ import annotations

import base64
import io
import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import soundfile
from werkzeug.test import EnvironBuilder, run_wsgi_app
from werkzeug.wrappers import Response

from api.gateway import create_app
from shared.core.config import Settings
from shared.core.constants import CONTEXT_POSITIONS, FRAME_S
from shared.core.jobs import Job, JobStore, job_key
from shared.core.prompt_text import prompt_counter
from shared.core.storage import LocalStore, artifact_key
from shared.core.tenants import TenantStore
from shared.core.tokens import tokens_bytes
from tests.support.fakes import RecordingCelery

MiB = 1024 * 1024
MAX_UPLOAD_BYTES = 2 * MiB


def settings_for(redis_url: str, data_dir: Path, **extra: str) -> Settings:
    env = {
        "HEARTCLUSTER_REDIS_URL": redis_url,
        "HEARTCLUSTER_DATA_DIR": str(data_dir),
        "HEARTCLUSTER_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "HEARTCLUSTER_MAX_UPLOAD_SECONDS": "600",
    }
    return Settings.from_env(env | {f"HEARTCLUSTER_{k}": v for k, v in extra.items()})


@pytest.fixture
def celery(redis_client: redis.Redis) -> RecordingCelery:
    return RecordingCelery(consumed=("cpu",), broker=redis_client)


@pytest.fixture
def make_client(redis_url: str, redis_client, tmp_path: Path, celery: RecordingCelery):
    """A test client of a gateway with default limits, or others given as HEARTCLUSTER_*."""

    def make(**extra: str) -> Any:
        settings = settings_for(redis_url, tmp_path, **extra)
        return create_app(settings, redis_client=redis_client, celery_app=celery).test_client()

    return make


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def auth(redis_client) -> dict[str, str]:
    return {"Authorization": f"Bearer {TenantStore(redis_client).create_key('acme')}"}


def submit(client, auth: dict[str, str], job_type: str = "generate", **params: Any):
    body = {"type": job_type, "params": {"tags": "piano", **params}}
    return client.post("/v1/jobs", json=body, headers=auth)


def error_of(reply, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.get_data(as_text=True)[:500]
    return reply.get_json()["error"]


def peak_bytes(request: Callable[[], Any]) -> tuple[Any, int]:
    """(the reply, the Python heap's peak growth while the gateway handled it)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        reply = request()
        return reply, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


class EndlessBody(io.RawIOBase):
    """A request body of `size` bytes made up as it is read, counting what the gateway reads
    (so a refused body is never built in the test's memory either)."""

    def __init__(self, size: int, fill: bytes = b"x") -> None:
        self.left = size
        self.fill = fill
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = self.fill * n
        self.left -= n
        self.read_bytes += n
        return n


def jobs_stored(redis_client) -> int:
    return len(redis_client.keys(job_key("*")))


# ----- sizes -----------------------------------------------------------------------------------


def post_stream(client, auth: dict[str, str], body: EndlessBody, length: int | None) -> Any:
    """POST /v1/jobs reading `body` as the WSGI input: with a Content-Length, or chunked."""
    environ = EnvironBuilder(
        path="/v1/jobs", method="POST", headers=auth, content_type="application/json"
    ).get_environ()
    environ["wsgi.input"] = body
    if length is None:
        environ.pop("CONTENT_LENGTH", None)
        environ["wsgi.input_terminated"] = True  # the server de-chunked it
    else:
        environ["CONTENT_LENGTH"] = str(length)
    app_iter, status, headers = run_wsgi_app(client.application, environ, buffered=True)
    return Response(b"".join(app_iter), status=status, headers=headers)


def test_a_45_mb_body_is_refused_from_its_length_unread(client, auth, redis_client) -> None:
    body = EndlessBody(45 * MiB)
    reply, peak = peak_bytes(lambda: post_stream(client, auth, body, 45 * MiB))
    error = error_of(reply, 413)
    assert error["code"] == "too_large"
    assert body.read_bytes == 0 and peak < 1 * MiB
    assert jobs_stored(redis_client) == 0


def test_a_chunked_body_is_cut_off_at_the_json_limit(client, auth) -> None:
    body = EndlessBody(45 * MiB)
    reply, peak = peak_bytes(lambda: post_stream(client, auth, body, None))
    assert error_of(reply, 413)["code"] == "too_large"
    limit = Settings().max_json_bytes
    assert body.read_bytes <= limit + 64 * 1024 and peak < 4 * MiB


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ("x" * 101, "at most 100 allowed per tag"),
        (",".join(["é" * 40] * 30), "at most 1000 allowed in all"),
    ],
)
def test_tag_bytes_are_limited(client, auth, tags: str, message: str) -> None:
    error = error_of(submit(client, auth, tags=tags), 422)
    assert error["field"] == "params.tags" and message in error["message"]


def test_json_nested_100000_deep_is_400(client, auth) -> None:
    data = b"[" * 100_000 + b"]" * 100_000
    reply = client.post("/v1/jobs", data=data, content_type="application/json", headers=auth)
    error = error_of(reply, 400)
    assert error["code"] == "malformed_json" and "at most 32" in error["message"]


def test_nesting_inside_strings_does_not_count(client, auth, celery) -> None:
    reply = submit(client, auth, lyrics="[[[[{{{{" * 10)
    assert reply.status_code == 202
    assert len(celery.sent) == 1


def test_ids_are_bounded(client, auth) -> None:
    reply = client.post(
        "/v1/jobs", json={"type": "encode", "params": {"upload_id": "a" * 10_000}}, headers=auth
    )
    assert error_of(reply, 422)["field"] == "params.upload_id"


def test_inpaint_times_past_any_song_are_422(client, auth) -> None:
    params = {"source_job_id": "a" * 32, "start_s": 1e308, "end_s": 1e308 * 1.5}
    error = error_of(submit(client, auth, "inpaint", **params), 422)
    assert error["field"] in ("params.start_s", "params.end_s")


# ----- accepted, then always rejected by the worker: refused at submit now ----------------------


def test_lone_surrogate_in_lyrics_is_422(client, auth, redis_client) -> None:
    error = error_of(submit(client, auth, lyrics="la \ud800 la"), 422)
    assert error["field"] == "params.lyrics" and "surrogate" in error["message"]
    assert jobs_stored(redis_client) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tags", "piano\x00"),
        ("tags", "piano\nrock"),
        ("lyrics", "la\x1b[31mla"),
        ("lyrics", "\x85"),
    ],
)
def test_control_characters_are_422(client, auth, field: str, value: str) -> None:
    error = error_of(submit(client, auth, **{field: value}), 422)
    assert error["field"] == f"params.{field}" and "control character" in error["message"]


def test_lyrics_keep_newlines_and_tabs_and_are_normalised(client, auth) -> None:
    reply = submit(client, auth, lyrics="line one\r\n\tline two cafe\u0301")
    assert reply.status_code == 202
    assert reply.get_json()["params"]["lyrics"] == "line one\n\tline two caf\u00e9"


def test_surrogate_in_the_idempotency_key_is_422(client, auth) -> None:
    body = {"type": "generate", "params": {"tags": "piano"}, "idempotency_key": "\udfff"}
    reply = client.post("/v1/jobs", json=body, headers=auth)
    assert error_of(reply, 422)["field"] == "idempotency_key"


def test_6000_emoji_of_lyrics_is_422_without_a_tokenizer(client, auth) -> None:
    error = error_of(submit(client, auth, lyrics="😀" * 6000), 422)
    assert error["field"] == "params.lyrics" and "8192-position context" in error["message"]


def test_lyrics_are_counted_in_the_models_tokens(make_client, auth, tiny_model_dir) -> None:
    client = make_client(MODEL_DIR=str(tiny_model_dir))
    error = error_of(submit(client, auth, lyrics="😀" * 6000), 422)
    assert error["field"] == "params.lyrics" and " tokens" in error["message"]
    # a song that fills the context exactly, by the tokenizer's count (the same count as the
    # model's prompt builder: tests/ml/test_prompt.py)
    lyrics = "la la la\n" * 200
    rows = prompt_counter(tiny_model_dir).rows("piano", lyrics)
    frames = CONTEXT_POSITIONS - rows
    assert submit(client, auth, lyrics=lyrics, duration_s=frames * FRAME_S).status_code == 202
    over = submit(client, auth, lyrics=lyrics, duration_s=(frames + 1) * FRAME_S)
    assert error_of(over, 422)["field"] == "params.duration_s"
    # without a tokenizer the bound (UTF-8 bytes) refuses it
    bound = submit(make_client(), auth, lyrics=lyrics, duration_s=frames * FRAME_S)
    error = error_of(bound, 422)
    assert error["field"] == "params.duration_s" and "UTF-8 bytes" in error["message"]


@pytest.mark.parametrize("duration", [1e-300, 0.01, 0.079])
def test_durations_under_one_frame_are_422(client, auth, duration: float) -> None:
    error = error_of(submit(client, auth, duration_s=duration), 422)
    assert error["field"] == "params.duration_s" and "0.08 s" in error["message"]


def test_one_frame_is_enough(client, auth) -> None:
    assert submit(client, auth, duration_s=0.08).status_code == 202


def test_unknown_language_is_422_and_names_are_codes(client, auth) -> None:
    params = {"source_job_id": "a" * 32, "language": "klingon"}
    reply = client.post("/v1/jobs", json={"type": "transcribe", "params": params}, headers=auth)
    assert error_of(reply, 422)["field"] == "params.language"
    params["language"] = "English"
    named = client.post("/v1/jobs", json={"type": "transcribe", "params": params}, headers=auth)
    # the language passed; the (missing) source job is what is refused now
    assert error_of(named, 404)["field"] == "params.source_job_id"


# ----- 500s ------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoded", ["nan:x", "inf:x", "-inf:x", "1e999:x"])
def test_cursor_that_is_not_a_finite_score_is_422(client, auth, decoded: str) -> None:
    cursor = base64.urlsafe_b64encode(decoded.encode()).decode()
    reply = client.get(f"/v1/jobs?cursor={cursor}", headers=auth)
    assert error_of(reply, 422)["field"] == "cursor"


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe\x00",
        b"[",
        b'{"type": "generate", "params": {"tags": "a", "seed": 1' + b"0" * 5000 + b"}}",
        b'{"type": "generate", "params": {"tags": "a", "temperature": 1e999}}',
        b'{"type": "\\ud800", "params": {}}',
        b'{"type": "generate", "params": {"tags": "a", "\\ud800": 1}}',
        b'{"type": "generate", "params": {"tags": ["a"]}}',
        b'{"type": "generate", "params": []}',
        b'"\\u0000"',
        b"null",
    ],
)
def test_malformed_bodies_are_4xx_json(client, auth, body: bytes) -> None:
    reply = client.post("/v1/jobs", data=body, content_type="application/json", headers=auth)
    assert 400 <= reply.status_code < 500
    assert reply.get_json()["error"]["code"] in ("malformed_json", "bad_request", "invalid_params")


def upload(client, auth: dict[str, str], data: bytes, filename: str):
    return client.post(
        "/v1/uploads",
        data={"file": (io.BytesIO(data), filename)},
        headers=auth,
        content_type="multipart/form-data",
    )


def wav(seconds: float = 0.5) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((int(seconds * 8000), 1), np.float32), 8000, format="WAV")
    return buffer.getvalue()


@pytest.mark.parametrize("filename", ["a" * 296 + ".wav", "\ufb03" * 150 + ".wav"])
def test_a_long_filename_is_422(client, auth, filename: str) -> None:
    error = error_of(upload(client, auth, wav(), filename), 422)
    assert error["field"] == "filename" and "at most 200" in error["message"]


# ----- decompression bombs -----------------------------------------------------------------------


def silent_flac(seconds: float, rate: int, channels: int) -> bytes:
    """FLAC of silence, written a block at a time (it compresses to almost nothing)."""
    buffer = io.BytesIO()
    block = np.zeros((rate, channels), np.float32)
    with soundfile.SoundFile(buffer, "w", rate, channels, format="FLAC") as file:
        for _ in range(int(seconds)):
            file.write(block)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def flac_bomb() -> bytes:
    """The issue's 91 KiB FLAC: 8 channels at 96 kHz, 120 s (369 MB as float32)."""
    return silent_flac(120, 96_000, 8)


def test_flac_bomb_is_refused_from_its_header(client, auth, flac_bomb: bytes, tmp_path) -> None:
    assert len(flac_bomb) < 100 * 1024
    reply, peak = peak_bytes(lambda: upload(client, auth, flac_bomb, "bomb.flac"))
    error = error_of(reply, 422)
    assert error["field"] == "file" and "8 channels; at most 2" in error["message"]
    assert peak < 4 * MiB
    assert not (tmp_path / "artifacts" / "tenants").exists()


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"MAX_UPLOAD_SAMPLE_RATE": "48000"}, "sample rate 96000 Hz; at most 48000"),
        ({"MAX_DECODED_BYTES": str(10 * MiB)}, "at most 10485760 allowed"),
        ({"MAX_UPLOAD_SECONDS": "20"}, "longer than the 20 s limit"),
    ],
)
def test_each_header_limit_refuses(make_client, auth, limits: dict[str, str], message: str) -> None:
    client = make_client(MAX_UPLOAD_CHANNELS="8", **limits)
    reply, peak = peak_bytes(lambda: upload(client, auth, silent_flac(30, 96_000, 2), "a.flac"))
    error = error_of(reply, 422)
    assert error["field"] == "file" and message in error["message"]
    assert peak < 4 * MiB


def test_accepted_audio_is_decoded_in_blocks(client, auth) -> None:
    """300 s of stereo at 48 kHz is 115 MB as float32; probing it holds one block at a time."""
    song = silent_flac(300, 48_000, 2)
    reply, peak = peak_bytes(lambda: upload(client, auth, song, "long.flac"))
    assert reply.status_code == 201, reply.get_json()
    assert reply.get_json()["duration_s"] == 300.0
    assert peak < 8 * MiB


def test_npy_declaring_29_tib_is_refused_before_allocation(client, auth) -> None:
    buffer = io.BytesIO()
    header = {"descr": "<i4", "fortran_order": False, "shape": (8, 10**12)}
    np.lib.format.write_array_header_1_0(buffer, header)
    data = buffer.getvalue() + b"\x00" * 64
    reply, peak = peak_bytes(lambda: upload(client, auth, data, "tokens.npy"))
    error = error_of(reply, 422)
    assert error["field"] == "file" and "at most 7500 allowed" in error["message"]
    assert peak < 1 * MiB


def test_npy_whose_data_is_not_what_it_declares_is_422(client, auth) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((8, 100), np.int32))
    error = error_of(upload(client, auth, buffer.getvalue()[:-40], "tokens.npy"), 422)
    assert error["field"] == "file" and "declares 3200 bytes" in error["message"]


def test_no_hostile_request_was_stored(client, auth, redis_client) -> None:
    """A refused request leaves nothing behind: sanity check of the counter used above."""
    submit(client, auth, lyrics="\ud800")
    assert jobs_stored(redis_client) == 0
    assert submit(client, auth).status_code == 202
    assert jobs_stored(redis_client) == 1
    assert json.loads(redis_client.hget(redis_client.keys(job_key("*"))[0], "type")) == "generate"


def test_extend_counts_the_inherited_prompt_at_submit(client, auth, redis_client, tmp_path) -> None:
    """Lyrics inherited from the parent take context too: refused at submit, not in a worker."""
    lyrics = "la la la\n" * 200
    parent = Job.new("acme", "generate", {"tags": "piano", "lyrics": lyrics})
    jobs = JobStore(redis_client)
    jobs.create(parent)
    jobs.start(parent.id)
    store = LocalStore(tmp_path / "artifacts")
    store.put_bytes(artifact_key("acme", parent.id, "tokens.npy"), tokens_bytes(np.zeros((8, 100))))
    jobs.succeed(parent.id, ["tokens.npy", "audio.flac"])
    room = CONTEXT_POSITIONS - 100 - prompt_counter(None).rows("piano", lyrics)

    def extend(frames: int) -> Any:
        params = {"source_job_id": parent.id, "duration_s": frames * FRAME_S}
        return client.post("/v1/jobs", json={"type": "extend", "params": params}, headers=auth)

    error = error_of(extend(room + 1), 422)
    assert (
        error["field"] == "params.duration_s" and f"at most {room} new frames" in error["message"]
    )
    assert extend(room).status_code == 202
