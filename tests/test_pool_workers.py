"""The pools' workers (ops/pool_workers.py) start a new run at once, not at their next poll."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment

from flows.runtime.names import PROCESS_POOL_WORKER_TYPE
from ops.pool_workers import ProcessPoolWorker
from ops.stack import STOP_TIMEOUT_SECONDS, WORKER_STARTED, LocalStack, StackState
from tests.conftest import eventually, finished, read_flow_run

POLL_SECONDS = 300
SUBSCRIBED_SECONDS = 3


@pytest.fixture
def slow_polling_pool(local_stack: LocalStack, stack: StackState, tmp_path: Path) -> Iterator[str]:
    """A process pool of its own with the `dcm-job` flow deployed on it, and one of this project's process
    workers polling it every 5 minutes; yields the deployment's name."""
    pool = f"wake-{uuid.uuid4().hex[:8]}"
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
    log = tmp_path / "worker.log"
    with log.open("w") as output:
        worker = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool,
             "--type", PROCESS_POOL_WORKER_TYPE],
            env={**os.environ, **local_stack.worker_environment(stack),
                 "PREFECT_WORKER_QUERY_SECONDS": str(POLL_SECONDS)},
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
