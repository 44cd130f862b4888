"""The pool workers (ops/pool_workers.py) start a new run at once, not at their next poll, and with their own
Python, whatever PATH holds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment

from flows.runtime.fast_path import slow_start_advice
from flows.runtime.names import FRESH_ENGINE_VARIABLE, POOL_WORKER_VARIABLE, PROCESS_POOL_WORKER_TYPE
from ops.doctor import Doctor
from ops.pool_workers import ProcessPoolWorker
from ops.stack import STOP_TIMEOUT_SECONDS, WORKER_STARTED, LocalStack, StackState
from tests.conftest import eventually, finished, logs_of_ended_run, read_flow_run, read_logs
from tests.platform import Platform

POLL_SECONDS = 300
SUBSCRIBED_SECONDS = 3


@contextmanager
def pool_with_worker(local_stack: LocalStack, stack: StackState, log: Path, worker_type: str = PROCESS_POOL_WORKER_TYPE,
                     **environment: str) -> Iterator[str]:
    """A process pool of its own with the `dcm-job` flow deployed on it, and a process worker of `worker_type`
    (this project's unless told) polling it, started with the stack's worker environment changed by
    `environment`; yields the deployment's name."""
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(
            name=pool, type=ProcessPoolWorker.type,
            base_job_template=ProcessPoolWorker.get_default_base_job_template(),
        ))
        job = client.read_deployment_by_name("dcm-job/process")
        deployment = client.create_deployment(
            flow_id=job.flow_id, name=pool, work_pool_name=pool, entrypoint=job.entrypoint,
            job_variables=job.job_variables, parameter_openapi_schema=job.parameter_openapi_schema,
        )
    with log.open("w") as output:
        worker = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool,
             "--type", worker_type],
            env={**os.environ, **local_stack.worker_environment(stack), **environment},
            stdout=output, stderr=subprocess.STDOUT,
        )
    try:
        eventually(lambda: WORKER_STARTED in log.read_text(), timeout=90)
        time.sleep(SUBSCRIBED_SECONDS)
        yield f"dcm-job/{pool}"
    finally:
        _stop(worker)
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment)
            client.delete_work_pool(pool)


@pytest.fixture
def slow_polling_pool(local_stack: LocalStack, stack: StackState, tmp_path: Path) -> Iterator[str]:
    """A pool whose worker polls every 5 minutes."""
    with pool_with_worker(local_stack, stack, tmp_path / "worker.log",
                          PREFECT_WORKER_QUERY_SECONDS=str(POLL_SECONDS)) as deployment:
        yield deployment


@pytest.fixture
def bare_path_pool(local_stack: LocalStack, stack: StackState, tmp_path: Path) -> Iterator[str]:
    """A pool whose worker was started as `.venv/bin/prefect worker start`, its environment not activated:
    the system's folders alone on PATH."""
    with pool_with_worker(local_stack, stack, tmp_path / "worker.log", PATH="/usr/sbin:/usr/bin:/sbin:/bin") as name:
        yield name


def _stop(worker: subprocess.Popen[bytes]) -> None:
    """Stop the worker as the stack does: SIGTERM, then SIGKILL if it has not exited within the stack's
    timeout (Prefect's workers, this project's and its own, now and then take longer to shut down)."""
    worker.terminate()
    try:
        worker.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def test_a_process_worker_starts_a_new_run_long_before_its_next_poll(slow_polling_pool: str) -> None:
    created = time.monotonic()
    flow_run = run_deployment(slow_polling_pool, parameters={"job_id": "0123456789abcdef01234567"}, timeout=0)

    while read_flow_run(flow_run.id).state_type == StateType.SCHEDULED:
        assert time.monotonic() - created < POLL_SECONDS / 10, "the run waited for the worker's next poll"
        time.sleep(0.1)
    final = finished(flow_run.id)

    assert final.state.is_failed() and "no job with id 0123456789abcdef01234567" in final.state.message
    said = [log.message for log in logs_of_ended_run(flow_run.id)]
    assert not [message for message in said if "instead" in message or "fresh" in message]


@pytest.fixture
def stock_worker_pool(local_stack: LocalStack, stack: StackState, tmp_path: Path) -> Iterator[str]:
    """A pool polled by Prefect's stock process worker, as Prefect's docs start it."""
    with pool_with_worker(local_stack, stack, tmp_path / "worker.log", "process") as deployment:
        yield deployment


def test_a_run_of_prefects_stock_worker_says_which_worker_to_start_instead_and_doctor_names_the_worker(
    stock_worker_pool: str,
) -> None:
    pool = stock_worker_pool.split("/")[1]

    flow_run = run_deployment(stock_worker_pool, parameters={"job_id": "0123456789abcdef01234567"}, timeout=0)
    final = finished(flow_run.id)
    with get_client(sync_client=True) as client:
        finding = Doctor(client).pool(pool, "the test's runs")

    assert final.state.is_failed() and "no job with id" in final.state.message
    logs = [log.message for log in logs_of_ended_run(flow_run.id)]
    advice = [message for message in logs if "Prefect's stock worker" in message]
    assert len(advice) == 1 and f"`prefect worker start --pool {pool} --type dcm-process`" in advice[0]
    assert not [message for message in logs if "stock `prefect server start`" in message], "the server is ours"
    assert finding.problem is not None and "Prefect's stock worker" in finding.problem
    assert f"--pool {pool} --type dcm-process" in finding.fix


@pytest.fixture
def pool_without_warm_engine(local_stack: LocalStack, stack: StackState, tmp_path: Path) -> Iterator[str]:
    """A pool whose worker (this project's) was started without the warm engine's socket."""
    with pool_with_worker(local_stack, stack, tmp_path / "worker.log", DCM_FLOWS_WARM_ENGINE="") as deployment:
        yield deployment


def test_a_run_started_in_a_fresh_interpreter_says_why_and_how_to_start_the_warm_engine(
    pool_without_warm_engine: str,
) -> None:
    flow_run = run_deployment(pool_without_warm_engine, parameters={"job_id": "0123456789abcdef01234567"}, timeout=0)
    finished(flow_run.id)

    advice = [log.message for log in logs_of_ended_run(flow_run.id) if "fresh interpreter" in log.message]
    assert len(advice) == 1 and "the worker has no DCM_FLOWS_WARM_ENGINE" in advice[0]
    assert "python -m ops.warm_engine serve" in advice[0]


@pytest.mark.parametrize(("environment", "advice"), [
    ({}, "`prefect worker start --pool dcm-docker --type dcm-docker`"),
    ({POOL_WORKER_VARIABLE: "dcm-process", FRESH_ENGINE_VARIABLE: "no warm engine answers at /s"}, "answers at /s"),
    ({POOL_WORKER_VARIABLE: "dcm-process"}, None),
    ({POOL_WORKER_VARIABLE: "dcm-docker", FRESH_ENGINE_VARIABLE: "the worker has no DCM_FLOWS_WARM_ENGINE"}, None),
], ids=["stock worker", "no warm engine", "fast path", "docker container"])
def test_only_a_run_started_the_slow_way_is_told_what_to_start(environment: dict[str, str], advice: str | None) -> None:
    said = slow_start_advice(environment, "dcm-docker", "docker")

    assert said is None if advice is None else advice in (said or "")


def test_a_process_worker_without_its_environment_on_path_runs_jobs_with_its_own_python(
    bare_path_pool: str, platform: Platform
) -> None:
    service = platform.service(f"bare-{uuid.uuid4().hex[:8]}", "def run(**kwargs):\n    return 3\n")
    job_id = platform.service_job(service)

    flow_run = run_deployment(bare_path_pool, parameters={"job_id": job_id}, timeout=0)

    final = finished(flow_run.id)
    assert final.state.is_completed(), final.state.message
    assert platform.job(job_id)["result"] == 3


def test_a_run_whose_process_dies_before_its_flow_starts_says_why_in_its_logs(platform: Platform) -> None:
    service = platform.service(f"early-{uuid.uuid4().hex[:8]}", "def run(**kwargs):\n    return 3\n")
    job_id = platform.service_job(service)

    flow_run = run_deployment("dcm-job/process", parameters={"job_id": job_id}, timeout=0,
                              job_variables={"command": "python -m ops.warm_engin"})

    final = finished(flow_run.id)
    assert final.state.is_crashed(), final.state
    eventually(lambda: any("No module named ops.warm_engin" in log.message for log in read_logs(flow_run.id)),
               timeout=30)
