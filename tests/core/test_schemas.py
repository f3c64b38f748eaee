"""Request schemas: limits come from Settings, errors name the field, params are normalised."""

from __future__ import annotations

import typing

import pytest

from shared.core.config import Settings
from shared.core.jobs import STATES, Job
from shared.core.jobtypes import parse_submit
from shared.core.schemas import (
    DecodeParams,
    GenerateParams,
    InvalidRequest,
    JobOut,
    JobState,
    job_out,
)

SETTINGS = Settings.from_env(
    {
        "HEARTCLUSTER_MAX_TAGS": "3",
        "HEARTCLUSTER_MAX_LYRICS_CHARS": "20",
        "HEARTCLUSTER_MAX_DURATION_S": "60",
    }
)


def submit(params: dict, type: str = "generate", **extra) -> tuple:
    request, entry, params = parse_submit({"type": type, "params": params, **extra}, SETTINGS)
    assert entry.name == request.type and isinstance(params, entry.params)
    return request, params


def test_generate_defaults_and_normalised_tags() -> None:
    request, params = submit({"tags": " piano, happy ,", "seed": 7, "duration_s": 12})
    assert request.type == "generate" and request.idempotency_key is None
    assert isinstance(params, GenerateParams)
    assert params.model_dump() == {
        "tags": "piano,happy",
        "lyrics": "",
        "duration_s": 12.0,
        "temperature": 1.0,
        "top_k": 50,
        "cfg_scale": 1.5,
        "seed": 7,
        "format": "flac",
        "adapter_id": None,
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "karaoke", "params": {}}, "type"),
        ({"params": {"tags": "a"}}, "type"),
        ({"type": "generate", "params": {}}, "params.tags"),
        ({"type": "generate", "params": {"tags": ""}}, "params.tags"),
        ({"type": "generate", "params": {"tags": " , "}}, "params.tags"),
        ({"type": "generate", "params": {"tags": "a,b,c,d"}}, "params.tags"),
        ({"type": "generate", "params": {"tags": 5}}, "params.tags"),
        ({"type": "generate", "params": {"tags": "a", "lyrics": "x" * 21}}, "params.lyrics"),
        ({"type": "generate", "params": {"tags": "a", "duration_s": "30"}}, "params.duration_s"),
        ({"type": "generate", "params": {"tags": "a", "duration_s": 0}}, "params.duration_s"),
        ({"type": "generate", "params": {"tags": "a", "duration_s": 61}}, "params.duration_s"),
        (
            {"type": "generate", "params": {"tags": "a", "duration_s": float("nan")}},
            "params.duration_s",
        ),
        ({"type": "generate", "params": {"tags": "a", "temperature": 2.5}}, "params.temperature"),
        ({"type": "generate", "params": {"tags": "a", "temperature": 0}}, "params.temperature"),
        ({"type": "generate", "params": {"tags": "a", "top_k": 0}}, "params.top_k"),
        ({"type": "generate", "params": {"tags": "a", "top_k": 9000}}, "params.top_k"),
        ({"type": "generate", "params": {"tags": "a", "top_k": 5.5}}, "params.top_k"),
        ({"type": "generate", "params": {"tags": "a", "top_k": True}}, "params.top_k"),
        ({"type": "generate", "params": {"tags": "a", "top_k": "5"}}, "params.top_k"),
        ({"type": "generate", "params": {"tags": "a", "cfg_scale": 0.5}}, "params.cfg_scale"),
        ({"type": "generate", "params": {"tags": "a", "seed": -1}}, "params.seed"),
        ({"type": "generate", "params": {"tags": "a", "seed": 2**32}}, "params.seed"),
        ({"type": "generate", "params": {"tags": "a", "seed": True}}, "params.seed"),
        ({"type": "generate", "params": {"tags": "a", "format": "ogg"}}, "params.format"),
        ({"type": "generate", "params": {"tags": "a", "temprature": 1}}, "params.temprature"),
        ({"type": "generate", "params": "tags=a"}, "params"),
        ({"type": "generate", "params": {"tags": "a"}, "idempotency_key": ""}, "idempotency_key"),
        ({"type": "generate", "params": {"tags": "a"}, "extra": 1}, "extra"),
        ({"type": "decode", "params": {}}, "params.tokens_upload_id"),
        (
            {"type": "decode", "params": {"source_job_id": "a", "tokens_upload_id": "b"}},
            "params.tokens_upload_id",
        ),
        ({"type": "decode", "params": {"source_job_id": "a", "steps": 0}}, "params.steps"),
        ({"type": "encode", "params": {}}, "params.upload_id"),
    ],
)
def test_bad_requests_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_submit(body, SETTINGS)
    assert caught.value.field == field
    assert caught.value.message
    assert caught.value.details[0]["field"] == field


def test_a_whole_float_is_that_integer() -> None:
    """JSON Schema (and so the OpenAPI document) counts 5.0 as an integer."""
    _, params = submit({"tags": "a", "top_k": 5.0, "seed": 7.0})
    assert (params.top_k, params.seed) == (5, 7)
    assert isinstance(params.top_k, int) and isinstance(params.seed, int)


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidRequest, match="JSON object") as caught:
        parse_submit(["generate"], SETTINGS)
    assert caught.value.field is None


def test_limit_messages_say_the_limit() -> None:
    with pytest.raises(InvalidRequest, match="at most 3"):
        submit({"tags": "a,b,c,d"})
    with pytest.raises(InvalidRequest, match="limit of 60"):
        submit({"tags": "a", "duration_s": 90})


def test_default_limits_without_settings() -> None:
    assert GenerateParams.model_validate({"tags": "a", "duration_s": 600}).duration_s == 600
    with pytest.raises(ValueError, match="limit of 600"):
        GenerateParams.model_validate({"tags": "a", "duration_s": 601})


def test_decode_and_encode_sources() -> None:
    _, params = submit({"source_job_id": "j1"}, type="decode")
    assert isinstance(params, DecodeParams) and params.steps == 10
    _, params = submit({"tokens_upload_id": "u1", "format": "wav"}, type="decode")
    assert params.tokens_upload_id == "u1" and params.format == "wav"
    _, params = submit({"upload_id": "u1"}, type="encode")
    assert params.upload_id == "u1"


def test_job_out_drops_internal_fields() -> None:
    job = Job.new("acme", "generate", {"tags": "a"})
    public = job_out(job)
    assert "tenant" not in public
    assert set(public) == set(JobOut.model_fields)
    assert JobOut.model_validate(public).id == job.id
    assert set(typing.get_args(JobState)) == set(STATES)
