"""GET /openapi.json: an OpenAPI 3.1 document generated from shared/schemas.py, the same models
that validate requests, with this deployment's limits filled in."""

from __future__ import annotations

from functools import cache
from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from pydantic.json_schema import models_json_schema

from api.gateway.app import services
from shared.core.config import Settings
from shared.core.jobs import STATES
from shared.core.jobtypes import JOB_TYPES
from shared.core.schemas import (
    ErrorBody,
    JobList,
    JobOut,
    SubmitRequest,
    UploadOut,
)

bp = Blueprint("openapi", __name__)

_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "Malformed request",
        401: "Missing or unknown API key",
        404: "No such job (or another tenant's)",
        409: "Idempotency key reused with other parameters",
        413: "Upload too large",
        422: "Invalid parameters; error.field names the field",
        503: "A backing service is unreachable",
    }
    return {str(status): _json("ErrorBody", reasons[status]) for status in statuses}


def _job_id_param() -> dict[str, Any]:
    return {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def build_document(settings: Settings) -> dict[str, Any]:
    inputs = [(SubmitRequest, "validation")] + [
        (model, "validation") for model in (t.params for t in JOB_TYPES.values())
    ]
    outputs = [(model, "serialization") for model in (JobOut, JobList, UploadOut, ErrorBody)]
    _, definitions = models_json_schema(inputs + outputs, ref_template=_REF)
    schemas = definitions["$defs"]
    generate = schemas["GenerateParams"]["properties"]
    generate["lyrics"]["maxLength"] = settings.max_lyrics_chars
    generate["duration_s"]["maximum"] = settings.max_duration_s
    schemas["SubmitRequest"]["properties"]["params"] = {
        "description": "Parameters of the job `type`.",
        "oneOf": [_ref(model.__name__) for model in (t.params for t in JOB_TYPES.values())],
    }
    job_path = {"parameters": [_job_id_param()]}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "heartcluster",
            "version": "1",
            "description": "Music generation jobs on HeartMuLa. Every /v1 route needs "
            "'Authorization: Bearer API_KEY'. Errors are JSON {error: {code, message, field}}.",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/jobs": {
                "post": {
                    "operationId": "submitJob",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("SubmitRequest")}},
                    },
                    "responses": {
                        "202": _json("JobOut", "Job created and queued"),
                        "200": _json("JobOut", "Idempotent replay: the first job"),
                        **_errors(400, 401, 409, 422, 503),
                    },
                },
                "get": {
                    "operationId": "listJobs",
                    "parameters": [
                        {"name": "state", "in": "query", "schema": {"enum": list(STATES)}},
                        {"name": "type", "in": "query", "schema": {"enum": list(JOB_TYPES)}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                        },
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json("JobList", "Jobs, newest first"),
                        **_errors(401, 422),
                    },
                },
            },
            "/v1/jobs/{job_id}": {
                **job_path,
                "get": {
                    "operationId": "getJob",
                    "responses": {"200": _json("JobOut", "The job"), **_errors(401, 404)},
                },
            },
            "/v1/jobs/{job_id}/cancel": {
                **job_path,
                "post": {
                    "operationId": "cancelJob",
                    "responses": {
                        "200": _json("JobOut", "Cancelled, cancelling, or already finished"),
                        **_errors(401, 404),
                    },
                },
            },
            "/v1/jobs/{job_id}/events": {
                **job_path,
                "get": {
                    "operationId": "jobEvents",
                    "description": "Server-Sent Events `state` and `progress`; each data line "
                    "is {event, job: JobOut}; the stream ends after a terminal state.",
                    "responses": {
                        "200": {
                            "description": "Event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors(401, 404),
                    },
                },
            },
            "/v1/jobs/{job_id}/artifacts/{name}": {
                "parameters": [
                    _job_id_param(),
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
                "get": {
                    "operationId": "getArtifact",
                    "responses": {
                        "200": {
                            "description": "The artifact's bytes (local store)",
                            "content": {"application/octet-stream": {}},
                        },
                        "302": {"description": "Redirect to a presigned URL (S3 store)"},
                        **_errors(401, 404),
                    },
                },
            },
            "/v1/uploads": {
                "post": {
                    "operationId": "createUpload",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["file"],
                                    "properties": {
                                        "file": {
                                            "type": "string",
                                            "format": "binary",
                                            "description": "Audio, or a .npy [8, T] token "
                                            f"array; at most {settings.max_upload_bytes} bytes",
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "201": _json("UploadOut", "Stored"),
                        **_errors(401, 413, 422),
                    },
                },
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "security": [],
                    "responses": {"200": {"description": "The process is alive"}},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "security": [],
                    "parameters": [
                        {
                            "name": "queues",
                            "in": "query",
                            "description": "Comma-separated queues that need a live worker",
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {"description": "Redis and the object store answer"},
                        "503": {"description": "Not ready; the body says what failed"},
                    },
                }
            },
        },
    }


@cache
def _document_for(settings: Settings) -> dict[str, Any]:
    return build_document(settings)


@bp.get("/openapi.json")
def openapi_json() -> ResponseReturnValue:
    return jsonify(_document_for(services().settings))
