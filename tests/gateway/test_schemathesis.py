"""Schemathesis against the live gateway (real HTTP on loopback, real redis-server), with a bounded
number of cases per operation: no 5xx, every status, content type, header and body as documented,
schema-valid requests accepted and schema-invalid ones refused.

The fuzzer's random ids never name a job, so one succeeded job with every kind of artifact is
seeded under a fixed id, and a hook sends some of the generated path parameters to it.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import numpy as np
import pytest
import requests
import schemathesis
import soundfile
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.gateway import create_app
from api.gateway.openapi import build_document, job_types
from shared.core.config import Settings
from shared.core.jobs import Job, JobStore
from shared.core.queueing import QUEUES
from shared.core.storage import LocalStore, artifact_key
from shared.core.tenants import TenantStore
from tests.support.fakes import RecordingCelery
from tests.support.live import serving

EXAMPLES_PER_OPERATION = 40
LIMITS = {
    "HEARTCLUSTER_MAX_UPLOAD_BYTES": "400000",
    "HEARTCLUSTER_MAX_UPLOAD_SECONDS": "5",
    "HEARTCLUSTER_MAX_TAGS": "4",
    "HEARTCLUSTER_MAX_LYRICS_CHARS": "100",
    "HEARTCLUSTER_MAX_DURATION_S": "60",
}
# 422s for rules the document states in words only: they span two fields or two places, or
# need a value only the server hands out.
RULES_BEYOND_THE_SCHEMA = {
    "params.end_s",  # greater than start_s
    "idempotency_key",  # the header and the body field agree
    "cursor",  # one the listing handed out
    "webhook_url",  # a public http(s) URL, once the tenant has a signing secret
    "url",  # the same, for the tenant's default endpoint
    "items",  # batch items (items[i].field) are submit bodies, each checked like one
    "params.warmup_steps",  # a fine-tune's warmup is shorter than its steps
}
SEEDED_JOB = "5eeded00000000000000000000000000"
ARTIFACTS = {
    "metadata.json": json.dumps({"seed": 7}).encode(),
    "audio.flac": b"fLaC",
    "tokens.npy": b"\x93NUMPY",
    "lyrics.lrc": b"[00:00.00] la",
    "lyrics.srt": b"1\n00:00:00,000 --> 00:00:01,000\nla\n",
}


def _document() -> dict[str, Any]:
    """The document of an app with LIMITS (building it connects to nothing)."""
    settings = Settings.from_env(LIMITS)
    app = create_app(settings, None, LocalStore("unused"), RecordingCelery())
    return build_document(app, settings, job_types())


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)
# A path parameter as the route's converter matches it (the document says how).
SEGMENT = re.compile(
    DOCUMENT["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"][0]["schema"]["pattern"]
)


@st.composite
def wav_files(draw: st.DrawFn) -> bytes:
    """Short WAV files, the audio that uploads accept."""
    rate = draw(st.sampled_from([8000, 16000, 48000]))
    frames = draw(st.integers(min_value=1, max_value=rate // 4))
    channels = draw(st.integers(min_value=1, max_value=2))
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((frames, channels), dtype=np.float32), rate, format="WAV")
    return buffer.getvalue()


schemathesis.openapi.media_type("audio/wav", wav_files())


def _schema_valid_segment(value: Any) -> bool:
    return isinstance(value, str) and SEGMENT.search(value) is not None


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Some valid job ids and artifact names become the seeded job and its artifacts."""
    if not path_parameters or not _schema_valid_segment(path_parameters.get("job_id")):
        return st.just(path_parameters)
    seeded = {**path_parameters, "job_id": SEEDED_JOB}
    if _schema_valid_segment(path_parameters.get("name")):
        return st.sampled_from(
            [path_parameters, seeded, *({**seeded, "name": name} for name in ARTIFACTS)]
        )
    return st.sampled_from([path_parameters, seeded])


@schema.auth(refresh_interval=None)
class TenantKey:
    """The live gateway's API key, sent where the document asks for authentication."""

    key = ""  # set by the `live` fixture

    def get(self, case: Any, context: Any) -> str:
        return TenantKey.key

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


def accepts_schema_valid_requests(ctx: Any, response: Any, case: Any) -> bool | None:
    """Schemathesis' positive_data_acceptance, except for the rules beyond the schema."""
    if response.status_code == 422:
        field = json.loads(response.content)["error"]["field"] or ""
        if field.split("[")[0] in RULES_BEYOND_THE_SCHEMA:
            return None
    return positive_data_acceptance(ctx, response, case)


@pytest.fixture
def live(redis_url: str, redis_client, tmp_path: Path) -> Iterator[str]:
    """Base URL of the gateway served over HTTP, with the seeded job and TenantKey's key."""
    settings = Settings.from_env(
        {"HEARTCLUSTER_REDIS_URL": redis_url, "HEARTCLUSTER_DATA_DIR": str(tmp_path), **LIMITS}
    )
    store = LocalStore(settings.local_root)
    app = create_app(settings, redis_client, store, RecordingCelery(consumed=QUEUES))
    jobs = JobStore(redis_client)
    jobs.create(Job(id=SEEDED_JOB, tenant="acme", type="generate", params={"tags": "piano"}))
    jobs.start(SEEDED_JOB)
    for name, data in ARTIFACTS.items():
        store.put_bytes(artifact_key("acme", SEEDED_JOB, name), data)
    jobs.succeed(SEEDED_JOB, list(ARTIFACTS))
    TenantKey.key = TenantStore(redis_client).create_key("acme")
    with serving(app) as url:
        yield url


def test_the_live_document_is_the_one_fuzzed(live: str) -> None:
    assert requests.get(f"{live}/openapi.json", timeout=10).json() == DOCUMENT


@schema.parametrize()
@hypothesis.settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,  # the same cases on every run: CI fails on the code, not on luck
    database=None,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
def test_gateway_conforms_to_its_document(case: Any, live: str) -> None:
    case.call_and_validate(
        base_url=live,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[accepts_schema_valid_requests],
        timeout=10,
    )
