"""Bearer API keys → tenant, for every /v1 route."""

from __future__ import annotations

from flask import g, request

from api.gateway.app import services
from api.gateway.errors import ApiError


def authenticate() -> None:
    """before_request hook: sets g.tenant or answers 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "unauthorized", "send 'Authorization: Bearer API_KEY'")
    tenant = services().tenants.tenant_for_key(key.strip())
    if tenant is None:
        raise ApiError(401, "unauthorized", "unknown API key")
    g.tenant = tenant


def current_tenant() -> str:
    return g.tenant
