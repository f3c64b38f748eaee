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
from shared.core.datasets import Dataset, DatasetStore
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


@dataclass(frozen=True)
class SourceAdapter:
    """A params field naming a succeeded fine-tune of the same tenant (its LoRA adapter)."""

    field: str
    job_type: str = "finetune"
    needs: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class SourceDataset:
    """A params field naming a dataset of the same tenant."""

    field: str


InputSpec = SourceJob | SourceUpload | SourceAdapter | SourceDataset


@dataclass
class Resolved:
    """The inputs of one job, checked: field → job or upload."""

    resolver: InputResolver
    jobs: dict[str, Job] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)
    adapters: dict[str, Job] = field(default_factory=dict)
    datasets: dict[str, Dataset] = field(default_factory=dict)
    tenant: str = ""

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
        self.datasets = DatasetStore(jobs.redis)

    def resolve(self, tenant: str, inputs: tuple[InputSpec, ...], params: Any) -> Resolved:
        """Every input the params name (None fields are skipped), checked in declaration order."""
        resolved = Resolved(self, tenant=tenant)
        for spec in inputs:
            value = getattr(params, spec.field)
            if value is None:
                continue
            if isinstance(spec, SourceJob):
                resolved.jobs[spec.field] = self.job(tenant, value, spec)
            elif isinstance(spec, SourceUpload):
                resolved.uploads[spec.field] = self.upload(tenant, value, spec)
            elif isinstance(spec, SourceAdapter):
                resolved.adapters[spec.field] = self.adapter(tenant, value, spec)
            else:
                resolved.datasets[spec.field] = self.dataset(tenant, value, spec)
        return resolved

    def adapter(self, tenant: str, job_id: str, spec: SourceAdapter) -> Job:
        job = self.job_store.get_for_tenant(tenant, job_id)
        if job is None:
            raise InputNotFound(spec.field, f"no job {job_id}")
        if job.type != spec.job_type:
            raise InputError(spec.field, f"job {job.id} is a {job.type} job, not {spec.job_type}")
        if job.state != "succeeded" or not set(spec.needs) <= set(job.artifacts):
            raise InputError(spec.field, f"job {job.id} holds no adapter (state {job.state})")
        return job

    def dataset(self, tenant: str, dataset_id: str, spec: SourceDataset) -> Dataset:
        dataset = self.datasets.get_for_tenant(tenant, dataset_id)
        if dataset is None:
            raise InputNotFound(spec.field, f"no dataset {dataset_id}")
        return dataset

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
