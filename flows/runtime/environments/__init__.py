"""Environment types: where a job's callback runs, one module per type behind the interface of base.py.

Adding a type means adding its module and one line to `ENVIRONMENT_TYPES`.
"""

from __future__ import annotations

from flows.runtime.environments.base import (
    ContainerPolicy,
    Environment,
    HostSettings,
    InstallContext,
    JobFolders,
    WorkerSettings,
)
from flows.runtime.environments.docker import DockerEnvironment
from flows.runtime.environments.local import LocalEnvironment
from flows.runtime.environments.venv import VenvEnvironment
from flows.runtime.errors import UnknownWorkerType
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.records import JobRecord, WorkerRecord

ENVIRONMENT_TYPES: tuple[type[Environment], ...] = (LocalEnvironment, VenvEnvironment, DockerEnvironment)


def environment_class(worker_type: str | None, what: str) -> type[Environment]:
    """The environment type for a `workers.type` value (None: no worker), or UnknownWorkerType naming the known ones."""
    for environment_type in ENVIRONMENT_TYPES:
        if worker_type in environment_type.record_types:
            return environment_type
    known = ", ".join(sorted(str(name) for kind in ENVIRONMENT_TYPES for name in kind.record_types if name))
    raise UnknownWorkerType(f"{what} has type '{worker_type}'; this runtime runs {known}")


def environment_for(worker: WorkerRecord | None) -> Environment:
    """The environment that runs the jobs of `worker` (None: the job has no worker)."""
    if worker is None:
        return environment_class(None, "a job without worker")(None)
    return environment_class(worker.type, f"worker '{worker.name}'")(worker)


def environment_of_job(job: JobRecord, records: PlatformRecords) -> Environment:
    """The environment a job's callback runs in: it names the deployment, the work pool and the job variables."""
    worker = records.worker(job.worker_id) if job.is_service_job and job.worker_id else None
    return environment_for(worker)


__all__ = [
    "ENVIRONMENT_TYPES", "ContainerPolicy", "DockerEnvironment", "Environment", "HostSettings", "InstallContext",
    "JobFolders", "LocalEnvironment", "VenvEnvironment", "WorkerSettings", "environment_class", "environment_for",
    "environment_of_job",
]
