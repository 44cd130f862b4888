"""Fixtures that start the real services once per test session.

The stack is the same `LocalStack` that `make demo` uses: SecantusDB (MongoDB wire protocol) as its
own process, `prefect server start` on SQLite, the `dcm-process` pool with a process worker, the
deployments from prefect.yaml and the `default` database block.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun, Log

from blocks.database import DcmDatabase
from flows.stack import DATABASE_BLOCK, LocalStack, StackState
from flows.submit import wait_for_run
from tests.platform import Platform

SERVICE_PACKAGES = ["dcm-processor-service==0.0.1"]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    local = LocalStack(tmp_path_factory.mktemp("stack"))
    try:
        yield local.start()
    finally:
        local.stop()


@pytest.fixture(scope="session")
def database(stack: StackState) -> DcmDatabase:
    return DcmDatabase.load(DATABASE_BLOCK)


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


def read_logs(flow_run_id: UUID) -> list[Log]:
    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def read_flow_run(flow_run_id: UUID) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def child_runs_of(flow_run_id: UUID) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def eventually(condition: Callable[[], Any], timeout: float = 60, interval: float = 0.2) -> Any:
    """Poll until `condition()` is truthy and return it; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def finished(flow_run_id: UUID, timeout: float = 180) -> FlowRun:
    return wait_for_run(flow_run_id, timeout_seconds=timeout)
