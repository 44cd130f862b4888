"""Worker types: how a job's callback is run for each kind of worker environment.

Every module in this package that defines a `WorkerType` subclass registers it; adding a worker type
means adding one module here.
"""

import importlib
import pkgutil

from flows.runtime.workers.base import JobFolders, WorkerType, worker_type_for

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["JobFolders", "WorkerType", "worker_type_for"]
