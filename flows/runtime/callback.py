"""The one wrapper writer and the one result reader, shared by every environment type.

A callback runs as `python -u dcm_callback.py` in a folder of its own: the wrapper is a fixed file
(nothing from a record is pasted into code), the call itself is described by `invocation.json`, and
the wrapper answers in `result.json` with `{"result": ...}` or `{"error": {"message", "traceback"}}`,
as the platform's 0.0.1 runtime did. A child that dies before answering is reported from its exit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcm_processor_db_provider import DBManager

from flows.runtime.callback_wrapper import RESULT_NAME
from flows.runtime.errors import CallbackFailed, RunCancelled
from flows.runtime.process import ChildExit

WRAPPER_SOURCE = Path(__file__).with_name("callback_wrapper.py")
WRAPPER_NAME = "dcm_callback.py"
INVOCATION_NAME = "invocation.json"


@dataclass(frozen=True)
class Callback:
    """A function to call in a child process: `module.function(*args, **kwargs)`."""

    module: str
    function: str
    args: Sequence[Any] = field(default_factory=list, repr=False)
    kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    search_path: Sequence[str] = ()
    """Folders put in front of sys.path, as the child sees them (container paths for docker)."""
    database_provider: str = "mongodb"
    workspace: str | None = None
    """The job's temporary folder, which the wrapper removes if the flow run's process dies before it."""

    @property
    def name(self) -> str:
        return f"{self.module}.{self.function}"


def write_invocation(folder: Path, callback: Callback, limits: Mapping[str, int] | None = None) -> Path:
    """Write the wrapper and the call description into `folder`, with the resource limits the wrapper sets
    (`resource` names such as RLIMIT_AS); return the wrapper's path. The process that writes it starts the
    wrapper, which ends with it."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    wrapper = folder / WRAPPER_NAME
    shutil.copyfile(WRAPPER_SOURCE, wrapper)
    invocation = {
        "module": callback.module,
        "function": callback.function,
        "search_path": [str(path) for path in callback.search_path],
        "provider": callback.database_provider,
        "workspace": callback.workspace,
        "parent": os.getpid(),
        "limits": dict(limits or {}),
        "args": DBManager.to_json(list(callback.args), callback.database_provider),
        "kwargs": DBManager.to_json(callback.kwargs, callback.database_provider),
    }
    (folder / INVOCATION_NAME).write_text(json.dumps(invocation))
    return wrapper


def _describe_exit(callback: Callback, child: ChildExit) -> str:
    if child.timed_out_after is not None:
        return f"{callback.name} timed out after {child.timed_out_after:g} s; its process tree was killed"
    if child.signal_name is not None:
        return f"{callback.name} was killed by {child.signal_name} before it returned"
    return f"{callback.name} exited with code {child.returncode} before it returned (crashed)"


@dataclass(frozen=True)
class Returned:
    """What a callback returned, as its wrapper wrote it."""

    value: Any


def returned_value(folder: Path) -> Returned | None:
    """What the callback of a call folder returned, if its wrapper wrote that it returned (not that it raised)."""
    try:
        outcome = json.loads((folder / RESULT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return Returned(outcome["result"]) if isinstance(outcome, dict) and "result" in outcome else None


def read_outcome(folder: Path, callback: Callback, child: ChildExit) -> Any:
    """The callback's return value, or CallbackFailed saying why there is none.

    A callback that returned has run to its end, side effects and all, even when its process was killed by a
    signal before it exited: calling that a failure would have the job's retry run it a second time.
    """
    result_file = folder / RESULT_NAME
    if child.stopped:
        raise RunCancelled(f"the run was cancelled while {callback.name} ran; its process tree was killed")
    if child.timed_out_after is not None or not result_file.is_file():
        raise CallbackFailed(_describe_exit(callback, child))
    try:
        outcome = json.loads(result_file.read_text())
    except (OSError, ValueError) as error:
        raise CallbackFailed(f"{callback.name} left an unreadable result: {error}") from error
    if "error" in outcome:
        error = outcome["error"] or {}
        raise CallbackFailed(
            f"{callback.name} failed: {error.get('message', 'unknown error')}", error.get("traceback", "")
        )
    if child.returncode > 0:
        raise CallbackFailed(f"{callback.name} returned but its process exited with code {child.returncode}")
    return outcome.get("result")
