"""One input resolver for gateway and workers: ownership (404), kind and state (422), lengths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.core.config import Settings
from shared.core.inputs import InputNotFound, InputResolver, SourceJob, SourceUpload
from shared.core.jobs import Job, JobStore, Upload, UploadStore
from shared.core.jobtypes import job_type
from shared.core.storage import LocalStore, artifact_key
from shared.core.tokens import InputError, tokens_bytes

TOKENS_SOURCE = SourceJob("source_job_id", needs=(("tokens.npy",),))


@pytest.fixture
def resolver(redis_client, tmp_path: Path) -> InputResolver:
    return InputResolver(JobStore(redis_client), UploadStore(redis_client), LocalStore(tmp_path))


def _song(resolver: InputResolver, tenant: str, frames: int) -> Job:
    job = resolver.job_store.create(Job.new(tenant, "generate", {"tags": "piano"}))
    resolver.job_store.start(job.id)
    tokens = np.zeros((8, frames), dtype=np.int32)
    resolver.objects.put_bytes(artifact_key(tenant, job.id, "tokens.npy"), tokens_bytes(tokens))
    return resolver.job_store.succeed(job.id, ["tokens.npy", "metadata.json"])


def _upload(resolver: InputResolver, tenant: str, kind: str, seconds: float) -> Upload:
    record = Upload(
        id=f"up-{tenant}-{kind}",
        tenant=tenant,
        key=f"tenants/{tenant}/uploads/x/song",
        filename="song",
        kind=kind,
        bytes=10,
        duration_s=seconds,
    )
    return resolver.upload_store.create(record)


def test_another_tenants_job_or_upload_does_not_exist(resolver: InputResolver) -> None:
    song = _song(resolver, "acme", 10)
    upload = _upload(resolver, "acme", "audio", 2.0)
    with pytest.raises(InputNotFound) as caught:
        resolver.job("other", song.id, TOKENS_SOURCE)
    assert caught.value.field == "source_job_id"
    with pytest.raises(InputNotFound):
        resolver.upload("other", upload.id, SourceUpload("upload_id", "audio"))
    assert resolver.job("acme", song.id, TOKENS_SOURCE).id == song.id


def test_unfinished_jobs_and_wrong_kinds_are_unusable(resolver: InputResolver) -> None:
    queued = resolver.job_store.create(Job.new("acme", "generate", {"tags": "piano"}))
    with pytest.raises(InputError, match="state queued") as caught:
        resolver.job("acme", queued.id, TOKENS_SOURCE)
    assert not isinstance(caught.value, InputNotFound)
    tokens = _upload(resolver, "acme", "tokens", 2.0)
    with pytest.raises(InputError, match="is tokens, not audio"):
        resolver.upload("acme", tokens.id, SourceUpload("upload_id", "audio"))


def test_resolve_reads_the_named_inputs_and_their_lengths(resolver: InputResolver) -> None:
    song = _song(resolver, "acme", 25)
    upload = _upload(resolver, "acme", "audio", 2.0)
    extend = job_type("extend")
    by_job = extend.params.model_validate({"source_job_id": song.id, "duration_s": 1.0})
    resolved = resolver.resolve("acme", extend.inputs, by_job)
    assert resolved.parent is not None and resolved.parent.id == song.id
    assert resolved.frames("source_job_id") == 25
    by_upload = extend.params.model_validate({"upload_id": upload.id, "duration_s": 1.0})
    resolved = resolver.resolve("acme", extend.inputs, by_upload)
    assert resolved.parent is None and resolved.frames("upload_id") == 26  # 2 s, rounded up


def test_extend_check_refuses_what_cannot_fit_and_inherits_the_prompt(resolver) -> None:
    song = _song(resolver, "acme", 8000)
    extend = job_type("extend")
    params = extend.params.model_validate({"source_job_id": song.id, "duration_s": 30.0})
    resolved = resolver.resolve("acme", extend.inputs, params)
    with pytest.raises(InputError) as caught:
        extend.check(params, resolved, Settings())
    assert caught.value.field == "duration_s"
    params = extend.params.model_validate({"source_job_id": song.id, "duration_s": 1.0})
    extend.check(params, resolver.resolve("acme", extend.inputs, params), Settings())
    assert params.tags == "piano" and params.lyrics == ""
