"""The OpenAPI document: derived from the route table and the pydantic models, valid OpenAPI 3.1,
with every job type's params and this deployment's limits, and a submit schema that accepts
exactly the bodies the gateway accepts (test_schemathesis.py fuzzes the rest)."""

from __future__ import annotations

import base64
import re
from functools import cache
from pathlib import Path
from typing import Any

import hypothesis
import jsonschema
import jsonschema_rs  # installed with schemathesis
import pytest
from hypothesis import strategies as st
from pydantic import ValidationError

from api.gateway import create_app
from api.gateway.openapi import build_document, job_types
from shared.core.config import Settings
from shared.core.schemas import GenerateParams
from shared.core.storage import LocalStore
from shared.core.tenants import TenantStore
from tests.support.fakes import RecordingCelery

MAX_TAGS = 3
MAX_LYRICS = 50
MAX_DURATION = 40.0


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings.from_env(
        {
            "HEARTCLUSTER_REDIS_URL": redis_url,
            "HEARTCLUSTER_DATA_DIR": str(tmp_path),
            "HEARTCLUSTER_MAX_TAGS": str(MAX_TAGS),
            "HEARTCLUSTER_MAX_LYRICS_CHARS": str(MAX_LYRICS),
            "HEARTCLUSTER_MAX_DURATION_S": str(MAX_DURATION),
        }
    )


@pytest.fixture
def app(settings: Settings, redis_client):
    return create_app(settings, redis_client, LocalStore(settings.local_root), RecordingCelery())


@pytest.fixture
def doc(app) -> dict[str, Any]:
    return app.test_client().get("/openapi.json").get_json()


@pytest.fixture
def acme(redis_client) -> dict[str, str]:
    return {"Authorization": f"Bearer {TenantStore(redis_client).create_key('acme')}"}


def test_documented_operations_are_the_routes(app, doc: dict[str, Any]) -> None:
    routes = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert documented == routes
    assert len(routes) >= 10


def test_authentication_follows_the_blueprints(doc: dict[str, Any]) -> None:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            secured = operation.get("security") != []
            assert secured == path.startswith("/v1/"), (path, method)
            assert ("401" in operation["responses"]) == secured
            assert "431" in operation["responses"]


def test_an_undocumented_view_is_refused(app, settings: Settings) -> None:
    app.add_url_rule("/boom", "boom", lambda: "x")
    with pytest.raises(TypeError, match="boom"):
        build_document(app, settings, job_types())


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    from openapi_spec_validator import OpenAPIV31SpecValidator  # installed with moto[server]

    OpenAPIV31SpecValidator(doc).validate()
    assert doc["openapi"] == "3.1.0"


def test_every_job_type_has_its_params_with_the_limits(
    doc: dict[str, Any], settings: Settings
) -> None:
    schemas = doc["components"]["schemas"]
    mapping = schemas["SubmitRequest"]["discriminator"]["mapping"]
    assert list(mapping) == [name for name, _ in job_types()]
    for name, params in job_types():
        variant = schemas[mapping[name].split("/")[-1]]
        assert variant["properties"]["type"] == {"const": name}
        assert variant["properties"]["params"] == {
            "$ref": f"#/components/schemas/{params.__name__}"
        }
        component = schemas[params.__name__]
        assert list(component["properties"]) == list(params.model_fields)
        assert component["additionalProperties"] is False
    for model in ("GenerateParams", "ExtendParams"):
        duration = schemas[model]["properties"]["duration_s"]
        assert duration["maximum"] == settings.max_duration_s == MAX_DURATION
        assert duration["exclusiveMinimum"] == 0
    lyrics = schemas["InpaintParams"]["properties"]["lyrics"]["anyOf"][0]
    assert lyrics["maxLength"] == settings.max_lyrics_chars == MAX_LYRICS
    assert schemas["GenerateParams"]["properties"]["top_k"]["maximum"] == 8197


def test_uploads_sse_and_artifacts_are_described(doc: dict[str, Any]) -> None:
    upload = doc["paths"]["/v1/uploads"]["post"]
    media = upload["requestBody"]["content"]["multipart/form-data"]
    assert media["encoding"]["file"]["contentType"] == "audio/*, application/octet-stream"
    assert {"201", "413", "422"} <= set(upload["responses"])
    events = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    event = events["text/event-stream"]["schema"]
    assert event["properties"]["data"]["contentSchema"] == {"$ref": "#/components/schemas/JobEvent"}
    artifacts = doc["paths"]["/v1/jobs/{job_id}/artifacts/{name}"]["get"]["responses"]
    assert {"application/json", "audio/flac", "application/octet-stream"} <= set(
        artifacts["200"]["content"]
    )
    assert "302" in artifacts
    listing = doc["paths"]["/v1/jobs"]["get"]["responses"]["422"]["description"]
    assert "cursor" in listing
    assert "422" in doc["paths"]["/readyz"]["get"]["responses"]


def _valid(doc: dict[str, Any], body: Any) -> bool:
    schema = {"$ref": "#/components/schemas/SubmitRequest", "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema).is_valid(body)


TAGS = ",".join(f"t{i}" for i in range(MAX_TAGS))
TOO_MANY_TAGS = ",".join(f"t{i}" for i in range(MAX_TAGS + 1))


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"type": "generate", "params": {"tags": "piano"}}, True),
        ({"type": "generate", "params": {"tags": f" ,{TAGS}, ,", "duration_s": 40}}, True),
        ({"type": "decode", "params": {"source_job_id": "nope"}}, True),
        ({"type": "decode", "params": {"source_job_id": None, "tokens_upload_id": "x"}}, True),
        ({"type": "encode", "params": {"upload_id": "nope"}, "idempotency_key": "k"}, True),
        ({"type": "transcribe", "params": {"upload_id": "nope", "language": "en"}}, True),
        ({"type": "generate", "params": {"tags": " , "}}, False),
        ({"type": "generate", "params": {"tags": TOO_MANY_TAGS}}, False),
        ({"type": "generate", "params": {"tags": "a", "duration_s": MAX_DURATION + 1}}, False),
        ({"type": "generate", "params": {"tags": "a", "lyrics": "x" * (MAX_LYRICS + 1)}}, False),
        ({"type": "generate"}, False),
        ({"type": "generate", "params": {"upload_id": "x"}}, False),
        ({"type": "encode", "params": {"tags": "piano"}}, False),
        ({"type": "decode", "params": {}}, False),
        ({"type": "decode", "params": {"source_job_id": "a", "tokens_upload_id": "b"}}, False),
        ({"type": "nope", "params": {}}, False),
        ({"type": "generate", "params": {"tags": "a"}, "extra": 1}, False),
        ({"type": "generate", "params": {"tags": "a"}, "idempotency_key": ""}, False),
        (["generate"], False),
    ],
)
def test_the_submit_schema_accepts_what_the_gateway_accepts(
    app, doc: dict[str, Any], acme: dict[str, str], body: Any, valid: bool
) -> None:
    assert _valid(doc, body) == valid
    reply = app.test_client().post("/v1/jobs", json=body, headers=acme)
    # a valid body may still name a job or upload that does not exist (404)
    assert (reply.status_code in (202, 404)) == valid, reply.get_json()
    assert str(reply.status_code) in doc["paths"]["/v1/jobs"]["post"]["responses"]


def test_an_integral_float_is_an_integer(app, doc: dict[str, Any], acme) -> None:
    body = {"type": "generate", "params": {"tags": "piano", "top_k": 50.0}}
    assert _valid(doc, body)
    assert app.test_client().post("/v1/jobs", json=body, headers=acme).status_code == 202


def test_a_nan_cursor_is_the_documented_422(app, doc: dict[str, Any], acme) -> None:
    cursor = base64.urlsafe_b64encode(b"nan:x").decode()
    reply = app.test_client().get(f"/v1/jobs?cursor={cursor}", headers=acme)
    assert (reply.status_code, reply.get_json()["error"]["field"]) == (422, "cursor")


TAGS_LIMIT = Settings(max_tags=MAX_TAGS)


@cache
def _tags_schema() -> jsonschema_rs.Validator:
    """The tags schema under ECMA-262 regex rules, as JSON Schema tools read it (Python's \\s
    would hide the difference: it matches what str.strip() removes, ECMA's \\s does not)."""
    app = create_app(TAGS_LIMIT, None, LocalStore("unused"), RecordingCelery())
    doc = build_document(app, TAGS_LIMIT, job_types())
    tags = doc["components"]["schemas"]["GenerateParams"]["properties"]["tags"]
    return jsonschema_rs.validator_for(tags)


@hypothesis.settings(derandomize=True, database=None, deadline=None)
@hypothesis.given(
    st.text(st.sampled_from([",", " ", "a", "é", "\x1c", "\x85", "\u3000", "\ufeff"]))
)
def test_the_tags_pattern_is_the_tags_validator(tags: str) -> None:
    """Blank tags are dropped and the rest counted the way str.strip() sees blanks."""
    try:
        GenerateParams.model_validate({"tags": tags}, context={"settings": TAGS_LIMIT})
        accepted = True
    except ValidationError:
        accepted = False
    assert _tags_schema().is_valid(tags) == accepted
