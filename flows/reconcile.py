"""`dcm-reconcile`: the one place that repairs job records left in progress by runs that can no longer write them.

It runs every minute (its schedule is in prefect.yaml, so it exists as soon as the deployments do) and
looks at every job record in progress in a run of this runtime. The run that holds it may have ended
without writing its outcome (cancelled while its post-service ran, killed after its pool worker's grace
period, crashed while crash repair gave up during a long database outage), its flow-run record may be gone,
or it may be a zombie: Running in Prefect's eyes, but silent, its process and pool worker dead. A job run
that ran inside a session's process is judged by its session's run. Each such record is failed with the
reason, fenced by the holding run's id (a record another run holds meanwhile is left alone), and a zombie
run is set Crashed, as Prefect's "detect zombie flows" automation would. `dcm-record-crash`, started by each
Crashed event, stays the fast path; a pass here after it changes nothing.

Each pass also schedules again the process pool's runs left Pending by a pool worker that stopped while it
started them: no worker takes a Pending run, so such a run (a whole session, say) would wait for good.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.states import Crashed, Scheduled

from blocks.database import DcmDatabase
from flows.run_logs import RunLogger
from flows.runtime.names import DEFAULT_BLOCK, PROCESS_POOL, RECONCILE_FLOW
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.variables import MISSED_HEARTBEATS_SECONDS, SILENT_RUN_CRASHED
from flows.session import left_behind

HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
STRANDED_AFTER_SECONDS = 120.0
"""A process pool run Pending this long was left by its worker: that worker starts a run's process at once."""


@dataclass(frozen=True)
class HeldJob:
    """A job record in progress, and the flow run that holds it."""

    job_id: str
    flow_run_id: str
    session_id: str | None


class Reconciler:
    """One pass over the records in progress, against one platform database and one Prefect API."""

    def __init__(self, records: PlatformRecords, client: SyncPrefectClient, logger: RunLogger) -> None:
        self.records = records
        self.client = client
        self.logger = logger
        self._runs: dict[str, FlowRun | None] = {}

    def pass_once(self) -> list[str]:
        """Fail every record whose holding run can no longer write it; return their job ids."""
        held = [HeldJob(*row) for row in self.records.jobs_held_by_runs()]
        self._read_runs([job.flow_run_id for job in held])
        repaired = []
        for job in held:
            reason = self._why_abandoned(job)
            if reason is None:
                continue
            self.records.mark_failed_unless_recorded(job.job_id, job.flow_run_id, reason)
            self.logger.warning("job %s: %s", job.job_id, reason)
            repaired.append(job.job_id)
        return repaired

    def _read_runs(self, flow_run_ids: list[str]) -> None:
        """Read the runs (in one request) into the cache; an id that is not a run's stays None."""
        valid = []
        for flow_run_id in set(flow_run_ids) - set(self._runs):
            self._runs[flow_run_id] = None
            try:
                valid.append(UUID(flow_run_id))
            except ValueError:
                continue
        if valid:
            for run in self.client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=valid))):
                self._runs[str(run.id)] = run

    def _run(self, flow_run_id: str) -> FlowRun | None:
        if flow_run_id not in self._runs:
            self._read_runs([flow_run_id])
        return self._runs[flow_run_id]

    def _why_abandoned(self, job: HeldJob) -> str | None:
        """Why the holding run can no longer write the record, or None while it still can. Worded as crash
        repair words it, so a record reads the same whichever of the two got there first."""
        subject = f"the job's flow run {job.flow_run_id}"
        run = self._run(job.flow_run_id)
        if run is None:
            return f"{subject} no longer exists"
        if run.deployment_id is None and job.session_id:
            session_run_id = self.records.session_holder(job.session_id)
            if session_run_id is not None:
                return self._why_left_behind(run, session_run_id, subject)
        ended = self._how_ended(job.flow_run_id)
        return None if ended is None else f"{subject} {ended}"

    def _why_left_behind(self, run: FlowRun, session_run_id: str, subject: str) -> str | None:
        """Why a job run that ran in its session's process can no longer write its record, or None while the
        session's process runs it. A run of an earlier attempt of its session is set Crashed here."""
        session = f"its session's flow run {session_run_id}"
        ended = self._how_ended(session_run_id)
        if ended is not None:
            return f"{subject} crashed: it ran in {session}, which {ended}"
        session_run = self._run(session_run_id)
        if session_run is None or not left_behind(run, session_run):
            return None
        reason = f"it ran in an earlier attempt of {session}, whose process is gone"
        self.client.set_flow_run_state(run.id, Crashed(message=reason), force=True)
        return f"{subject} crashed: {reason}"

    def _how_ended(self, flow_run_id: str) -> str | None:
        """How a run ended, as the rest of a sentence about it; None while it runs (a silent one is set Crashed)."""
        run = self._run(flow_run_id)
        if run is None:
            return "no longer exists"
        state = run.state
        if state is not None and state.is_crashed():
            return f"crashed: {state.message or 'its process ended without a result'}"
        if state is not None and state.is_final():
            detail = f": {state.message}" if state.message else ""
            return f"ended {state.name} without recording the job's outcome{detail}"
        if state is not None and state.is_running() and self._silent(run):
            self.client.set_flow_run_state(run.id, Crashed(message=SILENT_RUN_CRASHED), force=True)
            return f"crashed: {SILENT_RUN_CRASHED}"
        return None

    def schedule_stranded_runs(self, stranded_after_seconds: float) -> list[UUID]:
        """Schedule again the process pool's runs Pending for longer than `stranded_after_seconds`: the pool worker
        that took each stopped before it started the run's process. Return their ids."""
        before = datetime.now(timezone.utc) - timedelta(seconds=stranded_after_seconds)
        pending = self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.PENDING])
            )),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[PROCESS_POOL])),
        )
        stranded = [run for run in pending if run.state is not None and run.state.timestamp < before]
        for run in stranded:
            self.client.set_flow_run_state(run.id, Scheduled(
                message=f"scheduled again: Pending for over {stranded_after_seconds:g} s, its pool worker stopped"
            ), force=True)
            self.logger.warning("flow run %s was left Pending by its pool worker; scheduled again", run.id)
        return [run.id for run in stranded]

    def _silent(self, run: FlowRun) -> bool:
        """Whether a Running run has sent no heartbeat for MISSED_HEARTBEATS_SECONDS (and runs longer than that)."""
        since = datetime.now(timezone.utc) - timedelta(seconds=MISSED_HEARTBEATS_SECONDS)
        if run.start_time is None or run.start_time > since:
            return False
        heartbeats = self.client.read_events(filter=EventFilter(
            occurred=EventOccurredFilter(since=since, until=datetime.now(timezone.utc)),
            event=EventNameFilter(name=[HEARTBEAT_EVENT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"]),
        ), limit=1)
        return not heartbeats.events


@flow(name=RECONCILE_FLOW, persist_result=False, log_prints=False)
def reconcile_flow(database_block: str = DEFAULT_BLOCK,
                   stranded_after_seconds: float = STRANDED_AFTER_SECONDS) -> list[str]:
    """Fail the job records in progress whose holding run has ended, vanished or gone silent, and schedule
    again the process pool's runs that a stopped pool worker left Pending.

    Args:
        database_block: name of the `dcm-database` block.
        stranded_after_seconds: how long a process pool run must have been Pending to be scheduled again.
    """
    records = PlatformRecords(DcmDatabase.resolve(database_block).open())
    with get_client(sync_client=True) as client:
        reconciler = Reconciler(records, client, get_run_logger())
        repaired = reconciler.pass_once()
        rescheduled = reconciler.schedule_stranded_runs(stranded_after_seconds)
    get_run_logger().info("%d job records repaired, %d stranded runs scheduled again", len(repaired), len(rescheduled))
    return repaired
