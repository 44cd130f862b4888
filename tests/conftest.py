"""Fixtures that start the real services once per test session.

The stack is the same `LocalStack` that `make demo` uses: SecantusDB (MongoDB wire protocol) as its
own process, `prefect server start` on SQLite, the `dcm-process` pool with a process worker, the
deployments from prefect.yaml and the `default` database block.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun, Log
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.server.api.server import SubprocessASGIServer

from blocks.database import DcmDatabase
from flows.runtime.environments.docker import build_context, build_runtime_image
from flows.runtime.names import DEFAULT_BLOCK
from flows.runtime.wheelhouse import build_wheelhouse
from flows.submit import submit_job, wait_for_run
from ops.stack import LocalStack, StackState, docker_engine_answers
from tests.platform import Platform

SERVICE_PACKAGES = ["dcm-processor-service==0.0.1"]
REPOSITORY = Path(__file__).resolve().parents[1]


def _refuse_a_temporary_server(server: SubprocessASGIServer, *arguments: Any, **keywords: Any) -> None:
    """A Prefect client that finds no API URL starts a temporary server of its own, which can outlive the
    test run. Every test talks to the stack's server: such a call is a bug of the test, and fails here."""
    raise RuntimeError("a Prefect client was used outside the stack's settings and would start a temporary "
                       "API server; run it inside the `stack` fixture's context (or a copy of it)")


SubprocessASGIServer.start = _refuse_a_temporary_server  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    return LocalStack(tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="session")
def stack(local_stack: LocalStack) -> Iterator[StackState]:
    local = local_stack
    try:
        state = local.start()
        with local.connected(state):
            yield state
            # Flush Prefect's log and event queues while its client still points at the stack; at
            # interpreter exit it would otherwise start a temporary server of its own to flush them.
            APILogWorker.drain_all()
            EventsWorker.drain_all()
    finally:
        local.stop()


@pytest.fixture(scope="session")
def database(stack: StackState) -> DcmDatabase:
    return DcmDatabase.load(DEFAULT_BLOCK)


@pytest.fixture
def platform(database: DcmDatabase) -> Platform:
    return Platform(database.open())


@pytest.fixture(scope="session")
def service_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real virtual environment with dcm-processor-service, as a venv worker has; returns its python."""
    folder = tmp_path_factory.mktemp("worker") / "venv"
    subprocess.run([sys.executable, "-m", "virtualenv", "--quiet", str(folder)], check=True)
    python = folder / "bin" / "python"
    subprocess.run([sys.executable, "-m", "uv", "pip", "install", "--quiet", "--python", str(python),
                    *SERVICE_PACKAGES], check=True)
    return python


@contextmanager
def separate_database(database: DcmDatabase, prefix: str) -> Iterator[tuple[str, DcmDatabase]]:
    """A fresh database on the stack's server, saved as a block of its name (so the worker reaches it),
    dropped afterwards: the scheduler then sees only the services a test registers."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    own = database.with_database_name(name)
    own.save(name, overwrite=True)
    try:
        yield name, own
    finally:
        own.open().db.get_db().client.drop_database(name)


@contextmanager
def database_away(local_stack: LocalStack, stack: StackState) -> Iterator[None]:
    """The platform database stopped for the block, and started again however the block ends (the tests
    after it need it)."""
    local_stack.stop_database(stack)
    try:
        yield
    finally:
        local_stack.start_database(stack)


@contextmanager
def prefect_away(local_stack: LocalStack, stack: StackState) -> Iterator[None]:
    """The Prefect server stopped for the block, and started again however the block ends."""
    local_stack.stop_server(stack)
    try:
        yield
    finally:
        local_stack.start_server(stack)


def read_logs(flow_run_id: UUID) -> list[Log]:
    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def logs_of_ended_run(flow_run_id: UUID, timeout: float = 30) -> list[Log]:
    """Every log line of a flow run that has ended by itself. Its process sends its lines in batches, the
    last ones after the run's final state: this waits for the engine's own last line, "Finished in state"."""

    def with_last_line() -> list[Log]:
        logs = read_logs(flow_run_id)
        ended = any(log.task_run_id is None and log.message.startswith("Finished in state") for log in logs)
        return logs if ended else []

    return eventually(with_last_line, timeout=timeout)


def read_flow_run(flow_run_id: UUID) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def eventually(condition: Callable[[], Any], timeout: float = 60, interval: float = 0.2) -> Any:
    """Poll until `condition()` is truthy and return it; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def running_callback(pid_file: Path) -> int:
    """The pid of a sleeper job's callback (tests/platform.py), once it has started."""
    return int(eventually(lambda: pid_file.exists() and pid_file.read_text(), timeout=120))


@dataclass(frozen=True)
class SleeperRun:
    """A sleeper job (tests/platform.py) submitted on its own, with its callback running."""

    job_id: str
    flow_run_id: UUID
    callback: int
    """The pid of the running callback."""


@pytest.fixture
def start_sleeper(platform: Platform, tmp_path: Path) -> Callable[..., SleeperRun]:
    """Submit a sleeper job through the process pool and wait until its callback runs; keywords go to
    `Platform.sleeper_job` (sleep, timeout)."""

    def start(**options: Any) -> SleeperRun:
        job_id, pid_file = platform.sleeper_job(tmp_path, **options)
        flow_run_id = submit_job(job_id)
        return SleeperRun(job_id, flow_run_id, running_callback(pid_file))

    return start


def finished(flow_run_id: UUID, timeout: float = 180) -> FlowRun:
    return wait_for_run(flow_run_id, timeout_seconds=timeout)


BASE_IMAGE = "dcm-flows/python-base:bookworm"
TEST_WORKER_IMAGE = "dcm-flows-test/worker:latest"
WORKER_DOCKERFILE = """\
FROM dcm-flows/python-base:bookworm
COPY wheelhouse /tmp/wheelhouse
RUN python3 -m venv /opt/service \\
 && /opt/service/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheelhouse dcm-processor-service \\
 && rm -rf /tmp/wheelhouse
ENV PATH=/opt/service/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
"""


@pytest.fixture(scope="session")
def docker_client():
    if not docker_engine_answers():
        pytest.skip("no Docker engine could be reached (run .ci/docker-engine.sh as root to start one)")
    import docker

    return docker.from_env()


def containers_matching(docker_client: Any, filters: dict[str, str]) -> list[Any]:
    """Containers, running or not, that match `filters`. docker-py inspects each container it lists, and one
    auto-removed in between would raise NotFound: it counts as gone."""
    return docker_client.containers.list(all=True, ignore_removed=True, filters=filters)


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """Every wheel the runtime needs, downloaded on the host once, so images build with no network."""
    return build_wheelhouse(Path(".dcm-flows/wheelhouse").resolve())


@pytest.fixture(scope="session")
def worker_image(docker_client, wheelhouse: Path) -> str:
    """A worker image as a service author would write it: Python with dcm-processor-service."""
    docker_client.images.build(fileobj=build_context(WORKER_DOCKERFILE, wheelhouse), custom_context=True,
                               tag=TEST_WORKER_IMAGE, rm=True, network_mode="none")
    return TEST_WORKER_IMAGE


@pytest.fixture(scope="session")
def runtime_image(docker_client, worker_image: str, wheelhouse: Path, stack: StackState) -> str:
    """The worker image with this runtime's layer on top, built offline."""
    return build_runtime_image(docker_client, worker_image, wheelhouse, "dcm-flows-test/runtime:latest")
