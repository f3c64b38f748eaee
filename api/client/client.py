"""A small HTTP client of the gateway, used by the CLI (jobs, batches, uploads, webhooks).

Only `requests` (no Flask, Celery or torch), so any machine that can reach the gateway can use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

CHUNK_BYTES = 1 << 20


class ApiError(RuntimeError):
    """The gateway answered with an error: HTTP status, error code, message and field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        where = f" ({field})" if field else ""
        super().__init__(f"HTTP {status} {code}{where}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class Client:
    """Talks to one gateway with one API key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._session = session or requests.Session()
        self._auth = {"Authorization": f"Bearer {api_key}"}

    def _url(self, path: str) -> str:
        return urljoin(self.base_url, path.lstrip("/"))

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {**self._auth, **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", self.timeout_s)
        response = self._session.request(method, self._url(path), headers=headers, **kwargs)
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def submit(
        self, type: str, params: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit a job; returns the job (the first one again for a repeated idempotency key)."""
        body: dict[str, Any] = {"type": type, "params": params}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return self._request("POST", "v1/jobs", json=body).json()

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"v1/jobs/{job_id}").json()

    def list(
        self,
        state: str | None = None,
        type: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page: {"jobs": [...newest first], "next_cursor": str | None}."""
        query = {"state": state, "type": type, "limit": limit, "cursor": cursor}
        params = {name: value for name, value in query.items() if value is not None}
        return self._request("GET", "v1/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"v1/jobs/{job_id}/cancel").json()

    def upload(self, path: str | Path) -> dict[str, Any]:
        """Upload an audio file or a tokens .npy; returns the upload (its id is job input)."""
        path = Path(path)
        with path.open("rb") as handle:
            return self._request(
                "POST", "v1/uploads", files={"file": (path.name, handle)}, timeout=None
            ).json()

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's Server-Sent Events as {"event", "job"} dicts until a terminal state."""
        response = self._request(
            "GET", f"v1/jobs/{job_id}/events", stream=True, timeout=(self.timeout_s, None)
        )
        with response:
            yield from parse_sse(response.iter_lines(decode_unicode=True))

    def download(self, job_id: str, name: str, path: str | Path) -> Path:
        """Save an artifact to `path`, following the gateway's redirect to object storage.

        The redirect target is fetched without the API key: presigned URLs carry their own
        signature and S3 refuses requests that also carry an Authorization header.
        """
        path = Path(path)
        response = self._request(
            "GET", f"v1/jobs/{job_id}/artifacts/{name}", stream=True, allow_redirects=False
        )
        if response.is_redirect:
            response.close()
            response = self._session.get(
                response.headers["Location"], stream=True, timeout=self.timeout_s
            )
            if response.status_code >= 400:
                raise ApiError(response.status_code, "storage_error", response.text[:500])
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        with response, partial.open("wb") as out:
            for chunk in response.iter_content(CHUNK_BYTES):
                out.write(chunk)
        partial.replace(path)
        return path

    # ----- batches, deletion, uploads, webhooks -------------------------------------------------

    def submit_batch(
        self,
        jsonl: bytes,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Submit JSONL items (one submit body a line, each with an optional custom_id)."""
        query = {"webhook_url": webhook_url} if webhook_url else {}
        headers = {"Content-Type": "application/jsonl"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return self._request(
            "POST", "v1/batches", data=jsonl, params=query, headers=headers, timeout=None
        ).json()

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._request("GET", f"v1/batches/{batch_id}").json()

    def batches(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._request("GET", "v1/batches", params={"limit": limit}).json()["batches"]

    def batch_results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """One dict per item, in submit order."""
        response = self._request("GET", f"v1/batches/{batch_id}/results", stream=True)
        with response:
            for line in response.iter_lines(decode_unicode=True):
                if line:
                    yield json.loads(line)

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._request("POST", f"v1/batches/{batch_id}/cancel").json()

    def delete_job(self, job_id: str) -> None:
        self._request("DELETE", f"v1/jobs/{job_id}")

    def uploads(self, limit: int = 50) -> dict[str, Any]:
        return self._request("GET", "v1/uploads", params={"limit": limit}).json()

    def delete_upload(self, upload_id: str) -> None:
        self._request("DELETE", f"v1/uploads/{upload_id}")

    def create_dataset(self, name: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        return self._request("POST", "v1/datasets", json={"name": name, "items": items}).json()

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._request("GET", f"v1/datasets/{dataset_id}").json()

    def datasets(self, limit: int = 50) -> dict[str, Any]:
        return self._request("GET", "v1/datasets", params={"limit": limit}).json()

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"v1/datasets/{dataset_id}")

    def rotate_webhook_secret(self) -> str:
        """A new signing secret (shown only now); the previous one signs too for a day."""
        return self._request("POST", "v1/webhooks/secret").json()["secret"]

    def set_webhook_endpoint(self, url: str | None) -> dict[str, Any]:
        return self._request("PUT", "v1/webhooks/endpoint", json={"url": url}).json()

    def webhook_deliveries(self, **subject: str) -> list[dict[str, Any]]:
        """Deliveries with their attempts: job_id=..., batch_id=..., or the newest."""
        reply = self._request("GET", "v1/webhooks/deliveries", params=subject)
        return reply.json()["deliveries"]


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Decode the `data:` payloads of an SSE stream (comments and other fields skipped)."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield json.loads("\n".join(data))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield json.loads("\n".join(data))


def _error_from(response: requests.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, error["code"], error["message"], error.get("field"))
    except (ValueError, KeyError, TypeError):
        return ApiError(response.status_code, "http_error", response.text[:500] or response.reason)
