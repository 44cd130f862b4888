"""The wrapper, the result reader and the child-process runner, with this interpreter as the worker."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from flows.runtime.callback import Callback
from flows.runtime.environments import environment_for
from flows.runtime.errors import CallbackFailed, RunCancelled, UnknownWorkerType
from flows.runtime.records import WorkerRecord
from flows.runtime.variables import SERVICE_PREFIX, callback_variables


def run_module(tmp_path: Path, source: str, timeout: float | None = None, should_stop=None, **kwargs):
    package = tmp_path / "pkg"
    package.mkdir(exist_ok=True)
    (package / "callbacks.py").write_text(source)
    lines: list[tuple[str, str]] = []
    callback = Callback(module="callbacks", function="run", kwargs=kwargs, search_path=[str(package)])
    value = environment_for(None).run(
        callback, tmp_path / "call", callback_variables({}), timeout,
        lambda stream, line: lines.append((stream, line)), should_stop,
    )
    return value, lines


def test_the_callback_value_comes_back_with_its_output_lines(tmp_path: Path) -> None:
    source = (
        "import sys\n"
        "def run(x):\n"
        "    print('out', x)\n"
        "    print('err', file=sys.stderr)\n"
        "    return {'double': x * 2}\n"
    )

    value, lines = run_module(tmp_path, source, x=21)

    assert value == {"double": 42}
    assert ("stdout", "out 21") in lines and ("stderr", "err") in lines


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def run():\n    raise KeyError('missing')\n", "KeyError: 'missing'"),
        ("import os\ndef run():\n    os._exit(7)\n", "exited with code 7"),
        ("import os, signal\ndef run():\n    os.kill(os.getpid(), signal.SIGKILL)\n", "killed by SIGKILL"),
        ("def run():\n    return {1, 2}\n", "not JSON"),
        ("import sys\ndef run():\n    sys.exit(0)\n", "SystemExit"),
    ],
)
def test_every_way_a_callback_can_fail_is_named(tmp_path: Path, source: str, message: str) -> None:
    with pytest.raises(CallbackFailed, match=message):
        run_module(tmp_path, source)


def test_a_timeout_kills_the_whole_process_tree(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    source = (
        "import subprocess, sys, time\n"
        "def run(pid_file):\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "    open(pid_file, 'w').write(str(child.pid))\n"
        "    time.sleep(300)\n"
    )
    started = time.monotonic()

    with pytest.raises(CallbackFailed, match="timed out after 2 s"):
        run_module(tmp_path, source, timeout=2, pid_file=str(pid_file))

    assert time.monotonic() - started < 15
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_a_stop_request_kills_the_callback_and_reports_a_cancellation(tmp_path: Path) -> None:
    source = "import time\ndef run():\n    time.sleep(300)\n"
    asked = []

    with pytest.raises(RunCancelled):
        run_module(tmp_path, source, should_stop=lambda: asked.append(1) or len(asked) > 1)


def test_callbacks_get_the_service_variables_but_not_the_workers_prefect_settings() -> None:
    environment = callback_variables(
        {SERVICE_PREFIX + "JOB-ID": "42"},
        base={"PATH": "/bin", "PREFECT_API_KEY": "secret", "PREFECT_API_URL": "http://x", "DCM_DB_URL": "mongodb://u:p@h"},
    )

    assert environment[SERVICE_PREFIX + "JOB-ID"] == "42" and environment["PATH"] == "/bin"
    assert not any(name.startswith(("PREFECT_", "DCM_DB_")) for name in environment)


def test_the_runtime_interpreter_is_the_worker_of_jobs_without_one() -> None:
    assert environment_for(None).interpreter() == Path(sys.executable)


def test_a_worker_of_an_unknown_type_is_refused_with_the_types_this_runtime_runs() -> None:
    worker = WorkerRecord(id="w", name="gpu-box", type="kubernetes",
                          worker_files={}, settings={})

    with pytest.raises(UnknownWorkerType, match="type 'kubernetes'; this runtime runs docker, venv, virtualenv"):
        environment_for(worker)
