"""One job from a submit body to the queue: validate (`prepare`), check the tenant's quotas
(`admit`), then record and enqueue (`launch`).

The submit route and every batch item take these same steps, so a batch item is exactly a job
submitted alone; a batch prepares and admits all its items before it records any. Recording
and enqueueing are one Redis transaction (the job, its audio reservation, its webhook, its
scheduler entry and its wake-up): a submit is recorded whole or not at all, in one round trip.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import redis
from flask import g, request

from api.gateway.app import services
from api.gateway.errors import ApiError
from api.gateway.tenancy import over_quota, tenancy
from shared.core.inputs import InputNotFound, SourceUpload
from shared.core.jobs import Job
from shared.core.jobtypes import JobType, parse_submit
from shared.core.queueing import enqueue
from shared.core.quotas import QuotaExceeded, QuotaStore, audio_seconds
from shared.core.schemas import InvalidRequest, Params, SubmitRequest
from shared.core.tokens import InputError
from shared.core.webhooks import TargetRefused, WebhookStore, check_target, job_subject


@dataclass(frozen=True)
class Prepared:
    """A validated submit: its params (inherited ones filled in) and what it builds on."""

    submission: SubmitRequest
    entry: JobType
    params: Params
    parent: Job | None  # the job the new one builds on
    first_step: Job | None  # a job to run first (encoding an uploaded song before an extend)
    webhook_url: str | None  # its own, checked; None: the tenant's endpoint, if it has one


def invalid(error: InvalidRequest) -> ApiError:
    """A body that is not an object is malformed (400); a bad field is invalid (422)."""
    if error.field is None:
        api_error = ApiError(400, "bad_request", error.message)
    else:
        api_error = ApiError(422, "invalid_params", error.message, error.field)
    api_error.extra["details"] = error.details
    return api_error


def prepare(tenant: str, body: Any) -> Prepared:
    """Validate a submit body and the inputs it names; ApiError naming the field if not."""
    try:
        submission, entry, params = parse_submit(body, services().settings)
    except InvalidRequest as error:
        raise invalid(error) from None
    parent, first_step = _check_inputs(tenant, entry, params)
    url = submission.webhook_url
    webhook_url = None if url is None else checked_webhook_url(tenant, url, "webhook_url")
    return Prepared(submission, entry, params, parent, first_step, webhook_url)


def _check_inputs(tenant: str, entry: JobType, params: Params) -> tuple[Job | None, Job | None]:
    """The jobs and uploads the params name must be this tenant's (else 404) and usable (else
    422); then the type's own checks, which may fill inherited params in place.

    Returns (the parent job the new one builds on, a first step to run before it).
    """
    svc = services()
    try:
        resolved = svc.inputs.resolve(tenant, entry.inputs, params)
        if entry.check is not None:
            entry.check(params, resolved, svc.settings)
    except InputNotFound as error:
        raise ApiError(404, "not_found", error.message, f"params.{error.field}") from None
    except InputError as error:
        raise ApiError(422, "invalid_params", error.message, f"params.{error.field}") from None
    for spec in entry.inputs:
        if isinstance(spec, SourceUpload) and spec.first_step and spec.field in resolved.uploads:
            first = Job.new(tenant, spec.first_step, {spec.field: resolved.uploads[spec.field].id})
            return first, first
    return resolved.parent, None


def webhook_target(tenant: str, url: str | None, field: str) -> str | None:
    """Where a batch's event goes: its own URL (checked) or the tenant's endpoint."""
    if url is None:  # checked when it was set
        return WebhookStore(services().redis).endpoint(tenant)
    return checked_webhook_url(tenant, url, field)


def checked_webhook_url(tenant: str, url: str, field: str) -> str:
    """`url` if events may go there (checked once per request, as a batch names the same one
    many times); signing needs a secret."""
    checked: set[str] = g.setdefault("webhook_targets_checked", set())
    if url not in checked:
        if not WebhookStore(services().redis).has_secret(tenant):
            raise ApiError(
                422,
                "invalid_params",
                "create a signing secret first (POST /v1/webhooks/secret)",
                field,
            )
        try:
            check_target(url, services().settings.webhook_allow_private)
        except TargetRefused as error:
            raise ApiError(422, "invalid_params", str(error), field) from None
        checked.add(url)
    return url


def admit(tenant: str, items: list[Prepared]) -> None:
    """One submit from the tenant's rate limit, then room in its quotas for every item; a 429
    naming the quota (with Retry-After where waiting helps) if not."""
    quotas = tenancy().quotas
    limits, used = quotas.standing(tenant)
    try:
        quotas.take_submit(tenant, limits)
        quotas.admit(
            limits,
            used,
            jobs=sum(1 + (item.first_step is not None) for item in items),
            audio_s=sum(audio_seconds(item.params.model_dump()) for item in items),
            train_jobs=sum(item.entry.queue == "train" for item in items),
        )
    except QuotaExceeded as error:
        raise over_quota(error) from None


def record(
    prepared: Prepared,
    tenant: str,
    key: str | None,
    transaction: redis.client.Pipeline,
    priority: str = "interactive",
) -> tuple[Job, Job | None]:
    """Record the job (state queued, at its own priority or `priority`) and any first step in
    `transaction`: (the job, the one to queue now), or (the first job, None) when this tenant
    already used the idempotency key. The job's audio seconds count against today's quota once
    the transaction has run.

    The idempotency key is claimed at once, with the job (see `launch` should the transaction
    then fail).
    """
    svc = services()
    submission, params, first_step = prepared.submission, prepared.params, prepared.first_step
    parent = prepared.parent
    priority = submission.priority or priority
    job = Job.new(
        tenant,
        submission.type,
        params.model_dump(),
        parent_job_id=parent.id if parent else None,
        priority=priority,
    )
    if first_step is not None:
        job.stage = "waiting"
        job.message = f"waiting for {first_step.type} job {first_step.id}"
    if key is None:
        svc.jobs.create(job, transaction)
    else:
        job, created = svc.jobs.create_idempotent(job, key)
        if not created:
            if (job.type, job.params) != (submission.type, params.model_dump()):
                raise ApiError(
                    409,
                    "idempotency_conflict",
                    f"idempotency key already used for job {job.id} with other parameters",
                    "idempotency_key",
                )
            return job, None
    QuotaStore.reserve_audio(tenant, job.id, audio_seconds(job.params), transaction)
    hooks = WebhookStore(svc.redis)
    if prepared.webhook_url is None:
        hooks.watch_endpoint(tenant, job_subject(job.id), transaction)
    else:
        hooks.watch(job_subject(job.id), prepared.webhook_url, transaction)
    if first_step is not None:
        first_step.priority = priority
        svc.jobs.create(first_step, transaction)
        svc.jobs.add_dependent(first_step.id, job.id, transaction)
    return job, first_step or job


def launch(prepared: Prepared, tenant: str, key: str | None) -> tuple[Job, bool]:
    """Admit, record and enqueue the job: (the job, True); with an idempotency key this tenant
    already used, (that first job, False) and nothing enqueued. Redis away: a 503 (the app's
    handler) and nothing recorded."""
    admit(tenant, [prepared])
    transaction = services().redis.pipeline(transaction=True)
    job, to_queue = record(prepared, tenant, key, transaction)
    if to_queue is None:
        return job, False
    enqueue(tenancy().scheduler, to_queue, transaction)
    try:
        transaction.execute()
    except redis.RedisError:
        if key is not None:  # recorded on its own, with the key: it must not wait forever
            with suppress(redis.RedisError):
                services().jobs.fail(job.id, "enqueue_failed", "could not queue the job")
        raise
    return job, True


def idempotency_key(from_body: str | None) -> str | None:
    """The `Idempotency-Key` header or the body's `idempotency_key` (they must agree)."""
    header = request.headers.get("Idempotency-Key")
    if header is not None and not 1 <= len(header.strip()) <= 200:
        raise ApiError(422, "invalid_params", "must be 1 to 200 characters", "Idempotency-Key")
    header = header.strip() if header is not None else None
    if header and from_body and header != from_body:
        raise ApiError(
            422,
            "invalid_params",
            "the Idempotency-Key header and idempotency_key differ",
            "idempotency_key",
        )
    return header or from_body
