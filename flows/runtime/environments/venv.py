"""venv workers: callbacks run with the Python of the virtual environment named in the worker record."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from flows.runtime.environments.base import Environment, InstallContext, WorkerSettings
from flows.runtime.errors import InstallError
from flows.runtime.wheelhouse import refuse_other_package_sources

SERVICE_PACKAGE = "dcm-processor-service"


MEMORY_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


class ProcessLimits(BaseModel):
    """Resource limits of each callback process of a venv worker (setrlimit, set by the callback wrapper before
    the service is imported), as docker workers have theirs from `mem_limit`, `cpus` and the engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory: int | str | None = Field(
        default=None, description="Address space of one callback process, in bytes or Docker's notation (512m, 2g)."
    )
    processes: PositiveInt | None = Field(
        default=None, description="Processes the worker's user may run (RLIMIT_NPROC; the kernel ignores it for root)."
    )
    open_files: PositiveInt | None = Field(default=None, description="Open files of one callback process.")

    @field_validator("memory")
    @classmethod
    def _memory_in_bytes(cls, value: int | str | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        match = re.fullmatch(r"(\d+)\s*([bkmg]?)", value.strip().lower())
        if match is None:
            raise ValueError("must be a number of bytes or like 512m or 2g")
        return int(match.group(1)) * MEMORY_UNITS[match.group(2)]

    def resource_limits(self) -> dict[str, int]:
        """The limits by the `resource` module's names, as the callback wrapper sets them."""
        named = {"RLIMIT_AS": self.memory, "RLIMIT_NPROC": self.processes, "RLIMIT_NOFILE": self.open_files}
        return {name: int(value) for name, value in named.items() if value is not None}


class VenvSettings(WorkerSettings):
    """Where a venv worker's environment is. The platform stores `venv_python_path` as an absolute path and
    `venv_path` relative to `path`; joining them the way the platform does accepts both forms."""

    path: str | None = Field(default=None, description="The worker's folder on its host.")
    venv_path: str = Field(default="venv", description="The virtual environment, relative to `path`.")
    venv_python_path: str = Field(
        default="bin/python", description="The environment's Python, absolute or relative to `venv_path`."
    )
    limits: ProcessLimits = Field(default_factory=ProcessLimits, description="Limits of each callback process.")


class VenvEnvironment(Environment):
    """A virtual environment on this host, built by `install` with the Python the worker asks for."""

    record_types = ("venv", "virtualenv")
    settings_model = VenvSettings
    settings: VenvSettings

    def interpreter(self) -> Path:
        return Path(self.settings.path or "/", self.settings.venv_path, self.settings.venv_python_path)

    def process_limits(self) -> dict[str, int]:
        return self.settings.limits.resource_limits()

    @classmethod
    def install(cls, context: InstallContext, settings: WorkerSettings) -> dict[str, Any]:
        """virtualenv with the Python that `python_version` asks for, then dcm-processor-service and the
        worker's requirements (uv when available, else pip), from the host's wheelhouse or index."""
        requirements = context.folder / "requirements.txt"
        has_requirements = requirements.is_file() and bool(requirements.read_text().strip())
        if has_requirements and context.host.wheelhouse is not None:
            refuse_other_package_sources(requirements, context.folder)
        interpreter, version = find_interpreter(settings.python_version)
        home = context.host.environments_folder / context.name
        if home.exists():  # an installed environment, in use until its replacement is complete
            home = home.with_name(f"{context.name}-{uuid.uuid4().hex[:8]}")
        context.cleanups.append(lambda: shutil.rmtree(home, ignore_errors=True))
        venv = home / "venv"
        context.run([sys.executable, "-m", "virtualenv", "--python", str(interpreter), str(venv)],
                    "creating the virtual environment")
        python = venv / "bin" / "python"
        context.progress("packages", 40)
        packages = [SERVICE_PACKAGE]
        if has_requirements:
            packages += ["-r", str(requirements)]
        use_uv = context.host.installer != "pip" and importlib.util.find_spec("uv") is not None
        sources = context.host.package_source_arguments()
        if use_uv:
            install = [sys.executable, "-m", "uv", "pip", "install", "--compile-bytecode", "--python", str(python),
                       *sources, *packages]
            freeze = [sys.executable, "-m", "uv", "pip", "freeze", "--python", str(python)]
        else:
            install = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *sources, *packages]
            freeze = [str(python), "-m", "pip", "freeze", "--disable-pip-version-check"]
        context.run(install, "installing the worker's packages")
        return {
            "path": str(home),
            "venv_path": "venv",
            "venv_python_path": str(python),
            "python_version": version,
            "python_version_requested": settings.python_version,
            "installer": "uv" if use_uv else "pip",
            "packages": context.run(freeze, "listing the installed packages"),
        }

    def built(self) -> set[str]:
        return {self.settings.path} if self.settings.path else set()

    def remove(self, keep: set[str] | frozenset[str] = frozenset()) -> None:
        if self.settings.path and self.settings.path not in keep and Path(self.settings.path, "venv").is_dir():
            shutil.rmtree(self.settings.path, ignore_errors=True)


def _version_of(python: str) -> str | None:
    try:
        completed = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                   capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def _candidates() -> list[str]:
    names = [sys.executable, *(shutil.which(f"python3.{minor}") for minor in range(6, 15)), shutil.which("python3")]
    names += glob.glob(os.path.expanduser("~/.pyenv/versions/*/bin/python3"))
    names += glob.glob("/usr/bin/python3.*[0-9]") + glob.glob("/usr/local/bin/python3.*[0-9]")
    return list(dict.fromkeys(os.path.realpath(name) for name in names if name))


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def find_interpreter(requested: str | None) -> tuple[Path, str]:
    """The interpreter for `python_version`: "3.11" (newest 3.11.x), "3.11.7", a path, or None (this one)."""
    if not requested:
        return Path(sys.executable), _version_of(sys.executable) or ""
    requested = str(requested).strip()
    if "/" in requested:
        version = _version_of(requested)
        if version is None:
            raise InstallError(f"python_version '{requested}' is not a working Python interpreter")
        return Path(requested), version
    found = {python: version for python in _candidates() if (version := _version_of(python))}
    matching = [(version, python) for python, version in found.items()
                if version == requested or version.startswith(requested + ".")]
    if not matching:
        listed = ", ".join(sorted(set(found.values()), key=_version_key)) or "none"
        raise InstallError(f"no Python {requested} on this host; the versions found are {listed}")
    version, python = max(matching, key=lambda match: _version_key(match[0]))
    return Path(python), version
