"""What a view documents beyond its route: its replies, query and header parameters, body.

`@documented(...)` records a `Doc` on the view function, next to the code it describes;
openapi.py reads it back through app.view_functions and takes the rest (path, methods, path
parameters, authentication) from the route table itself. Descriptions written here may name a
deployment limit as `{settings.max_upload_bytes}`; the document fills in this deployment's value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

View = TypeVar("View", bound=Callable[..., Any])
Schema = Mapping[str, Any]

_DOC_ATTRIBUTE = "__api_doc__"


@dataclass(frozen=True)
class Reply:
    """A response: a JSON body of `model`, or bodies per media type (`content`: type → schema)."""

    description: str
    model: type[BaseModel] | None = None
    content: Mapping[str, Schema] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # name → description


@dataclass(frozen=True)
class Body:
    """The request body: a JSON `model`, or a `schema` of another media type."""

    model: type[BaseModel] | None = None
    media_type: str = "application/json"
    schema: Schema = field(default_factory=dict)
    encoding: Mapping[str, Schema] = field(default_factory=dict)  # multipart part → encoding
    description: str = ""


@dataclass(frozen=True)
class Doc:
    """`replies`: status → Reply, or a description alone for an ErrorBody (JSON error) reply.
    `query` and `headers`: parameter name → OpenAPI parameter fields (schema, description...)."""

    replies: Mapping[int, Reply | str]
    query: Mapping[str, Schema] = field(default_factory=dict)
    headers: Mapping[str, Schema] = field(default_factory=dict)
    body: Body | None = None


def documented(
    replies: Mapping[int, Reply | str],
    *,
    query: Mapping[str, Schema] | None = None,
    headers: Mapping[str, Schema] | None = None,
    body: Body | None = None,
) -> Callable[[View], View]:
    """Record the view's documentation on it (place it under the route decorator)."""
    doc = Doc(replies=replies, query=query or {}, headers=headers or {}, body=body)

    def record(view: View) -> View:
        setattr(view, _DOC_ATTRIBUTE, doc)
        return view

    return record


def doc_of(view: Callable[..., Any]) -> Doc | None:
    return getattr(view, _DOC_ATTRIBUTE, None)
