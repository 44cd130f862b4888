"""Service-only components written to a folder, and lone jobs of them, for the benchmarks and the tests that
schedule them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from blocks.database import DcmDatabase
from flows.runtime.components import MANIFEST, Component
from flows.runtime.names import DEFAULT_BLOCK
from flows.runtime.platform_records import PlatformRecords
from ops.demo import schedule_stable_patient, upload_example_patient

ACCEPT_EVERYTHING = "def accept(**kwargs):\n    return True, {}\n"


@contextmanager
def database_of_its_own(prefix: str) -> Iterator[tuple[DcmDatabase, str]]:
    """A platform database of the bench's own on the connected stack's database server, saved as the
    `dcm-database` block of the same name (runs are given that name), and dropped afterwards: the scheduler
    and the figures see only what the bench put there."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    database = DcmDatabase.load(DEFAULT_BLOCK).with_database_name(name)
    database.save(name, overwrite=True)
    try:
        yield database, name
    finally:
        database.open().db.get_db().client.drop_database(name)


def service_component(
    folder: Path, name: str, module_source: str, jobs: list[dict[str, Any]],
    worker: dict[str, str] | None = None, worker_type: str = "docker",
) -> Component:
    """A component folder with a service module, a registry that accepts every object, and `jobs`
    (manifest entries; `registryEntry` defaults to the accepting one).

    `worker` (file name to text: settings.json and a Dockerfile or a requirements.txt) adds a worker of
    `worker_type` and of the component's name, which the jobs then name.
    """
    (folder / "module").mkdir(parents=True)
    (folder / "registry").mkdir()
    (folder / "module" / "__init__.py").write_text(module_source)
    (folder / "registry" / "__init__.py").write_text(ACCEPT_EVERYTHING)
    manifest: dict[str, Any] = {"name": name, "version": "1.0.0", "service": {
        "module": "module", "registry": "registry", "jobs": [{"registryEntry": "accept", **job} for job in jobs],
    }}
    if worker is not None:
        (folder / "worker").mkdir()
        for file_name, text in worker.items():
            (folder / "worker" / file_name).write_text(text)
        manifest["worker"] = {"path": "worker", "type": worker_type}
        for job in manifest["service"]["jobs"]:
            job["worker"] = name
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return Component.read(folder)


def venv_worker(name: str) -> dict[str, str]:
    """The files of a venv worker of `name` with no requirements beyond the runtime's, for `service_component`."""
    return {"settings.json": json.dumps({"name": name, "python_version": "3.11"}), "requirements.txt": ""}


def lone_job(database: DcmDatabase, records: PlatformRecords, patient_id: str, job_name: str) -> str:
    """Store a one-image series of a new patient, let the platform's scheduler make its session, and return
    the id of its job `job_name`, made ready at once (the scheduler makes series jobs wait for pre-services)."""
    upload_example_patient(database, patient_id=patient_id, series=1, instances=1)
    session_id = schedule_stable_patient(database, records)
    job_id = next(job.id for job in records.session_jobs(session_id) if job.job_name == job_name)
    database.open().db.update("jobs", job_id, {"$set": {"depends_on": []}})
    return job_id
