"""One run of one platform job, in the three steps the `dcm-job` flow shows as tasks.

`prepare` (pre-service), `execute` and `finish` (post-service) share this object, so what one step
learned (the records, the temporary folder, the environment) is there for the next without passing
patient data through Prefect. `finish` is safe to call in every state, including after a failed or
interrupted `prepare`: it writes whatever outcome applies and always removes the temporary folder.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.runtime.archive import extract_archive
from flows.runtime.callback import Callback
from flows.runtime.environment import child_environment, service_variables
from flows.runtime.errors import CallbackFailed, InvalidRecord, JobError, JobNotRunnable
from flows.runtime.process import LineHandler, StopCheck
from flows.runtime.records import (
    POST_SERVICES_JOB,
    PRE_SERVICES_JOB,
    WORKER_DATA_FILE,
    JobRecord,
    PlatformRecords,
    ServiceRecord,
    WorkerRecord,
)
from flows.runtime.workers import JobFolders, WorkerType, worker_type_for

SERVICE_MODULE = "service_module"
SESSION_HOOKS = {PRE_SERVICES_JOB: "run_pre_services", POST_SERVICES_JOB: "run_post_services"}


@dataclass(frozen=True)
class Outcome:
    """What a run ended with, as the artifact and the logs report it (no patient data)."""

    succeeded: bool
    message: str
    duration_seconds: float
    attempts: int
    environment: str


class JobRun:
    """State and steps of one `dcm-job` flow run."""

    def __init__(self, records: PlatformRecords, job_id: str, flow_run_id: str, on_line: LineHandler) -> None:
        self.records = records
        self.job_id = job_id
        self.flow_run_id = flow_run_id
        self.on_line = on_line
        self.should_stop: StopCheck | None = None
        self.started = time.monotonic()
        self.job: JobRecord | None = None
        self.claimed = False
        self.worker_type: WorkerType | None = None
        self.workspace: Path | None = None
        self.folders: JobFolders | None = None
        self.environment: dict[str, str] = {}
        self.failed_attempts = 0
        self._calls = 0

    @property
    def label(self) -> str:
        return self.job.label if self.job else f"job {self.job_id}"

    def _claim(self) -> None:
        self.records.claim(self.job_id, self.flow_run_id)
        self.claimed = True

    def _load(self) -> JobRecord:
        """Load and check the job; an invalid record is claimed first, so that its failure is recorded."""
        try:
            return self.records.job(self.job_id)
        except InvalidRecord:
            self._claim()
            raise

    def prepare(self) -> None:
        """Pre-service: load and check the records, claim the job, lay out its folder, run pre-scripts."""
        job = self.job = self._load()
        waiting = self.records.unfinished_dependencies(job)
        if waiting:
            raise JobNotRunnable(f"job {job.id} waits for unfinished dependencies: {', '.join(waiting)}")
        self._claim()
        service: ServiceRecord | None = None
        worker: WorkerRecord | None = None
        if job.is_service_job:
            service = self.records.service(job.service_id or "")
            if job.worker_id is not None:
                worker = self.records.worker(job.worker_id)
        self.worker_type = worker_type_for(worker)
        self.worker_type.check()
        self.workspace = Path(tempfile.mkdtemp(prefix=f"dcm-job-{job.id}-"))
        folders = self.folders = self.worker_type.folders(self.workspace)
        folders.session.mkdir(mode=0o700, parents=True, exist_ok=True)
        if service is not None:
            module = self.records.component_file(service.module_file_id, f"module of service '{service.name}'")
            extract_archive(module, folders.module_parent / SERVICE_MODULE)
        if worker is not None and WORKER_DATA_FILE in worker.worker_files:
            data_file = worker.worker_files[WORKER_DATA_FILE]
            data = self.records.component_file(data_file, f"data of worker '{worker.name}'")
            extract_archive(data, folders.data)
        self.environment = child_environment(
            service_variables(job, self.records.database), self.worker_type.extra_environment()
        )
        self._run_scripts(worker.pre_scripts if worker else [])

    @property
    def session_folder(self) -> Path:
        assert self.folders is not None
        return self.folders.session

    def _call(self, callback: Callback, timeout_seconds: float | None = None) -> Any:
        assert self.workspace is not None and self.worker_type is not None
        self._calls += 1
        folder = self.workspace / "calls" / f"{self._calls:02d}-{callback.function}"
        return self.worker_type.run(
            callback, folder, self.environment, timeout_seconds, self.on_line, self.should_stop
        )

    def _run_scripts(self, names: list[str]) -> None:
        """Run each worker script's `callback(**kwargs, session_dir=...)`, as the platform's docker worker did."""
        if not names:
            return
        assert self.job is not None and self.workspace is not None and self.worker_type is not None
        worker = self.worker_type.worker
        assert worker is not None
        scripts = self.workspace / "worker_scripts"
        scripts.mkdir(exist_ok=True)
        for name in names:
            module = Path(name).stem
            if Path(name).name != name or not module.isidentifier() or name not in worker.worker_files:
                raise InvalidRecord(f"worker '{worker.name}': script '{name}' is not an uploaded Python file")
            content = self.records.component_file(worker.worker_files[name], f"script '{name}'")
            (scripts / f"{module}.py").write_bytes(content)
            kwargs = {**self.job.kwargs, "session_dir": str(self.session_folder)}
            self._call(self._callback(module, "callback", kwargs, search_path=[str(scripts)]))

    def _callback(self, module: str, function: str, kwargs: dict[str, Any], search_path: list[str]) -> Callback:
        assert self.job is not None
        return Callback(
            module=module, function=function, args=self.job.args, kwargs=kwargs,
            search_path=search_path, database_provider=self.records.database.dbprovider,
            workspace=str(self.workspace),
        )

    def execute(self) -> Any:
        """Execute: run the job's callback once in its environment and return its value."""
        assert self.job is not None and self.workspace is not None
        job = self.job
        if job.is_service_job:
            assert self.folders is not None
            callback = self._callback(
                SERVICE_MODULE, job.worker_entry or "", job.kwargs, [str(self.folders.module_parent)]
            )
        else:
            callback = self._callback("dcm_processor_service", SESSION_HOOKS[job.function_name], job.kwargs, [])
        try:
            return self._call(callback, job.timeout_seconds)
        except CallbackFailed:
            self.failed_attempts += 1
            raise

    @property
    def allowed_attempts(self) -> int:
        """Callback attempts this run may make: what `max_attempts` leaves, and at least one."""
        assert self.job is not None
        return max(1, self.job.max_attempts - self.job.attempts)

    def finish(self, result: Any = None, error: BaseException | None = None) -> Outcome:
        """Post-service: run post-scripts, write the outcome to the record, remove the temporary folder."""
        try:
            if error is None and self.worker_type is not None and self.worker_type.worker is not None:
                try:
                    self._run_scripts(self.worker_type.worker.post_scripts)
                except JobError as script_error:
                    error = script_error
            message = "succeeded" if error is None else describe_failure(error)
            if self.claimed:
                if error is None:
                    self.records.mark_succeeded(self.job_id, result)
                else:
                    self.records.mark_failed(self.job_id, message, max(1, self.failed_attempts))
            return Outcome(
                succeeded=error is None,
                message=message,
                duration_seconds=time.monotonic() - self.started,
                attempts=self.failed_attempts + (1 if error is None else 0),
                environment=self.worker_type.describe() if self.worker_type else "not prepared",
            )
        finally:
            self.remove_workspace()

    def remove_workspace(self) -> None:
        if self.workspace is not None:
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace = None


def describe_failure(error: BaseException) -> str:
    """The record's errorMessage: our own errors say it all; anything else is named by its type."""
    if isinstance(error, JobError):
        return str(error)
    return f"{type(error).__name__}: {error}"
