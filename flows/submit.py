"""What the scheduler (and the CLI) call to run platform work through the Prefect API.

`submit_job(job_id)` creates a flow run of the `dcm-job` deployment that fits the job's environment
and returns its id at once; the job's own data stays in the platform database. The other calls start
a session, an install or a removal the same way.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from blocks.database import DcmDatabase
from flows.runtime.environments import environment_for, environment_of_job
from flows.runtime.errors import InvalidRecord, JobNotFound
from flows.runtime.names import (
    DEFAULT_BLOCK,
    INSTALL_FLOW,
    JOB_FLOW,
    REMOVE_FLOW,
    SESSION_FLOW,
    JobParameters,
    deployment,
)
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.records import JobRecord


def job_run_name(job_id: str, job: JobRecord | None) -> str:
    """The flow run name of a job: its label and id, nothing from the patient."""
    return f"{job.label if job else 'job'} {job_id}"


def job_tags(job: JobRecord | None) -> list[str]:
    """The tags of a job's flow run: its service and session, to filter runs by in the UI."""
    tags = [JOB_FLOW]
    if job is not None and job.service_name:
        tags.append(f"service:{job.service_name}")
    if job is not None and job.session_id:
        tags.append(f"session:{job.session_id}")
    return tags


def _start(deployment_name: str, parameters: dict[str, Any], name: str, **options: Any) -> UUID:
    """Create a flow run of a deployment and return its id at once, without waiting for it. Outside a flow
    it is a run of its own; `as_subflow` (a job of a session) makes it the calling flow run's child."""
    options.setdefault("as_subflow", False)
    flow_run = run_deployment(name=deployment_name, parameters=parameters, flow_run_name=name, timeout=0, **options)
    return flow_run.id


def submit_job(
    job_id: str,
    database_block: str = DEFAULT_BLOCK,
    work_queue_name: str | None = None,
    records: PlatformRecords | None = None,
) -> UUID:
    """Start a `dcm-job` flow run for the platform job `job_id`; return the flow run's id.

    Called inside a flow, the job's run becomes a child of that flow's run. `work_queue_name`
    routes it to one queue of the pool (the queue of the host that holds the job's environment).
    """
    records = records or PlatformRecords(DcmDatabase.resolve(database_block).open())
    job: JobRecord | None
    try:
        job = records.job(job_id)
        environment = environment_of_job(job, records)
    except (InvalidRecord, JobNotFound):
        # Run it anyway, on the process pool: its pre-service fails and writes why into the record.
        job, environment = None, environment_for(None)
    return _start(
        deployment(JOB_FLOW, environment.deployment),
        JobParameters(job_id, database_block).as_parameters(),
        job_run_name(job_id, job),
        job_variables=environment.job_variables(),
        tags=job_tags(job),
        work_queue_name=work_queue_name,
        as_subflow=True,
    )


def submit_session(
    session_id: str,
    database_block: str = DEFAULT_BLOCK,
    idempotency_key: str | None = None,
    jobs_in_session: bool = True,
) -> UUID:
    """Start one `dcm-session` flow run for a platform session; return the flow run's id.

    With an `idempotency_key`, submitting again returns the run created the first time.
    `jobs_in_session=False` hands every job of the session to a worker (see flows/session.py).
    """
    parameters: dict[str, object] = {"session_id": session_id, "database_block": database_block}
    if not jobs_in_session:
        parameters["jobs_in_session"] = False
    return _start(
        deployment(SESSION_FLOW), parameters, f"session {session_id}",
        tags=[SESSION_FLOW, f"session:{session_id}"], idempotency_key=idempotency_key,
    )


def submit_install(
    source: str, force: bool = False, database_block: str = DEFAULT_BLOCK, work_queue_name: str | None = None
) -> UUID:
    """Start a `dcm-install-component` run for a component folder, archive or URL; return its id.

    A folder or archive path must be readable by the worker that picks the run up; `work_queue_name`
    sends the run to the queue of the host that is to hold the environment.
    """
    return _start(
        deployment(INSTALL_FLOW), {"source": source, "force": force, "database_block": database_block},
        f"install {source.rstrip('/').rsplit('/', 1)[-1]}", work_queue_name=work_queue_name,
    )


def submit_removal(name: str, database_block: str = DEFAULT_BLOCK, work_queue_name: str | None = None) -> UUID:
    """Start a `dcm-remove-component` run for the component `name`; return its id."""
    return _start(
        deployment(REMOVE_FLOW), {"name": name, "database_block": database_block}, f"remove {name}",
        work_queue_name=work_queue_name,
    )


def wait_for_run(flow_run_id: UUID, timeout_seconds: float = 600, poll_seconds: float = 0.5) -> FlowRun:
    """Poll the Prefect API until the flow run is in a final state, or raise TimeoutError."""
    deadline = time.monotonic() + timeout_seconds
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} did not finish within {timeout_seconds:g} s")
            time.sleep(poll_seconds)
