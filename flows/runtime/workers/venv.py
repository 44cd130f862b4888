"""venv workers: callbacks run with the Python of the virtual environment named in the worker record."""

from __future__ import annotations

from pathlib import Path

from flows.runtime.workers.base import WorkerType


class VenvWorker(WorkerType):
    """A virtual environment on this host; the record gives `path`, `venv_path` and `venv_python_path`.

    The platform stores `venv_python_path` as an absolute path and `venv_path` relative to `path`;
    joining them the way the platform does accepts both forms.
    """

    record_types = ("venv", "virtualenv")

    def interpreter(self) -> Path:
        assert self.worker is not None
        python = self.worker.setting("venv_python_path", str, default="bin/python")
        venv = self.worker.setting("venv_path", str, default="venv")
        home = self.worker.setting("path", str, default="/")
        return Path(home, venv, python)
