"""The wrapper, the result reader and the child-process runner, with this interpreter as the worker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from flows.runtime.callback import Callback, Returned
from flows.runtime.environments import environment_for
from flows.runtime.errors import CallbackFailed, InvalidRecord, RunCancelled, UnknownWorkerType
from flows.runtime.job_run import (
    CALLS_FOLDER,
    EXECUTE_STEP,
    JOB_FOLDER_PREFIX,
    RETURNED_KEPT_SECONDS,
    remove_abandoned_job_folders,
    returned_in_an_abandoned_run,
)
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


ESCAPING_CALLBACK = """
import os, subprocess, time

def run(pid_folder):
    session_leader = subprocess.Popen(["sleep", "999"], start_new_session=True)
    open(os.path.join(pid_folder, "setsid"), "w").write(str(session_leader.pid))
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            open(os.path.join(pid_folder, "daemon"), "w").write(str(os.getpid()))
            time.sleep(999)
        os._exit(0)
    while len(os.listdir(pid_folder)) < 2:
        time.sleep(0.05)
    if {returns}:
        return "left them running"
    time.sleep(999)
"""


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("returns", [False, True], ids=["timed-out", "returned"])
def test_processes_that_leave_the_callbacks_group_are_killed_with_it(tmp_path: Path, returns: bool) -> None:
    pid_folder = tmp_path / "pids"
    pid_folder.mkdir()
    source = ESCAPING_CALLBACK.replace("{returns}", str(returns))

    if returns:
        run_module(tmp_path, source, pid_folder=str(pid_folder))
    else:
        with pytest.raises(CallbackFailed, match="timed out"):
            run_module(tmp_path, source, timeout=3, pid_folder=str(pid_folder))

    pids = [int(path.read_text()) for path in pid_folder.iterdir()]
    assert len(pids) == 2
    for pid in pids:
        for _ in range(50):
            if not running(pid):
                break
            time.sleep(0.1)
        assert not running(pid), f"process {pid} outlived its callback"


def test_a_callback_whose_process_is_killed_after_it_returned_has_returned(tmp_path: Path) -> None:
    source = (
        "import os, signal, threading, time\n"
        "def end_by_a_signal():\n"
        "    time.sleep(0.5)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "def run():\n"
        "    threading.Thread(target=end_by_a_signal).start()\n"
        "    return 'done'\n"
    )

    value, _ = run_module(tmp_path, source)

    assert value == "done"


RUN_PROCESS = """
import os, signal, sys, threading, time
from pathlib import Path
from flows.runtime.callback import Callback
from flows.runtime.environments import environment_for
from flows.runtime.variables import callback_variables

tmp, kill_after = Path(sys.argv[1]), float(sys.argv[2])
callback = Callback(module="callbacks", function="run", search_path=[str(tmp / "pkg")], workspace=str(tmp / "job"))
variables = {**callback_variables({}), "PYTHONPATH": str(tmp / "slow-start")}
threading.Thread(target=environment_for(None).run,
                 args=(callback, tmp / "job" / "call", variables, None, lambda *_: None), daemon=True).start()
time.sleep(kill_after)
os.kill(os.getpid(), signal.SIGKILL)
"""


def run_and_kill_the_run_process(tmp_path: Path, source: str, interpreter_start_seconds: float,
                                 kill_after_seconds: float) -> None:
    """Run `source`'s callback from a stand-in for a flow run's process that is SIGKILLed `kill_after_seconds`
    after it started the callback's process, whose interpreter takes `interpreter_start_seconds` to start."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "callbacks.py").write_text(source)
    (tmp_path / "slow-start").mkdir()
    (tmp_path / "slow-start" / "sitecustomize.py").write_text(f"import time\ntime.sleep({interpreter_start_seconds})\n")
    (tmp_path / "job").mkdir()
    run_process = subprocess.run([sys.executable, "-c", RUN_PROCESS, str(tmp_path), str(kill_after_seconds)],
                                 check=False, timeout=60)
    assert run_process.returncode == -9


def test_a_callback_whose_run_process_died_while_it_started_never_runs(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    source = f"def run():\n    open({str(ran)!r}, 'w').close()\n    return 'done'\n"

    run_and_kill_the_run_process(tmp_path, source, interpreter_start_seconds=1.5, kill_after_seconds=0.3)
    time.sleep(3)

    assert not ran.exists(), "the callback ran after the flow run's process that started it was gone"
    assert not (tmp_path / "job").exists()


def test_a_callback_that_returned_as_its_run_process_died_leaves_what_it_returned(tmp_path: Path) -> None:
    source = (
        "import os, signal, threading, time\n"
        "built = threading.Event()\n"
        "def kill_the_run_process(run_process):\n"
        "    built.wait()\n"
        "    time.sleep(0.05)\n"
        "    os.kill(run_process, signal.SIGKILL)\n"
        "def run():\n"
        "    threading.Thread(target=kill_the_run_process, args=(os.getppid(),)).start()\n"
        "    value = list(range(3_000_000))\n"
        "    built.set()\n"
        "    return value\n"
    )

    run_and_kill_the_run_process(tmp_path, source, interpreter_start_seconds=0, kill_after_seconds=60)

    result = tmp_path / "job" / "call" / "result.json"
    for _ in range(600):
        if result.exists():
            break
        time.sleep(0.1)
    assert json.loads(result.read_text())["result"][-1] == 2_999_999


def abandoned_run_folder(job_id: str, returned: bool) -> Path:
    """A private folder of a run of `job_id` whose process is gone, its callback returned or not."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    folder = Path(tempfile.gettempdir()) / f"{JOB_FOLDER_PREFIX}{job_id}-{ended.pid}-abcd1234"
    call = folder / CALLS_FOLDER / f"01-{EXECUTE_STEP}-run"
    call.mkdir(parents=True)
    folder.chmod(0o700)
    if returned:
        (call / "result.json").write_text(json.dumps({"result": 1}))
    return folder


def test_only_a_private_folder_of_a_dead_run_is_believed_for_what_the_callback_returned() -> None:
    job_id = uuid.uuid4().hex[:24]
    folder = abandoned_run_folder(job_id, returned=False)
    call = folder / CALLS_FOLDER / f"01-{EXECUTE_STEP}-run"
    script = folder / CALLS_FOLDER / "00-pre-callback"
    script.mkdir()
    (script / "result.json").write_text(json.dumps({"result": "a script's"}))
    try:
        (call / "result.json").write_text(json.dumps({"error": {"message": "it raised"}}))
        assert returned_in_an_abandoned_run(job_id) is None

        (call / "result.json").write_text(json.dumps({"result": {"value": 7}}))
        folder.chmod(0o777)
        assert returned_in_an_abandoned_run(job_id) is None

        folder.chmod(0o700)
        assert returned_in_an_abandoned_run(job_id) == Returned({"value": 7})
        assert returned_in_an_abandoned_run(uuid.uuid4().hex[:24]) is None
    finally:
        shutil.rmtree(folder)


def test_a_run_removes_abandoned_folders_but_those_holding_what_another_jobs_callback_returned_unrecorded() -> None:
    own, other, other_returned, stale = (uuid.uuid4().hex[:24] for _ in range(4))
    folders = {
        "own": abandoned_run_folder(own, returned=True),
        "other": abandoned_run_folder(other, returned=False),
        "other returned": abandoned_run_folder(other_returned, returned=True),
        "stale": abandoned_run_folder(stale, returned=True),
    }
    week_and_a_day_ago = time.time() - RETURNED_KEPT_SECONDS - 86400
    os.utime(folders["stale"], (week_and_a_day_ago, week_and_a_day_ago))
    try:
        remove_abandoned_job_folders(own)

        assert {name for name, folder in folders.items() if folder.exists()} == {"other returned"}
    finally:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)


def test_the_folder_of_a_dead_run_stays_while_a_process_still_works_in_it() -> None:
    own, other = (uuid.uuid4().hex[:24] for _ in range(2))
    folder = abandoned_run_folder(other, returned=False)
    callback = subprocess.Popen(["sleep", "60"], cwd=folder / CALLS_FOLDER / f"01-{EXECUTE_STEP}-run")
    try:
        remove_abandoned_job_folders(own)
        assert folder.exists()

        callback.kill()
        callback.wait()
        remove_abandoned_job_folders(own)
        assert not folder.exists()
    finally:
        callback.kill()
        shutil.rmtree(folder, ignore_errors=True)


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


def test_a_venv_workers_limits_bound_each_callback_process(tmp_path: Path) -> None:
    worker = WorkerRecord.from_document({
        "_id": "65f0c0ffee0000000000abcd", "name": "bounded", "type": "venv",
        "settings": {}, "path": "/", "venv_path": "", "venv_python_path": sys.executable,
        "limits": {"memory": "400m", "open_files": 32},
    })
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "callbacks.py").write_text(
        "import resource\n"
        "def limits():\n"
        "    return [resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_NOFILE)[0]]\n"
        "def allocate():\n"
        "    return len(bytearray(800 * 1024 * 1024))\n"
    )

    def call(function: str) -> object:
        callback = Callback(module="callbacks", function=function, search_path=[str(package)])
        return environment_for(worker).run(callback, tmp_path / function, callback_variables({}), 60,
                                           lambda stream, line: None)

    assert call("limits") == [400 * 1024**2, 32]
    with pytest.raises(CallbackFailed, match="MemoryError"):
        call("allocate")


def test_a_limit_that_does_not_parse_names_the_field() -> None:
    worker = WorkerRecord.from_document({"_id": "65f0c0ffee0000000000abcd", "name": "bounded", "type": "venv",
                                         "limits": {"memory": "lots"}})

    with pytest.raises(InvalidRecord, match=r"'limits\.memory' \(str\)"):
        environment_for(worker)
