"""The warm engine (ops/warm_engine.py): process-pool runs start in a fork of a process that has imported
Prefect and the flows, behave to the worker as the process it started, and fall back to a fresh engine."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import prefect.client.orchestration as orchestration
import pytest
from prefect.client.orchestration import SyncPrefectClient

from ops.stack import LocalStack, StackState, process_alive
from ops.warm_engine import share_tls_contexts_between_prefect_clients
from tests.conftest import SleeperRun, eventually, finished, read_flow_run
from tests.platform import Platform, job_folder_of, parent_of


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
