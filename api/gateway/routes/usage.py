"""/v1/usage: the tenant's usage against its quotas."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue

from api.gateway.apidoc import Reply, documented
from api.gateway.auth import authenticate, current_tenant
from api.gateway.tenancy import tenancy
from shared.core.schemas import UsageOut

bp = Blueprint("usage", __name__, url_prefix="/v1/usage")
bp.before_request(authenticate)


@bp.get("")
@documented({200: Reply("The tenant's usage and limits (null: unlimited)", UsageOut)})
def get_usage() -> ResponseReturnValue:
    """Running and queued jobs, today's audio and fine-tune GPU seconds (UTC), stored bytes
    and the submit rate, each against the tenant's limit."""
    tenant = current_tenant()
    quotas = tenancy().quotas
    limits, used = quotas.standing(tenant)

    def pair(value: float, limit: float) -> dict[str, float | None]:
        return {"used": value, "limit": limit or None}

    return jsonify(
        {
            "weight": limits.weight,
            "running": pair(used["running"], limits.max_running),
            "queued": pair(used["queued"], limits.max_queued),
            "audio_seconds_today": pair(used["audio_seconds_today"], limits.audio_seconds_per_day),
            "finetune_gpu_seconds_today": pair(
                used["finetune_gpu_seconds_today"], limits.finetune_gpu_seconds_per_day
            ),
            "storage_bytes": pair(used["storage_bytes"], limits.storage_bytes),
            "submits_per_minute": pair(
                quotas.submits_held(tenant, limits), limits.submits_per_minute
            ),
        }
    )
