"""Crashed runs: Prefect marks them Crashed, and `dcm-record-crash` writes that onto their job records.

A run whose process dies (killed, out of memory, host lost) cannot record its own outcome. Prefect
notices in one of two ways: the worker that started the process sees it exit abnormally, or, when the
worker is gone too, the run's heartbeats stop and the automation "dcm: crash runs without heartbeat"
sets it Crashed (Prefect's own recipe for zombie runs; a self-hosted server has no other detector).
The automation "dcm: record crashed jobs" then runs the `dcm-record-crash` deployment for every
crashed `dcm-job` run, which fails the job record when that run still holds it, and for every crashed
`dcm-session` run, whose job runs in its own process died with it and are set Crashed in turn. The callback's
process does not outlive its run: the callback wrapper ends its process group when its parent dies.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.automations import Automation
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, RunDeployment
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from blocks.database import DcmDatabase
from flows.runtime.environment import HEARTBEAT_SECONDS
from flows.runtime.records import PlatformRecords
from flows.session import unfinished_job_runs

RECORD_CRASH_DEPLOYMENT = "dcm-record-crash/process"
MISSED_HEARTBEATS_SECONDS = 2 * HEARTBEAT_SECONDS + 15
FLOW_RUN_ENDED = ["Completed", "Failed", "Cancelled", "Crashed"]
FLOW_RUN_RESOURCE = "prefect.flow-run."


@flow(name="dcm-record-crash", persist_result=False, log_prints=False, retries=3, retry_delay_seconds=30)
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
    job_id = crashed.parameters.get("job_id")
    if not job_id:
        return f"flow run {flow_run_id} is not a dcm-job run; nothing to record"
    cause = crashed.state.message if crashed.state and crashed.state.message else "its process ended without a result"
    reason = f"the job's flow run {flow_run_id} crashed: {cause}"
    database = DcmDatabase.resolve(crashed.parameters.get("database_block", "default"))
    PlatformRecords(database.open()).mark_failed_unless_recorded(str(job_id), flow_run_id, reason)
    get_run_logger().info("job %s: %s", job_id, reason)
    return reason


def _crash_job_runs_of(client: SyncPrefectClient, session_run_id: UUID) -> str:
    """Set Crashed every child run of a crashed session that has not ended (the ones on workers
    have their own process and end on their own, so only runs without a deployment are touched)."""
    in_session = [child for child in unfinished_job_runs(client, session_run_id) if child.deployment_id is None]
    for child in in_session:
        client.set_flow_run_state(child.id, Crashed(
            message=f"its session's flow run {session_run_id} crashed, and the job ran in that run's process"
        ), force=True)
    summary = f"session run {session_run_id} crashed: {len(in_session)} job runs in its process set Crashed"
    get_run_logger().info(summary)
    return summary


def crash_automations(record_crash_deployment_id: UUID) -> list[Automation]:
    """The two automations described in the module docstring."""
    crash_silent_runs = Automation(
        name="dcm: crash runs without heartbeat",
        description="A flow run whose heartbeats stop (its process and its worker are gone) is set Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in FLOW_RUN_ENDED)},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=MISSED_HEARTBEATS_SECONDS),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {MISSED_HEARTBEATS_SECONDS} s: the run's process and its worker are gone",
        )],
    )
    record_crashed_jobs = Automation(
        name="dcm: record crashed jobs",
        description=(
            "Each crashed dcm-job run gets its failure written onto its job record by dcm-record-crash; "
            "a crashed dcm-session run gets the job runs that ran in its process crashed."
        ),
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({
                "prefect.resource.role": "flow", "prefect.resource.name": ["dcm-job", "dcm-session"],
            }),
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[RunDeployment(
            source="selected",
            deployment_id=record_crash_deployment_id,
            parameters={"flow_run_id": "{{ event.resource.id }}"},
        )],
    )
    return [crash_silent_runs, record_crashed_jobs]


def ensure_crash_automations() -> list[str]:
    """Create the automations, replacing earlier versions of the same name; return their names.

    Needs the `dcm-record-crash/process` deployment (`prefect deploy --all`).
    """
    with get_client(sync_client=True) as prefect:
        try:
            deployment = prefect.read_deployment_by_name(RECORD_CRASH_DEPLOYMENT)
        except ObjectNotFound as missing:
            raise RuntimeError(
                f"deployment {RECORD_CRASH_DEPLOYMENT} is missing: run `prefect deploy --all`"
            ) from missing
        names = []
        for automation in crash_automations(deployment.id):
            for existing in prefect.read_automations_by_name(automation.name):
                prefect.delete_automation(existing.id)
            automation.create()
            names.append(automation.name)
        return names
