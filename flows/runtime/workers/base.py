"""The small interface every worker type implements, and the registry that picks one for a job."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from flows.runtime.callback import Callback, read_outcome, write_invocation
from flows.runtime.errors import InvalidRecord, UnknownWorkerType
from flows.runtime.process import LineHandler, StopCheck, run_child
from flows.runtime.records import WorkerRecord

if TYPE_CHECKING:
    from flows.runtime.installer import InstallContext

_REGISTRY: dict[str | None, type[WorkerType]] = {}


@dataclass(frozen=True)
class JobFolders:
    """Where a job's service module package, session folder and worker data go."""

    module_parent: Path
    session: Path
    data: Path


class WorkerType(ABC):
    """Runs callbacks in one kind of environment.

    Subclasses name the `workers.type` values they handle in `record_types` (None stands for jobs
    without a worker), and the `dcm-job` deployment and work pool that must run their jobs.
    `runs_in_session` says whether a session may run the job's flow in its own process (the callback
    still gets a child process of this environment); types whose flow needs infrastructure of its
    own, such as a container, say False.
    """

    record_types: ClassVar[tuple[str | None, ...]] = ()
    deployment: ClassVar[str] = "process"
    work_pool: ClassVar[str] = "dcm-process"
    runs_in_session: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for record_type in cls.record_types:
            _REGISTRY[record_type] = cls

    def __init__(self, worker: WorkerRecord | None) -> None:
        self.worker = worker

    @abstractmethod
    def interpreter(self) -> Path:
        """The Python executable that runs this worker's callbacks."""

    def describe(self) -> str:
        """How the job records and the run artifact name the environment."""
        name = f" '{self.worker.name}'" if self.worker else ""
        return f"{type(self).__name__}{name} ({self.interpreter()})"

    def folders(self, workspace: Path) -> JobFolders:
        """By default everything lives in the job's private temporary folder."""
        return JobFolders(module_parent=workspace, session=workspace / "session", data=workspace / "data")

    def extra_environment(self) -> dict[str, str]:
        """Variables this worker type adds to every callback's environment."""
        return {}

    def job_variables(self) -> dict[str, Any]:
        """Per-run settings for the work pool's worker (none for the process pool)."""
        return {}

    def concurrency_tags(self) -> list[str]:
        """Tags of the execute task, so a Prefect tag concurrency limit can cap scarce resources."""
        return []

    def check(self) -> None:
        """Fail before anything runs when the environment is not usable."""
        interpreter = self.interpreter()
        if not (interpreter.is_file() and os.access(interpreter, os.X_OK)):
            raise InvalidRecord(f"{self.describe()}: interpreter {interpreter} does not exist on this host")

    @classmethod
    def install(cls, context: InstallContext) -> dict[str, Any]:
        """Build the worker's environment on this host; return the fields it adds to the worker record.

        Everything made is undone by the callables appended to `context.cleanups` if a later step fails.
        """
        raise UnknownWorkerType(f"{cls.__name__} environments are not installed")

    def remove(self) -> None:  # noqa: B027 - most types build nothing to remove
        """Remove what `install` built (the environment, the image)."""

    def run(
        self,
        callback: Callback,
        folder: Path,
        environment: Mapping[str, str],
        timeout_seconds: float | None,
        on_line: LineHandler,
        should_stop: StopCheck | None = None,
    ) -> Any:
        """Run `callback` in a child process of this environment and return its value."""
        wrapper = write_invocation(folder, callback)
        child = run_child(
            [str(self.interpreter()), "-u", str(wrapper)], env=environment, cwd=folder,
            timeout_seconds=timeout_seconds, on_line=on_line, should_stop=should_stop,
        )
        return read_outcome(folder, callback, child)


def worker_type_class(record_type: str | None, what: str) -> type[WorkerType]:
    """The registered class for a `workers.type` value, or UnknownWorkerType naming the known ones."""
    if record_type not in _REGISTRY:
        known = ", ".join(sorted(str(name) for name in _REGISTRY if name))
        raise UnknownWorkerType(f"{what} has type '{record_type}'; this runtime runs {known}")
    return _REGISTRY[record_type]


def worker_type_for(worker: WorkerRecord | None) -> WorkerType:
    """The worker type that runs jobs of `worker` (None: the job has no worker)."""
    if worker is None:
        return worker_type_class(None, "a job without worker")(None)
    return worker_type_class(worker.type, f"worker '{worker.name}'")(worker)
