"""GET /openapi.json: an OpenAPI 3.1 document derived from the app itself.

Paths, methods and path parameters come from the route table (app.url_map), authentication from
the blueprints' before-request hooks, what each view takes and answers from its @documented
metadata (apidoc.py), and the schemas from the pydantic models that validate requests and shape
replies, with this deployment's limits (Settings) filled in. Nothing is written twice, so the
document cannot drift from the routes.
"""

from __future__ import annotations

import inspect
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from werkzeug.routing import Rule

from api.gateway.apidoc import Body, Doc, Reply, doc_of, documented
from api.gateway.app import services
from api.gateway.auth import authenticate
from shared.core.config import Settings
from shared.core.jobtypes import JOB_TYPES
from shared.core.schemas import DatasetCreate, DatasetItemIn, ErrorBody, SubmitRequest
from shared.core.text import CONTROL_CLASS

bp = Blueprint("openapi", __name__)

JobTypes = Iterable[tuple[str, type[BaseModel]]]

_REF = "#/components/schemas/{model}"
_DOCUMENT_KEY = "heartcluster.openapi"

# Answered for any route: by the auth hook of /v1 blueprints, and by the HTTP server itself.
_UNAUTHORIZED = Reply(
    "Missing or unknown API key: send `Authorization: Bearer API_KEY`",
    ErrorBody,
    headers={"WWW-Authenticate": "`Bearer`"},
)
_HEADERS_TOO_LARGE = Reply(
    "A header line over 64 KiB, or over 100 headers (answered by the gateway's HTTP server)",
    ErrorBody,
)

# Cross-field rules of the params models that JSON Schema can state: exactly one of two sources.
_ONE_SOURCE_OF = {entry.params: entry.alternative_sources for entry in JOB_TYPES.values()}
_ONE_SOURCE_OF[DatasetItemIn] = ("upload_id", "source_job_id")
# Request bodies besides job params whose validators the schema states too.
_RULED_BODIES = (DatasetCreate, DatasetItemIn)

_RULE_ARGUMENT = re.compile(r"<(?:(?P<converter>\w+)(?:\([^)]*\))?:)?(?P<name>\w+)>")
# What Werkzeug's default converter matches; "." and ".." would be resolved away by clients.
_PATH_SEGMENT = {"type": "string", "pattern": r"^(?!\.\.?$)[^/]+$"}


def job_types() -> JobTypes:
    """(type name, params model) of every job type: the one place the document learns them."""
    return ((t.name, t.params) for t in JOB_TYPES.values())


@dataclass(frozen=True)
class _Operation:
    rule: Rule
    method: str
    view: Callable[..., Any]
    doc: Doc
    authenticated: bool

    @property
    def path(self) -> str:
        return _RULE_ARGUMENT.sub(r"{\g<name>}", self.rule.rule)


def build_document(app: Flask, settings: Settings, types: JobTypes) -> dict[str, Any]:
    """The document of `app`'s routes with `settings`' limits and the job `types` (name, params
    model) that POST /v1/jobs accepts."""
    types = list(types)
    operations = [(operation, _operation(operation, settings)) for operation in _operations(app)]
    models: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}  # an ordered set
    for _, described in operations:
        for model in _models_in(described.get("requestBody")):
            models[model, "validation"] = None
        for model in _models_in(described["responses"]):
            models[model, "serialization"] = None
    for _, params in types:
        models[params, "validation"] = None
    paths: dict[str, dict[str, Any]] = {}
    for operation, described in operations:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _with_refs(described)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "heartcluster",
            "version": "1",
            "description": "Music generation jobs on HeartMuLa. Every /v1 route needs "
            "`Authorization: Bearer API_KEY`. Every error is JSON "
            "`{error: {code, message, field}}`; `field` names the request field at fault. Behind "
            "another HTTP server (e.g. gunicorn), its own refusals (oversized headers) may not be.",
        },
        "components": {
            "schemas": _schemas(list(models), types, settings),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


# -- operations ------------------------------------------------------------------------------


def _operations(app: Flask) -> Iterator[_Operation]:
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        view = app.view_functions[rule.endpoint]
        doc = doc_of(view)
        if doc is None:
            raise TypeError(f"view {rule.endpoint} ({rule.rule}) has no @documented metadata")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield _Operation(rule, method, view, doc, _authenticated(app, rule.endpoint))


def _authenticated(app: Flask, endpoint: str) -> bool:
    """Whether `authenticate` runs before the view (an app hook, or one of its blueprints')."""
    parts = endpoint.split(".")[:-1]
    scopes = [None] + [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(authenticate in app.before_request_funcs.get(scope, []) for scope in scopes)


def _operation(operation: _Operation, settings: Settings) -> dict[str, Any]:
    """The operation object, with pydantic model classes where schemas refer to components."""
    doc = operation.doc
    summary, _, description = (inspect.getdoc(operation.view) or "").partition("\n\n")
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": _path_schema(converter)}
        for converter, name in _RULE_ARGUMENT.findall(operation.rule.rule)
    ]
    parameters += [{"name": name, "in": "query", **spec} for name, spec in doc.query.items()]
    parameters += [{"name": name, "in": "header", **spec} for name, spec in doc.headers.items()]
    result: dict[str, Any] = {
        "operationId": re.sub(
            r"_(\w)", lambda match: match.group(1).upper(), operation.view.__name__
        ),
        "summary": " ".join(summary.split()),
        "tags": [operation.rule.endpoint.rpartition(".")[0] or "app"],
    }
    if description:
        result["description"] = description
    if not operation.authenticated:
        result["security"] = []
    if parameters:
        result["parameters"] = _fill_limits(parameters, settings)
    if doc.body is not None:
        result["requestBody"] = _fill_limits(_request_body(doc.body), settings)
    replies = _replies(operation)
    result["responses"] = _fill_limits(
        {str(status): _reply(replies[status]) for status in sorted(replies)}, settings
    )
    return result


def _replies(operation: _Operation) -> dict[int, Reply]:
    """The view's replies (a bare description is a JSON error), and those of every route."""
    replies = {
        status: reply if isinstance(reply, Reply) else Reply(reply, ErrorBody)
        for status, reply in operation.doc.replies.items()
    }
    if operation.authenticated:
        replies.setdefault(401, _UNAUTHORIZED)
    replies.setdefault(431, _HEADERS_TOO_LARGE)
    return replies


def _path_schema(converter: str) -> dict[str, Any]:
    if converter not in ("", "default", "string"):
        raise TypeError(f"no schema for the route converter {converter!r}")
    return dict(_PATH_SEGMENT)


def _request_body(body: Body) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": body.model or body.schema}
    if body.encoding:
        media["encoding"] = body.encoding
    result: dict[str, Any] = {"required": True, "content": {body.media_type: media}}
    if body.description:
        result["description"] = body.description
    return result


def _reply(reply: Reply) -> dict[str, Any]:
    result: dict[str, Any] = {"description": reply.description}
    if reply.headers:
        result["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in reply.headers.items()
        }
    content = dict(reply.content)
    if reply.model is not None:
        content["application/json"] = {"schema": reply.model}
    if content:
        result["content"] = content
    return result


def _is_model(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _models_in(node: Any) -> Iterator[type[BaseModel]]:
    if _is_model(node):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from _models_in(value)
    elif isinstance(node, list | tuple):
        for item in node:
            yield from _models_in(item)


def _with_refs(node: Any) -> Any:
    """A copy of `node` with each model class replaced by a reference to its component."""
    if _is_model(node):
        return {"$ref": _REF.format(model=node.__name__)}
    if isinstance(node, Mapping):
        return {key: _with_refs(value) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return [_with_refs(item) for item in node]
    return node


def _fill_limits(node: Any, settings: Settings) -> Any:
    """Descriptions with `{settings.NAME}` get this deployment's value."""
    if isinstance(node, Mapping):
        return {
            key: value.format(settings=settings)
            if key == "description" and isinstance(value, str)
            else _fill_limits(value, settings)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_fill_limits(item, settings) for item in node]
    return node


# -- components ------------------------------------------------------------------------------


def _schemas(
    models: list[tuple[type[BaseModel], JsonSchemaMode]],
    types: list[tuple[str, type[BaseModel]]],
    settings: Settings,
) -> dict[str, Any]:
    refs, definitions = models_json_schema(models, ref_template=_REF)
    for (model, _), ref in refs.items():  # _with_refs names components after their model
        if ref != _with_refs(model):
            raise TypeError(f"{model.__name__} has two schemas ({ref}); name them apart")
    schemas: dict[str, Any] = definitions["$defs"]
    for _, params in types:
        _add_rules(schemas[params.__name__], params, settings)
    for body in _RULED_BODIES:
        if body.__name__ in schemas:
            _add_rules(schemas[body.__name__], body, settings)
    if DatasetCreate.__name__ in schemas:
        items = schemas[DatasetCreate.__name__]["properties"]["items"]
        items["maxItems"] = settings.max_dataset_items
    if SubmitRequest.__name__ in schemas:
        schemas.update(_submit_variants(schemas[SubmitRequest.__name__], types, settings))
    return schemas


def _add_rules(schema: dict[str, Any], params: type[BaseModel], settings: Settings) -> None:
    """This deployment's limits, and the rules the validators check, stated in the schema."""
    properties = schema["properties"]
    limits = {
        "tags": {"pattern": _tags_pattern(settings.max_tags)},
        "lyrics": {"maxLength": settings.max_lyrics_chars},
        "duration_s": {"maximum": settings.max_duration_s},
    }
    for name, keywords in limits.items():
        if name in properties:
            _non_null(properties[name]).update(keywords)
    multiline = getattr(params, "multiline_fields", frozenset())
    for name, prop in properties.items():
        branch = _non_null(prop)
        if branch.get("type") == "string" and "pattern" not in branch and "enum" not in branch:
            allowed = "\\t\\n" if name in multiline else ""
            branch["pattern"] = (
                f"^[^{CONTROL_CLASS}]*$"
                if not allowed
                else (f"^(?:[^{CONTROL_CLASS}]|[{allowed}])*$")
            )
    sources = _ONE_SOURCE_OF.get(params)
    if sources:
        schema["oneOf"] = [
            {"required": [name], "properties": {name: {"type": "string"}}} for name in sources
        ]
        schema["description"] = (
            f"{schema.get('description', '')} Give exactly one of {' or '.join(sources)}."
        ).strip()


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    """The branch of `X | None` that is not null (or the schema itself)."""
    for branch in schema.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return schema


@cache
def _python_space() -> str:
    """A regex class of what str.strip() removes (wider than JSON Schema's \\s), less the
    control characters text fields refuse anyway."""
    codes = [
        code
        for code in range(sys.maxunicode + 1)
        if chr(code).isspace() and unicodedata.category(chr(code)) != "Cc"
    ]
    ranges: list[list[int]] = []
    for code in codes:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return "".join(
        f"\\u{low:04x}" if low == high else f"\\u{low:04x}-\\u{high:04x}" for low, high in ranges
    )


def _tags_pattern(max_tags: int) -> str:
    """Comma-separated tags with 1 to `max_tags` non-blank ones (blank ones are dropped), no
    control characters."""
    space = _python_space()
    blank = f"[{space}]*,"
    tag = f"[{space}]*[^,{space}{CONTROL_CLASS}][^,{CONTROL_CLASS}]*"
    return f"^(?:{blank})*{tag}(?:,(?:{blank})*{tag}){{0,{max_tags - 1}}}(?:,[{space}]*)*$"


def _submit_variants(
    envelope: dict[str, Any], types: list[tuple[str, type[BaseModel]]], settings: Settings
) -> dict[str, Any]:
    """SubmitRequest as one variant per job type, chosen by `type`, so a body that fits the
    schema is one the gateway accepts (params may be left out only where {} is valid)."""
    variants: dict[str, Any] = {}
    mapping: dict[str, str] = {}
    for name, params in types:
        variant = "Submit" + "".join(part.title() for part in name.split("_"))
        mapping[name] = _REF.format(model=variant)
        variants[variant] = {
            "title": f"Submit a {name} job",
            "type": "object",
            "properties": {
                **envelope["properties"],
                "type": {"const": name},
                "params": _with_refs(params),
            },
            "required": ["type"] if _empty_is_valid(params, settings) else ["type", "params"],
            "additionalProperties": False,
        }
    return variants | {
        SubmitRequest.__name__: {
            "description": "A job: its `type` and that type's `params`.",
            "oneOf": [{"$ref": ref} for ref in mapping.values()],
            "discriminator": {"propertyName": "type", "mapping": mapping},
        }
    }


def _empty_is_valid(params: type[BaseModel], settings: Settings) -> bool:
    try:
        params.model_validate({}, context={"settings": settings})
    except ValidationError:
        return False
    return True


@bp.get("/openapi.json")
@documented({200: Reply("This document", content={"application/json": {"schema": {}}})})
def openapi_json() -> ResponseReturnValue:
    """The OpenAPI 3.1 document of this gateway, with this deployment's limits."""
    extensions = current_app.extensions
    if _DOCUMENT_KEY not in extensions:
        extensions[_DOCUMENT_KEY] = build_document(current_app, services().settings, job_types())
    return jsonify(extensions[_DOCUMENT_KEY])
