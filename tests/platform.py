"""Records made the way the platform makes them: services, workers, sessions and jobs.

Jobs are created with the unmodified `DBManager.create_job` and the kwargs layout of the platform's
job scheduler (`handle_stable_object`), so the runtime sees exactly what it sees in production.
"""

from __future__ import annotations

import io
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcm_processor_db_provider import DBManager

from flows.runtime.platform_records import PlatformRecords
from flows.runtime.records import POST_SERVICES_JOB, PRE_SERVICES_JOB, SERVICE_JOB

PATIENT_NAME = "Doe^Janet-Sensitive"
IDENTIFYING_METADATA = {
    "PatientName": PATIENT_NAME, "PatientID": "PID-778899", "OtherPatientIDs": "ALT-1122\\ALT-3344",
    "PatientBirthDate": "19700412", "AccessionNumber": "ACC-55667788", "InstitutionName": "St Elsewhere Clinic",
    "ReferringPhysicianName": "Houseman^Gregory", "PerformingPhysicianName": "Quinlan^Michaela",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.101", "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.102",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.103",
}
"""The PS3.15 basic-profile identifiers a series document may hold (made up, as every value here is)."""


def zip_files(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, textwrap.dedent(text))
    return buffer.getvalue()


SLEEPER = """
import os, time
def run(session_id, job_name, headers, params, added_params, **kwargs):
    with open(params["pid_file"], "w") as stream:
        stream.write(str(os.getpid()))
    print("first line", flush=True)
    time.sleep(params.get("sleep", 120))
    print("second line", flush=True)
    return "slept"
"""


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def job_folder_of(callback_pid: int) -> Path:
    """The job's temporary folder, from a running callback's command line: `python -u <folder>/calls/<call>/<file>`."""
    with open(f"/proc/{callback_pid}/cmdline") as cmdline:
        wrapper = Path(cmdline.read().split("\0")[-2])
    folder = wrapper.parents[2]
    assert folder.name.startswith("dcm-job-"), folder
    return folder


@dataclass
class Platform:
    """Creates platform records in one database for a test."""

    manager: DBManager

    @property
    def records(self) -> PlatformRecords:
        return PlatformRecords(self.manager)

    def upload(self, content: bytes, name: str) -> Any:
        return self.manager.upload_component_file(
            file=content, metadata={"test": name}, params={"filename": name, "content_type": "application/zip"}
        )

    def service(self, name: str, module_source: str, extra_files: dict[str, str] | None = None,
                module_zip: bytes | None = None) -> str:
        files = {"__init__.py": module_source, **(extra_files or {})}
        module_id = self.upload(module_zip if module_zip is not None else zip_files(files), f"{name}-module.zip")
        registry_id = self.upload(zip_files({"__init__.py": "def accept(**kwargs):\n    return True, {}\n"}),
                                  f"{name}-registry.zip")
        return self.manager.db.create("services", {
            "name": name, "version": "0.0.1", "module": module_id, "registry": registry_id,
            "jobs": [{"jobName": "run", "workerEntry": "run", "registryEntry": "accept",
                      "events": ["stable-series"]}],
        })

    def venv_worker(self, name: str, python: str, scripts: dict[str, str] | None = None,
                    pre_scripts: list[str] | None = None, post_scripts: list[str] | None = None) -> str:
        worker_files = {
            script: self.upload(textwrap.dedent(source).encode(), script) for script, source in (scripts or {}).items()
        }
        return self.manager.db.create("workers", {
            "name": name, "type": "venv", "version": "0.0.1", "path": "/", "venv_path": "",
            "venv_python_path": python, "params": {}, "worker_files": worker_files,
            "pre_scripts": pre_scripts or [], "post_scripts": post_scripts or [],
        })

    def session(self) -> str:
        return self.manager.create_session({"patient_id": self.manager.make_oid(None), "peer_id": "test-peer"})

    def series_headers(self) -> dict[str, Any]:
        return {
            "_id": self.manager.make_oid(None), "PatientUID": "hashed-uid", "PeerUID": "test-peer",
            "StudyInstanceUID": IDENTIFYING_METADATA["StudyInstanceUID"],
            "SeriesInstanceUID": IDENTIFYING_METADATA["SeriesInstanceUID"],
            "Instances": [], "Metadata": {**IDENTIFYING_METADATA, "Modality": "MR"},
        }

    def _database_kwargs(self) -> dict[str, Any]:
        return {"db_provider": self.manager.dbprovider, "db_name": self.manager.dbname,
                "db_url": self.manager.dburl}

    def service_job(self, service_id: str, *, session_id: str | None = None, worker_id: str | None = None,
                    timeout: Any = None, entry: str = "run", max_attempts: int = 1,
                    depends_on: list[Any] | None = None) -> str:
        session_id = session_id or self.session()
        kwargs = {
            "job_name": "run", "worker_id": self.manager.make_oid(worker_id) if worker_id else None,
            "worker_type": "venv" if worker_id else None, "service_id": self.manager.make_oid(service_id),
            "event": "stable-series", "session_id": session_id, "headers": self.series_headers(),
            "added_params": {}, "params": {"threshold": 3}, **self._database_kwargs(),
        }
        job_id = self.manager.create_job(
            session_id=session_id, function_name=SERVICE_JOB, kwargs=kwargs, channel="test-device",
            depends_on=depends_on or [], job_name="run", service_name=self.service_name(service_id),
            job_event="stable-series", job_worker_entry=entry, job_timeout=timeout, peer_id="test-peer",
        )
        if max_attempts != 1:
            self.manager.db.update("jobs", job_id, {"$set": {"max_attempts": max_attempts}})
        return str(job_id)

    def sleeper_job(self, tmp_path: Path, timeout: Any = None, sleep: float = 120,
                    session_id: str | None = None) -> tuple[str, Path]:
        """A job whose callback writes its PID to a file, prints a line and sleeps."""
        pid_file = tmp_path / "callback.pid"
        job_id = self.service_job(self.service(f"sleeper-{tmp_path.name}", SLEEPER), timeout=timeout,
                                  session_id=session_id)
        self.manager.db.update("jobs", job_id, {"$set": {
            "data.kwargs.params": {"pid_file": str(pid_file), "sleep": sleep}
        }})
        return job_id, pid_file

    def session_hook_job(self, session_id: str, pre: bool) -> str:
        kwargs = {"session_id": session_id, "headers": self.series_headers(), "added_params": {}, "params": {},
                  **self._database_kwargs()}
        return str(self.manager.create_job(
            session_id=session_id, function_name=PRE_SERVICES_JOB if pre else POST_SERVICES_JOB,
            kwargs=kwargs, channel="test-device", depends_on=[], peer_id="test-peer",
        ))

    def service_name(self, service_id: str) -> str:
        return self.manager.get_service_by_id(service_id)["name"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.manager.get_job_by_id(job_id)
