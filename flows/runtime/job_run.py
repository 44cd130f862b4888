"""One run of one platform job, in the three steps the `dcm-job` flow shows as tasks.

`prepare` (pre-service) returns a `PreparedJob`, which `execute` and `finish` (post-service) take as an
argument: what one step learned (the records, the environment, the private folder, the callback's
variables) reaches the next without passing patient data through Prefect. `finish` is safe to call in
every state, also without a prepared job (its preparation failed or was interrupted): it writes whatever
outcome applies and removes the run's temporary folder once the outcome is settled.

Prefect retries the pre- and post-service steps when the platform database does not answer. The private
folder belongs to the run, not to one attempt of a step (a retry uses the same one), and a worker script
that ran is not run again by a retry.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.runtime.archive import extract_archive
from flows.runtime.callback import Callback, Returned, returned_value
from flows.runtime.environments import Environment, JobFolders, environment_of_job
from flows.runtime.errors import CallbackFailed, ClaimLost, InvalidRecord, JobError, JobNotRunnable, RunCancelled
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.process import (
    LineHandler,
    StopCheck,
    abandoned_folders,
    folder_of_this_process,
    is_private,
    remove_abandoned_folders,
)
from flows.runtime.records import POST_SERVICES_JOB, PRE_SERVICES_JOB, JobRecord
from flows.runtime.redaction import Redactor
from flows.runtime.variables import callback_variables, service_variables

JOB_FOLDER_PREFIX = "dcm-job-"
"""A job's temporary folder is named `dcm-job-<job id>-<pid of the run's process>-<random>`."""
SERVICE_MODULE = "service_module"
CALLS_FOLDER = "calls"
"""Each call of a run has a folder in it, `<number>-<step>-<function>`: the step is pre, execute or post."""
EXECUTE_STEP = "execute"
RETURNED_KEPT_SECONDS = 7 * 24 * 3600
"""How long the folder of a run whose callback returned unrecorded waits for its job's next run on the host."""
SESSION_HOOKS = {PRE_SERVICES_JOB: "run_pre_services", POST_SERVICES_JOB: "run_post_services"}


class PreparedJob:
    """A claimed job, ready for its callback: its record, environment, private folder and variables.

    A plain class, not a dataclass: Prefect walks the fields of a dataclass task argument, deeply, looking
    for futures to resolve, and this one carries the job's kwargs (its headers) and the callback's
    variables, for each task that takes it.
    """

    __slots__ = ("environment", "folders", "job", "returned_earlier", "variables", "workspace")

    def __init__(self, job: JobRecord, environment: Environment, workspace: Path, folders: JobFolders,
                 variables: dict[str, str], returned_earlier: Returned | None = None) -> None:
        self.job = job
        self.environment = environment
        self.workspace = workspace
        self.folders = folders
        self.variables = variables
        """The callback's environment variables (they hold the database URL: never log them)."""
        self.returned_earlier = returned_earlier
        """What the job's callback returned in an earlier run on this host that died before recording it."""

    @property
    def allowed_attempts(self) -> int:
        """Callback attempts this run may make: what `max_attempts` leaves, and at least one."""
        return max(1, self.job.max_attempts - self.job.attempts)


@dataclass(frozen=True)
class Outcome:
    """What a run ended with, as the artifact and the logs report it (no patient data)."""

    succeeded: bool
    cancelled: bool
    message: str
    duration_seconds: float
    attempts: int
    environment: str


class JobRun:
    """The steps of one `dcm-job` flow run against one platform database.

    It remembers only what outlives a step or one attempt of it: whether the job was claimed (so that its
    outcome is written), the temporary folder it made (so that it is removed however the run ends, but for a
    callback that returned unrecorded), what an abandoned earlier run's callback returned (read once, before
    that run's folder is removed), the worker scripts that ran, and the outcome the post-scripts left (so that
    a retry only writes it).
    """

    def __init__(self, records: PlatformRecords, job_id: str, flow_run_id: str) -> None:
        self.records = records
        self.job_id = job_id
        self.flow_run_id = flow_run_id
        self.label = f"job {job_id}"
        self.started = time.monotonic()
        self.claimed = False
        self.workspace: Path | None = None
        self._calls = 0
        self._scripts_run: set[tuple[str, str]] = set()
        self._returned_earlier: Returned | None = None
        self._returned = False
        self._settled: tuple[BaseException | None] | None = None
        self._redactor = Redactor.for_job({}, records.database.dburl)

    def redact(self, text: str) -> str:
        """`text` as Prefect may see it: once the job is loaded, without its patient's identifiers."""
        return self._redactor(text)

    def _claim(self) -> None:
        self.records.claim(self.job_id, self.flow_run_id)
        self.claimed = True

    def _load(self) -> JobRecord:
        """Load and check the job; an invalid record is claimed first, so that its failure is recorded."""
        try:
            job = self.records.job(self.job_id)
        except InvalidRecord:
            self._claim()
            raise
        self._redactor = Redactor.for_job(job.kwargs, self.records.database.dburl)
        return job

    def prepare(self, on_line: LineHandler) -> PreparedJob:
        """Pre-service: load and check the records, claim the job, lay out its folder, run pre-scripts."""
        job = self._load()
        self.label = job.label
        waiting = self.records.unfinished_dependencies(job)
        if waiting:
            raise JobNotRunnable(f"job {job.id} waits for unfinished dependencies: {', '.join(waiting)}")
        self._claim()
        service = self.records.service(job.service_id or "") if job.is_service_job else None
        environment = environment_of_job(job, self.records)
        environment.check()
        if self.workspace is None:
            self._returned_earlier = returned_in_an_abandoned_run(job.id)
            remove_abandoned_job_folders(job.id)
            self.workspace = folder_of_this_process(f"{JOB_FOLDER_PREFIX}{job.id}-")
        workspace = self.workspace
        folders = environment.folders(workspace)
        folders.session.mkdir(mode=0o700, parents=True, exist_ok=True)
        if service is not None:
            module = self.records.component_file(service.module_file_id, f"module of service '{service.name}'")
            extract_archive(module, folders.module_parent / SERVICE_MODULE)
        worker = environment.worker
        if worker is not None and worker.data_file_id is not None:
            extract_archive(self.records.component_file(worker.data_file_id, f"data of worker '{worker.name}'"),
                            folders.data)
        variables = callback_variables(service_variables(job, self.records.database), environment.extra_variables(),
                                       whole_base=environment.inherits_whole_environment)
        prepared = PreparedJob(job, environment, workspace, folders, variables, self._returned_earlier)
        if self._returned_earlier is None:
            self._run_scripts(prepared, "pre", environment.settings.pre_scripts, on_line)
        return prepared

    def _call(self, prepared: PreparedJob, step: str, callback: Callback, on_line: LineHandler,
              timeout_seconds: float | None = None, should_stop: StopCheck | None = None) -> Any:
        self._calls += 1
        folder = prepared.workspace / CALLS_FOLDER / f"{self._calls:02d}-{step}-{callback.function}"
        try:
            return prepared.environment.run(callback, folder, prepared.variables, timeout_seconds, on_line,
                                            should_stop)
        except CallbackFailed as failure:
            redacted = failure.redacted(self.redact)
        # Raised outside the handler: a chained original would put the callback's own words into Prefect's traceback.
        raise redacted

    def _run_scripts(self, prepared: PreparedJob, step: str, names: list[str], on_line: LineHandler) -> None:
        """Run each worker script's `callback(**kwargs, session_dir=...)`, as the platform's docker worker did;
        one that ran in an earlier attempt of the step is not run again."""
        worker = prepared.environment.worker
        if not names or worker is None:
            return
        scripts = prepared.workspace / "worker_scripts"
        scripts.mkdir(exist_ok=True)
        for name in names:
            if (step, name) in self._scripts_run:
                continue
            module = Path(name).stem
            if Path(name).name != name or not module.isidentifier() or name not in worker.worker_files:
                raise InvalidRecord(f"worker '{worker.name}': script '{name}' is not an uploaded Python file")
            content = self.records.component_file(worker.worker_files[name], f"script '{name}'")
            (scripts / f"{module}.py").write_bytes(content)
            kwargs = {**prepared.job.kwargs, "session_dir": str(prepared.folders.session)}
            self._call(prepared, step, self._callback(prepared, module, "callback", kwargs, [str(scripts)]), on_line)
            self._scripts_run.add((step, name))

    def _callback(self, prepared: PreparedJob, module: str, function: str, kwargs: dict[str, Any],
                  search_path: list[str]) -> Callback:
        return Callback(
            module=module, function=function, args=prepared.job.args, kwargs=kwargs,
            search_path=search_path, database_provider=self.records.database.dbprovider,
            workspace=str(prepared.workspace),
        )

    def execute(self, prepared: PreparedJob, on_line: LineHandler, should_stop: StopCheck | None = None) -> Any:
        """Execute: run the job's callback once in its environment and return its value; or return what it
        returned in an earlier run that died before recording it, without calling it again."""
        if prepared.returned_earlier is not None:
            self._returned = True
            return prepared.returned_earlier.value
        job = prepared.job
        if job.is_service_job:
            callback = self._callback(
                prepared, SERVICE_MODULE, job.worker_entry or "", job.kwargs, [str(prepared.folders.module_parent)]
            )
        else:
            callback = self._callback(prepared, "dcm_processor_service", SESSION_HOOKS[job.function_name],
                                      job.kwargs, [])
        value = self._call(prepared, EXECUTE_STEP, callback, on_line, job.timeout_seconds, should_stop)
        self._returned = True
        return value

    def finish(self, prepared: PreparedJob | None, on_line: LineHandler, failed_attempts: int,
               result: Any = None, error: BaseException | None = None) -> Outcome:
        """Post-service: run post-scripts, write the outcome to the record, remove the temporary folder.

        The outcome is written only while this run holds the job (ClaimLost otherwise). When the database does
        not answer, the folder stays for the retry, which writes the outcome the post-scripts left.
        """
        if self._settled is None:
            if error is None and prepared is not None:
                try:
                    self._run_scripts(prepared, "post", prepared.environment.settings.post_scripts, on_line)
                except JobError as script_error:
                    error = script_error
            self._settled = (error,)
        (error,) = self._settled
        recorded = "succeeded" if error is None else describe_failure(error)
        try:
            if self.claimed and error is None:
                self.records.mark_succeeded(self.job_id, self.flow_run_id, result)
            elif self.claimed:
                self.records.mark_failed(self.job_id, self.flow_run_id, recorded, max(1, failed_attempts))
        except ClaimLost:
            self.remove_workspace()
            raise
        self.remove_workspace()
        return Outcome(
            succeeded=error is None,
            cancelled=isinstance(error, RunCancelled),
            message=self.redact(recorded),
            duration_seconds=time.monotonic() - self.started,
            attempts=failed_attempts + (1 if error is None else 0),
            environment=prepared.environment.describe() if prepared is not None else "not prepared",
        )

    def leave(self) -> None:
        """Remove the run's temporary folder as the run ends, unless its callback returned. `finish` removes it
        once the outcome is recorded, so a folder still here then means the outcome could not be recorded (a
        database outage longer than the retries): it holds what the callback returned, which the job's next run
        on this host records instead of calling the callback again."""
        if not self._returned:
            self.remove_workspace()

    def remove_workspace(self) -> None:
        if self.workspace is not None:
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace = None


def returned_in_an_abandoned_run(job_id: str) -> Returned | None:
    """What the job's callback returned in an earlier run on this host that ended without recording it: its
    process was killed between the callback's return and the record's write (or its host's power cut), or a
    database outage outlasted the post-service's retries.

    The job's next run records that value instead of calling the callback again: the callback ran to its end,
    side effects and all. Only this user's private folders are believed (another user could make a folder of
    the same name in the shared temporary folder).
    """
    for folder in abandoned_folders(f"{JOB_FOLDER_PREFIX}{job_id}-"):
        returned = _returned_in(folder) if is_private(folder) else None
        if returned is not None:
            return returned
    return None


def remove_abandoned_job_folders(job_id: str) -> None:
    """Remove the folders of this host's runs whose process is gone: all of this job's (what they hold has been
    read), and of other jobs' those that hold no returned value waiting to be recorded by their job's next run
    (such a folder waits RETURNED_KEPT_SECONDS at most)."""
    own = f"{JOB_FOLDER_PREFIX}{job_id}-"
    remove_abandoned_folders(
        JOB_FOLDER_PREFIX, keep=lambda folder: not folder.name.startswith(own) and _waits_for_its_job(folder)
    )


def _returned_in(folder: Path) -> Returned | None:
    """What the callback of a run's folder returned, if it returned."""
    for call in sorted((folder / CALLS_FOLDER).glob(f"*-{EXECUTE_STEP}-*"), reverse=True):
        returned = returned_value(call)
        if returned is not None:
            return returned
    return None


def _waits_for_its_job(folder: Path) -> bool:
    try:
        age = time.time() - folder.stat().st_mtime
    except OSError:
        return False
    return age < RETURNED_KEPT_SECONDS and _returned_in(folder) is not None


def describe_failure(error: BaseException) -> str:
    """The record's errorMessage (the full text, also what a callback said): our own errors say it all; anything
    else is named by its type."""
    if isinstance(error, CallbackFailed):
        return error.recorded
    if isinstance(error, JobError):
        return str(error)
    return f"{type(error).__name__}: {error}"
