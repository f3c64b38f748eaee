"""One resolver for the jobs and uploads a job's params refer to, used by the gateway at submit
and by the workers when they run the job, so both apply the same rules: another tenant's job or
upload does not exist (InputNotFound → 404 naming the field), an upload must hold the right kind
(audio or tokens), and a source job must have succeeded and hold the artifacts the new job reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from shared.core.constants import FRAMES_PER_SECOND
from shared.core.jobs import Job, JobStore, Upload, UploadStore
from shared.core.storage import TOKENS, ObjectStore, artifact_key
from shared.core.tokens import InputError, read_tokens


class InputNotFound(InputError):
    """A referenced job or upload that does not exist for this tenant (the gateway's 404)."""


@dataclass(frozen=True)
class SourceJob:
    """A params field naming a finished job of the same tenant."""

    field: str
    # the job must hold, for each group, one of the group's artifacts
    needs: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class SourceUpload:
    """A params field naming an upload of the same tenant."""

    field: str
    kind: Literal["audio", "tokens"]
    # a job type that first turns the upload into what this job reads (extend: encode)
    first_step: str | None = None


@dataclass
class Resolved:
    """The inputs of one job, checked: field → job or upload."""

    resolver: InputResolver
    jobs: dict[str, Job] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)

    @property
    def parent(self) -> Job | None:
        """The job the new one builds on (its tags and lyrics are inherited)."""
        return next(iter(self.jobs.values()), None)

    def frames(self, name: str) -> int:
        """Song length in frames of the job or audio upload in field `name`."""
        if name in self.jobs:
            return int(self.resolver.tokens(self.jobs[name], name).shape[1])
        # an audio upload, rounded up: the encoder writes a frame for a partial one
        return int(self.uploads[name].duration_s * FRAMES_PER_SECOND) + 1


class InputResolver:
    def __init__(self, jobs: JobStore, uploads: UploadStore, objects: ObjectStore) -> None:
        self.job_store = jobs
        self.upload_store = uploads
        self.objects = objects

    def resolve(
        self, tenant: str, inputs: tuple[SourceJob | SourceUpload, ...], params: Any
    ) -> Resolved:
        """Every input the params name (None fields are skipped), checked in declaration order."""
        resolved = Resolved(self)
        for spec in inputs:
            value = getattr(params, spec.field)
            if value is None:
                continue
            if isinstance(spec, SourceJob):
                resolved.jobs[spec.field] = self.job(tenant, value, spec)
            else:
                resolved.uploads[spec.field] = self.upload(tenant, value, spec)
        return resolved

    def job(self, tenant: str, job_id: str, spec: SourceJob) -> Job:
        source = self.job_store.get_for_tenant(tenant, job_id)
        if source is None:
            raise InputNotFound(spec.field, f"no job {job_id}")
        for names in spec.needs:
            if source.state != "succeeded" or artifact_of(source, names) is None:
                raise InputError(
                    spec.field,
                    f"job {source.id} has no {' or '.join(names)} (state {source.state})",
                )
        return source

    def upload(self, tenant: str, upload_id: str, spec: SourceUpload) -> Upload:
        upload = self.upload_store.get_for_tenant(tenant, upload_id)
        if upload is None:
            raise InputNotFound(spec.field, f"no upload {upload_id}")
        if upload.kind != spec.kind:
            raise InputError(spec.field, f"upload {upload.id} is {upload.kind}, not {spec.kind}")
        return upload

    def artifact(self, job: Job, names: tuple[str, ...]) -> tuple[str, bytes]:
        """The first of `names` the job holds, with its bytes."""
        name = artifact_of(job, names)
        if name is None:
            raise InputError("source_job_id", f"job {job.id} has no {' or '.join(names)}")
        return name, self.objects.get_bytes(artifact_key(job.tenant, job.id, name))

    def upload_bytes(self, upload: Upload) -> bytes:
        return self.objects.get_bytes(upload.key)

    def tokens(self, job: Job, field: str) -> np.ndarray:
        """A finished job's tokens.npy, checked ([8, T] codec codes)."""
        _, data = self.artifact(job, (TOKENS,))
        return read_tokens(data, field)


def artifact_of(job: Job, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in job.artifacts), None)
