"""The gateway's side of fair sharing: the fair scheduler, the tenant's quotas and the 429s.

Built once per app from its settings and Redis client (beside the app's services, so the app
factory stays as it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flask import current_app

from api.gateway.app import services
from api.gateway.errors import ApiError
from shared.core.quotas import QuotaExceeded, QuotaStore, default_quotas
from shared.core.scheduler import FairScheduler

_EXTENSION = "heartcluster-tenancy"


@dataclass(frozen=True)
class Tenancy:
    scheduler: FairScheduler
    quotas: QuotaStore


def tenancy() -> Tenancy:
    """This app's scheduler and quota store (inside a request)."""
    built = current_app.extensions.get(_EXTENSION)
    if built is None:
        svc = services()
        defaults = default_quotas(svc.settings)
        built = Tenancy(FairScheduler(svc.redis, defaults), QuotaStore(svc.redis, defaults))
        current_app.extensions[_EXTENSION] = built
    return built


def over_quota(error: QuotaExceeded) -> ApiError:
    """429 naming the quota in `error.field`, with Retry-After when waiting helps."""
    code = "rate_limited" if error.field == "submits_per_minute" else "quota_exceeded"
    api_error = ApiError(429, code, error.message, error.field)
    if error.retry_after_s is not None:
        api_error.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return api_error
