"""Crashed runs: Prefect marks them Crashed, and `dcm-record-crash` writes that onto their job records.

A run whose process dies (killed, out of memory, host lost) cannot record its own outcome. Prefect
notices in one of two ways: the pool worker that started the process sees it exit abnormally, or, when
the pool worker is gone too, the run's heartbeats stop and the automation "dcm: crash runs without heartbeat"
sets it Crashed (Prefect's own recipe for zombie runs; a self-hosted server has no other detector; it is
defined in ops/prefect_setup.py, and flows/reconcile.py finds such runs too, a minute later).
The trigger "dcm: record crashed jobs" of the `dcm-record-crash` deployment (prefect.yaml) then runs it for
every crashed `dcm-job` run, which fails the job record when that run still holds it, and for every crashed
`dcm-session` run, whose job runs in its own process died with it and are set Crashed in turn. The callback's
process does not outlive its run: the callback wrapper ends its process group when its parent dies.
"""

from __future__ import annotations

from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.states import Crashed

from blocks.database import DcmDatabase
from flows.runtime.names import RECORD_CRASH_FLOW, JobParameters
from flows.runtime.platform_records import PlatformRecords
from flows.session import left_behind, unfinished_job_runs

FLOW_RUN_RESOURCE = "prefect.flow-run."


@flow(name=RECORD_CRASH_FLOW, persist_result=False, log_prints=False, retries=3, retry_delay_seconds=30)
def record_crash_flow(flow_run_id: str) -> str:
    """Fail the job record of a crashed `dcm-job` run, unless the job was recorded or is held by another run.

    For a crashed `dcm-session` run, crash the job runs it was running in its own process: they
    died with it, and each then gets its record failed by this flow in turn.

    Args:
        flow_run_id: the id of the crashed flow run, bare or as its event resource id
            (`prefect.flow-run.<id>`).
    """
    flow_run_id = flow_run_id.removeprefix(FLOW_RUN_RESOURCE)
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_run(UUID(flow_run_id))
        if "session_id" in crashed.parameters:
            return _crash_job_runs_of(client, crashed.id)
    job = JobParameters.of_run(crashed.parameters)
    if job is None:
        return f"flow run {flow_run_id} is not a dcm-job run; nothing to record"
    cause = crashed.state.message if crashed.state and crashed.state.message else "its process ended without a result"
    reason = f"the job's flow run {flow_run_id} crashed: {cause}"
    database = DcmDatabase.resolve(job.database_block)
    PlatformRecords(database.open()).mark_failed_unless_recorded(job.job_id, flow_run_id, reason)
    get_run_logger().info("job %s: %s", job.job_id, reason)
    return reason


def _crash_job_runs_of(client: SyncPrefectClient, session_run_id: UUID) -> str:
    """Set Crashed every child run of a crashed session that has not ended and ran in the crashed attempt's
    process (the ones on workers have their own process and end on their own, so only runs without a
    deployment are touched; a retry that started meanwhile runs its own)."""
    session_run = client.read_flow_run(session_run_id)
    in_session = [child for child in unfinished_job_runs(client, session_run_id)
                  if child.deployment_id is None and left_behind(child, session_run)]
    for child in in_session:
        client.set_flow_run_state(child.id, Crashed(
            message=f"its session's flow run {session_run_id} crashed, and the job ran in that run's process"
        ), force=True)
    summary = f"session run {session_run_id} crashed: {len(in_session)} job runs in its process set Crashed"
    get_run_logger().info(summary)
    return summary
