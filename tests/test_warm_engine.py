"""The warm engine (ops/warm_engine.py): process-pool runs start in a fork of a process that has imported
Prefect and the flows, behave to the worker as the process it started, and fall back to a fresh engine."""

from __future__ import annotations

import array
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import prefect.client.orchestration as orchestration
import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient

import ops
from flows.runtime.names import PROCESS_POOL
from ops.stack import LocalStack, StackState, process_alive
from ops.warm_engine import (
    PRELOADED_MODULES,
    RunRequest,
    connect_to_warm_engine,
    share_tls_contexts_between_prefect_clients,
)
from tests.conftest import SleeperRun, eventually, finished, read_flow_run
from tests.platform import Platform, job_folder_of, parent_of

NOBODY = 65534


def job_command_of(flow_run_id: object) -> int:
    """The process the worker started for a run (Prefect records its pid on the run)."""
    return int(eventually(lambda: read_flow_run(flow_run_id).infrastructure_pid, timeout=30))


@contextmanager
def warm_engine_stopped(stack: StackState, local_stack: LocalStack) -> Iterator[None]:
    """The host's warm engine is down; it is started again however the test ends."""
    local_stack.stop_warm_engine(stack)
    try:
        yield
    finally:
        local_stack.start_workers(stack)


def test_the_warm_engine_has_imported_the_flow_of_every_process_pool_deployment() -> None:
    deployments = yaml.safe_load((Path(ops.__file__).parent / "prefect.yaml").read_text())["deployments"]
    flow_modules = {deployment["entrypoint"].split(":")[0] for deployment in deployments
                    if deployment["work_pool"]["name"] == PROCESS_POOL}
    assert flow_modules and flow_modules <= set(PRELOADED_MODULES), flow_modules - set(PRELOADED_MODULES)


def test_a_process_pool_job_runs_in_a_fork_of_the_warm_engine_below_the_command_the_worker_started(
    platform: Platform, start_sleeper: Callable[..., SleeperRun], stack: StackState
) -> None:
    sleeper = start_sleeper(sleep=2)

    run_process = parent_of(sleeper.callback)
    assert parent_of(run_process) == stack.processes["warm-engine"]
    assert parent_of(job_command_of(sleeper.flow_run_id)) == stack.processes["process-worker"]
    assert finished(sleeper.flow_run_id).state.is_completed()
    assert platform.job(sleeper.job_id)["done"] is True


def test_without_a_warm_engine_the_job_command_starts_a_fresh_engine_process(
    platform: Platform, start_sleeper: Callable[..., SleeperRun], stack: StackState, local_stack: LocalStack
) -> None:
    with warm_engine_stopped(stack, local_stack):
        sleeper = start_sleeper(sleep=2)

        assert parent_of(sleeper.callback) == job_command_of(sleeper.flow_run_id)
        assert parent_of(parent_of(sleeper.callback)) == stack.processes["process-worker"]
        assert finished(sleeper.flow_run_id).state.is_completed()
    assert platform.job(sleeper.job_id)["done"] is True


def test_a_killed_job_command_takes_its_forked_run_and_the_callback_with_it(
    platform: Platform, start_sleeper: Callable[..., SleeperRun]
) -> None:
    sleeper = start_sleeper()
    job_id, flow_run_id, callback = sleeper.job_id, sleeper.flow_run_id, sleeper.callback
    run_process, job_folder = parent_of(callback), job_folder_of(callback)

    os.kill(job_command_of(flow_run_id), signal.SIGKILL)

    eventually(lambda: not process_alive(run_process), timeout=15)
    eventually(lambda: not process_alive(callback), timeout=15)
    eventually(lambda: not job_folder.exists(), timeout=15)
    assert finished(flow_run_id, timeout=60).state.is_crashed()
    record = eventually(lambda: (job := platform.job(job_id))["error"] and job, timeout=90)
    assert record["inProgress"] is False and record["done"] is False


def tls_context_of(client: SyncPrefectClient) -> object:
    return client._client._transport._pool._ssl_context


def test_prefect_clients_share_one_verifying_tls_context_and_build_insecure_ones_anew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(orchestration, "ssl", orchestration.ssl)
    api = "http://127.0.0.1:9/api"
    assert tls_context_of(SyncPrefectClient(api)) is not tls_context_of(SyncPrefectClient(api))

    share_tls_contexts_between_prefect_clients()

    assert tls_context_of(SyncPrefectClient(api)) is tls_context_of(SyncPrefectClient(api))
    assert orchestration.ssl.create_default_context() is not orchestration.ssl.create_default_context()


def test_silent_clients_do_not_hold_up_the_runs_of_others(
    start_sleeper: Callable[..., SleeperRun], stack: StackState, local_stack: LocalStack
) -> None:
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(20)]
    try:
        for connection in silent:
            connection.connect(str(local_stack.warm_engine_socket))
        asked = time.monotonic()
        sleeper = start_sleeper(sleep=1)

        assert time.monotonic() - asked < 30, "a run waited behind clients that sent nothing"
        assert parent_of(parent_of(sleeper.callback)) == stack.processes["warm-engine"]
    finally:
        for connection in silent:
            connection.close()


def as_another_user(action: Callable[[], bool]) -> bool:
    """`action()` in a forked child that has become `nobody`; whether it returned True. The child never returns
    into the test run, however `action` ends."""
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = 0 if action() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def listening(socket_path: Path) -> bool:
    """Whether the warm engine at `socket_path` accepts this user's connections yet (the socket file appears
    before the engine listens on it)."""
    connection = connect_to_warm_engine(str(socket_path))
    if connection is None:
        return False
    connection.close()
    return True


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder every local user can reach (pytest's own temporary folders are the test user's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="dcm-shared-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_warm_engine_refuses_a_client_of_another_user(shared_folder: Path) -> None:
    socket_path = shared_folder / "engine.sock"
    engine = subprocess.Popen([sys.executable, "-m", "ops.warm_engine", "serve", str(socket_path)])
    try:
        eventually(lambda: listening(socket_path), timeout=60)
        socket_path.chmod(0o666)  # as if the operator had loosened it: the check must not rest on the mode alone
        request = RunRequest(sys.executable, "/", {"PATH": "/usr/bin"}).encode()

        def ask() -> bool:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.connect(str(socket_path))
                time.sleep(0.5)  # as on a busy machine: the engine refuses, and closes, before the request is sent
                streams = array.array("i", (0, 1, 2))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before it was sent
                    connection.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, streams.tobytes())])
                return connection.makefile("r").readline().startswith("refused another-user")

        assert as_another_user(ask)
    finally:
        engine.kill()
        engine.wait()


def test_the_job_command_hands_nothing_to_a_socket_of_another_user(shared_folder: Path) -> None:
    socket_path = shared_folder / "engine.sock"
    listening, finished_with = os.pipe(), os.pipe()

    def listen() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(socket_path))
            os.chmod(socket_path, 0o666)
            listener.listen(1)
            os.write(listening[1], b"x")
            os.read(finished_with[0], 1)
        return True

    thread = threading.Thread(target=as_another_user, args=(listen,))
    thread.start()
    try:
        assert os.read(listening[0], 1) == b"x"

        assert connect_to_warm_engine(str(socket_path)) is None
    finally:
        os.write(finished_with[1], b"x")
        thread.join(30)
