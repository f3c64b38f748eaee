"""/v1/datasets: a tenant's fine-tune datasets: create, list, show (item states), delete.

Audio uploads in a dataset are tokenized once by `encode` jobs on the cpu queue, started here;
each item's state is read from the job or upload it names whenever the dataset is shown.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from api.gateway.apidoc import Body, Reply, documented
from api.gateway.app import services
from api.gateway.auth import authenticate, current_tenant
from api.gateway.errors import ApiError
from api.gateway.limits import json_body
from api.gateway.submission import invalid
from api.gateway.tenancy import tenancy
from shared.core.constants import FRAMES_PER_SECOND
from shared.core.dataset_items import check_items, item_state, needs_encoding
from shared.core.datasets import Dataset, DatasetStore, new_dataset
from shared.core.inputs import InputNotFound, InputResolver
from shared.core.jobs import Job
from shared.core.queueing import enqueue
from shared.core.schemas import (
    DatasetCreate,
    DatasetList,
    DatasetOut,
    InvalidRequest,
    parse_dataset,
)
from shared.core.tokens import InputError

bp = Blueprint("datasets", __name__, url_prefix="/v1/datasets")
bp.before_request(authenticate)

MAX_PAGE = 200


def dataset_out(dataset: Dataset, resolver: InputResolver) -> dict[str, Any]:
    """The dataset with every item's state now, and totals."""
    items = []
    for item in dataset.items:
        state = item_state(dataset.tenant, item, resolver)
        items.append(
            {
                "upload_id": item.upload_id,
                "source_job_id": item.source_job_id,
                "encode_job_id": item.encode_job_id,
                "tags": item.tags,
                "lyrics": item.lyrics,
                "state": state.state,
                "reason": state.reason,
                "frames": item.frames,
                "seconds": round(item.frames / FRAMES_PER_SECOND, 3),
            }
        )
    frames = sum(item.frames for item in dataset.items)
    totals = {
        "items": len(items),
        **{
            name: sum(i["state"] == name for i in items) for name in ("ready", "encoding", "failed")
        },
        "seconds": round(frames / FRAMES_PER_SECOND, 3),
        "frames": frames,
    }
    return {
        "id": dataset.id,
        "name": dataset.name,
        "items": items,
        "totals": totals,
        "created_at": dataset.created_at,
    }


@bp.post("")
@documented(
    {
        201: Reply(
            "Created; audio uploads start encoding (their items show `encoding`)", DatasetOut
        ),
        400: "The body is not JSON, nests too deep, or is not a JSON object",
        404: "An item names another tenant's (or no) upload or job; `field` is items[i].FIELD",
        413: "The body is over HEARTCLUSTER_MAX_JSON_BYTES",
        422: "A bad item (`field` is items[i].FIELD): not exactly one of upload_id and "
        "source_job_id, bad tags or lyrics, a job without tokens.npy, a song over "
        "{settings.max_dataset_item_seconds:g} s; over {settings.max_dataset_items} items or "
        "{settings.max_dataset_seconds:g} s in all",
        503: "The job queue is unreachable; nothing was created",
    },
    body=Body(DatasetCreate),
)
def create_dataset() -> ResponseReturnValue:
    """Create a dataset from finished song jobs (their tokens.npy) and uploads (audio is
    encoded once on the cpu queue; a .npy token upload is ready at once)."""
    svc = services()
    tenant = current_tenant()
    try:
        body = parse_dataset(json_body(), svc.settings)
    except InvalidRequest as error:
        raise invalid(error) from None
    resolver = svc.inputs
    try:
        items = check_items(tenant, body.items, resolver, svc.settings)
    except InputNotFound as error:
        raise ApiError(404, "not_found", error.message, error.field) from None
    except InputError as error:
        raise ApiError(422, "invalid_params", error.message, error.field) from None
    encodes = []
    for item in items:
        if needs_encoding(item, resolver):
            job = Job.new(tenant, "encode", {"upload_id": item.upload_id})
            item.encode_job_id = job.id
            encodes.append(job)
    dataset = new_dataset(tenant, body.name, items)
    for job in encodes:
        svc.jobs.create(job)
    DatasetStore(svc.redis).create(dataset)
    for job in encodes:
        try:
            enqueue(tenancy().scheduler, job)
        except Exception as error:  # broker away: the item shows failed, saying so
            svc.jobs.fail(job.id, "enqueue_failed", f"could not queue the job: {error}")
    response = jsonify(dataset_out(dataset, resolver))
    response.status_code = 201
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return response


@bp.get("")
@documented(
    {200: Reply("The page of datasets, newest first", DatasetList), 422: "A bad limit or cursor"},
    query={
        "limit": {"schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50}},
        "cursor": {
            "description": "`next_cursor` of the previous page",
            "schema": {"type": "string", "minLength": 1},
        },
    },
)
def list_datasets() -> ResponseReturnValue:
    """The tenant's datasets, newest first (names and item counts; GET one for states)."""
    try:
        limit = int(request.args.get("limit", "50"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(422, "invalid_params", f"limit must be 1 to {MAX_PAGE}", "limit")
    try:
        datasets, cursor = DatasetStore(services().redis).list(
            current_tenant(), limit=limit, cursor=request.args.get("cursor")
        )
    except ValueError as error:
        raise ApiError(422, "invalid_params", str(error), "cursor") from None
    summaries = [
        {"id": d.id, "name": d.name, "items": len(d.items), "created_at": d.created_at}
        for d in datasets
    ]
    return jsonify({"datasets": summaries, "next_cursor": cursor})


@bp.get("/<dataset_id>")
@documented(
    {
        200: Reply("The dataset, each item's state", DatasetOut),
        404: "No such dataset (or another tenant's)",
    }
)
def get_dataset(dataset_id: str) -> ResponseReturnValue:
    """One dataset: each item ready / encoding / failed (with the reason), and totals."""
    svc = services()
    dataset = DatasetStore(svc.redis).get_for_tenant(current_tenant(), dataset_id)
    if dataset is None:
        raise ApiError(404, "not_found", f"no dataset {dataset_id}")
    return jsonify(dataset_out(dataset, svc.inputs))


@bp.delete("/<dataset_id>")
@documented(
    {
        204: Reply("Deleted (its encode jobs and their tokens stay)"),
        404: "No such dataset (or another tenant's)",
    }
)
def delete_dataset(dataset_id: str) -> ResponseReturnValue:
    """Delete the dataset record; fine-tunes already running keep the songs they read."""
    if not DatasetStore(services().redis).delete(current_tenant(), dataset_id):
        raise ApiError(404, "not_found", f"no dataset {dataset_id}")
    return "", 204
