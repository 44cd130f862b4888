"""The small interface every environment type implements, the typed worker settings it parses, and what an
install hands it.

An environment is where a job's callback runs: the runtime's own interpreter, a worker's virtual
environment, or a worker's Docker image. Its type is chosen by the platform's worker record (`workers.type`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flows.runtime.callback import Callback, read_outcome, write_invocation
from flows.runtime.errors import InstallError, InvalidRecord, UnknownWorkerType
from flows.runtime.names import PROCESS_DEPLOYMENT, PROCESS_POOL
from flows.runtime.process import LineHandler, StopCheck, run_child
from flows.runtime.records import WorkerRecord
from flows.runtime.variables import installer_variables

ProgressHandler = Callable[[str, float], None]
"""Called with the name of an install step and how far the install has got, in percent."""


class WorkerSettings(BaseModel):
    """The settings every worker may have, whatever its type (from `settings.json` and the `workers` record)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    pre_scripts: list[str] = Field(default_factory=list, description="Scripts whose `callback` runs before a job.")
    post_scripts: list[str] = Field(default_factory=list, description="Scripts whose `callback` runs after a job.")
    data_dir: str | None = Field(
        default=None, description="A folder of the worker, zipped into `componentfiles` and laid out for each job."
    )
    python_version: str | None = Field(
        default=None,
        description="The Python a venv is built with (`3.11`, `3.11.7` or a path); the exact version once built.",
    )

    @field_validator("python_version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        """`settings.json` may give the version as a number (3.11)."""
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @classmethod
    def parse(cls, raw: Mapping[str, Any], what: str) -> WorkerSettings:
        """The settings of `raw`, or InvalidRecord naming each bad field and its value's type (never the value)."""
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as error:
            problems: dict[str, list[str]] = {}
            for problem in error.errors(include_url=False, include_input=False):
                problems.setdefault(_located(raw, problem["loc"]), []).append(problem["msg"])
            described = "; ".join(f"{where}: {' or '.join(messages)}" for where, messages in problems.items())
            raise InvalidRecord(f"{what}: invalid settings: {described}") from None


def _located(raw: Any, location: tuple[Any, ...]) -> str:
    """`'field.sub' (type)` for the part of a validation error's location that is in `raw` (pydantic adds the
    names of union members and validators after it)."""
    found: list[str] = []
    for part in location:
        in_mapping = isinstance(raw, Mapping) and part in raw
        in_list = isinstance(raw, list) and isinstance(part, int) and 0 <= part < len(raw)
        if not (in_mapping or in_list):
            break
        raw = raw[part]
        found.append(str(part))
    return f"'{'.'.join(found)}' ({type(raw).__name__})"


@dataclass(frozen=True)
class JobFolders:
    """Where a job's service module package, session folder and worker data go."""

    module_parent: Path
    session: Path
    data: Path


@dataclass(frozen=True)
class ContainerPolicy:
    """What this host lets a docker worker's containers do; more than this fails the install, naming the setting
    (see blocks.host.WorkerHost)."""

    network_modes: tuple[str, ...] = ("host", "bridge", "none")
    allow_root: bool = False
    allow_host_ipc: bool = False


@dataclass(frozen=True)
class HostSettings:
    """Where this host builds environments, where packages come from, and what containers may do (see
    blocks.host.WorkerHost)."""

    environments_folder: Path
    wheelhouse: Path | None = None
    index_url: str | None = None
    installer: str = "auto"
    container_policy: ContainerPolicy = ContainerPolicy()

    def package_source_arguments(self) -> list[str]:
        """The wheelhouse as the only source; an index URL (which may hold a password) goes to the installer's
        environment instead (variables.installer_variables), off the command lines other local users can read."""
        if self.wheelhouse is not None:
            return ["--no-index", "--find-links", str(self.wheelhouse)]
        return []


@dataclass
class InstallContext:
    """What an environment type needs to build one worker's environment."""

    name: str
    folder: Path
    host: HostSettings
    on_line: LineHandler
    progress: ProgressHandler
    in_use: frozenset[str] = frozenset()
    """What the installation being replaced has built (see Environment.built): a failed build must not remove
    it, even where the new build came out identical (an image from the build cache)."""
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    """Undo steps, run newest first if a later step of the install fails."""

    def made(self, identity: str, undo: Callable[[], None]) -> None:
        """Note that the install made `identity`, to be undone by `undo` if a later step fails."""
        if identity not in self.in_use:
            self.cleanups.append(undo)

    def run(self, command: list[str], what: str) -> list[str]:
        """Run an install step, streaming its output to the run's logs; return its stdout lines."""
        output: list[str] = []

        def collect(stream: str, line: str) -> None:
            if stream == "stdout":
                output.append(line)
            self.on_line(stream, line)

        variables = installer_variables(self.host.index_url, wheelhouse_only=self.host.wheelhouse is not None)
        child = run_child(command, env=variables, cwd=self.folder, timeout_seconds=None, on_line=collect)
        if child.returncode != 0:
            raise InstallError(f"{what} failed (exit code {child.returncode}); its output is in the run's logs")
        return output


class Environment(ABC):
    """Runs callbacks in one kind of environment.

    Subclasses name the `workers.type` values they handle in `record_types` (None stands for jobs without a
    worker), the typed settings they read from the worker record, and the `dcm-job` deployment and work pool
    that run their jobs. `runs_in_session` says whether a session may run the job's flow in its own process
    (the callback still gets a child process of this environment); types whose flow needs infrastructure of
    its own, such as a container, say False.
    """

    record_types: ClassVar[tuple[str | None, ...]] = ()
    settings_model: ClassVar[type[WorkerSettings]] = WorkerSettings
    deployment: ClassVar[str] = PROCESS_DEPLOYMENT
    work_pool: ClassVar[str] = PROCESS_POOL
    runs_in_session: ClassVar[bool] = True
    inherits_whole_environment: ClassVar[bool] = False
    """Whether callbacks see all of the environment they run in (less the runtime's own settings), not only
    the host basics that variables.host_variables lets through."""

    def __init__(self, worker: WorkerRecord | None) -> None:
        self.worker = worker
        self.settings = (
            self.settings_model.parse(worker.settings, f"worker '{worker.name}'")
            if worker is not None else self.settings_model()
        )

    @abstractmethod
    def interpreter(self) -> Path:
        """The Python executable that runs this environment's callbacks."""

    def describe(self) -> str:
        """How the job records and the run artifact name the environment."""
        name = f" '{self.worker.name}'" if self.worker else ""
        return f"{type(self).__name__}{name} ({self.interpreter()})"

    def folders(self, workspace: Path) -> JobFolders:
        """By default everything lives in the job's private temporary folder."""
        return JobFolders(module_parent=workspace, session=workspace / "session", data=workspace / "data")

    def extra_variables(self) -> dict[str, str]:
        """Variables this environment adds to every callback's environment."""
        return {}

    def job_variables(self) -> dict[str, Any]:
        """Per-run settings for the work pool's pool worker (none for the process pool)."""
        return {}

    def process_limits(self) -> dict[str, int]:
        """Resource limits of each callback process, by the `resource` module's names (none by default)."""
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
    def install(cls, context: InstallContext, settings: WorkerSettings) -> dict[str, Any]:
        """Build the worker's environment on this host, beside any installed one (which stays usable until the
        new one is complete); return the fields it adds to the worker record.

        Everything made is undone by the callables appended to `context.cleanups` if a later step fails.
        """
        raise UnknownWorkerType(f"{cls.__name__}s are not installed")

    def built(self) -> set[str]:
        """What `install` built, by identity (a folder, image ids)."""
        return set()

    def remove(self, keep: set[str] | frozenset[str] = frozenset()) -> None:  # noqa: B027 - most build nothing
        """Remove what `install` built (the environment, the images), but what `keep` names: a replacement
        built from the same sources can share an image with the installation it replaces."""

    def run(
        self,
        callback: Callback,
        folder: Path,
        variables: Mapping[str, str],
        timeout_seconds: float | None,
        on_line: LineHandler,
        should_stop: StopCheck | None = None,
    ) -> Any:
        """Run `callback` in a child process of this environment and return its value."""
        wrapper = write_invocation(folder, callback, self.process_limits())
        child = run_child(
            [str(self.interpreter()), "-u", str(wrapper)], env=variables, cwd=folder,
            timeout_seconds=timeout_seconds, on_line=on_line, should_stop=should_stop,
        )
        return read_outcome(folder, callback, child)
