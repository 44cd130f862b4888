"""`dcm-session`: a patient's whole job graph, each job a child `dcm-job` flow run.

The session run checks the graph before anything runs, starts every job as soon as all of its
dependencies have succeeded (independent jobs at the same time, at most `max_parallel_jobs`),
routes each to the pool of its worker type and to the work queue named by the job's `channel` when
that queue exists, skips the dependents of a failed job, and runs the post-services clean-up last.
A retried session run starts from the records: jobs that are done are not run again.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Failed, State

from blocks.database import DcmDatabase
from flows.runtime.errors import AlreadyClaimed, JobError
from flows.runtime.records import JobRecord, PlatformRecords
from flows.runtime.session_plan import SessionPlan
from flows.submit import DEFAULT_DATABASE_BLOCK, job_worker_type, submit_job

POLL_SECONDS = 1.0
DEFAULT_MAX_PARALLEL_JOBS = 4


class QueueRouter:
    """Finds the work queue of a job's host: the queue named by its `channel`, if the pool has one."""

    def __init__(self, client: SyncPrefectClient, records: PlatformRecords) -> None:
        self.client = client
        self.records = records
        self._known: dict[tuple[str, str], bool] = {}

    def queue_for(self, job: JobRecord) -> str | None:
        if not job.channel:
            return None
        pool = job_worker_type(job, self.records).work_pool
        key = (pool, job.channel)
        if key not in self._known:
            try:
                self.client.read_work_queue_by_name(job.channel, work_pool_name=pool)
                self._known[key] = True
            except ObjectNotFound:
                self._known[key] = False
        return job.channel if self._known[key] else None


def _final_runs(client: SyncPrefectClient, flow_run_ids: list[UUID]) -> list[Any]:
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
    return [run for run in runs if run.state is not None and run.state.is_final()]


def _run_has_ended(client: SyncPrefectClient, flow_run_id: str) -> bool:
    """Whether the run holding a session is over (or unknown to this Prefect server)."""
    try:
        state = client.read_flow_run(UUID(flow_run_id)).state
    except (ObjectNotFound, ValueError):
        return True
    return state is None or state.is_final()


def _state_summary(state: State) -> str:
    """A final state as one line: its name, and its message when it has one."""
    return f"{state.name}: {state.message}" if state.message else state.name


def _record_failure(
    plan: SessionPlan, records: PlatformRecords, job_id: str, reason: str, flow_run_id: UUID | None = None
) -> None:
    """Note a failed job and skip its dependents, saying in their records which job failed."""
    logger = get_run_logger()
    logger.warning("job %s (%s) did not succeed: %s", job_id, plan.jobs[job_id].label, reason)
    records.mark_failed_unless_recorded(
        job_id, str(flow_run_id), f"the job's flow run ended without recording an outcome: {reason}"
    )
    for skipped in plan.failed_job(job_id, reason):
        records.mark_skipped(skipped, plan.reasons[skipped])
        logger.warning("job %s (%s) %s", skipped, plan.jobs[skipped].label, plan.reasons[skipped])


class SessionProgress:
    """A progress artifact of the session run (the share of its jobs that ended), updated on change."""

    def __init__(self, plan: SessionPlan) -> None:
        self.plan = plan
        self.shown = plan.percent_finished()
        self.artifact_id = create_progress_artifact(self.shown, description="jobs of the session that ended")

    def update(self) -> None:
        percent = self.plan.percent_finished()
        if percent != self.shown:
            update_progress_artifact(self.artifact_id, percent)
            self.shown = percent


@flow(name="dcm-session", persist_result=False, log_prints=False)
def session_flow(
    session_id: str,
    database_block: str = DEFAULT_DATABASE_BLOCK,
    max_parallel_jobs: int = DEFAULT_MAX_PARALLEL_JOBS,
    keep_failed_session_data: bool = False,
) -> Any:
    """Run every job of a platform session in dependency order.

    Args:
        session_id: the `_id` of the session the platform's scheduler created.
        database_block: name of the `dcm-database` block.
        max_parallel_jobs: how many job runs may be in flight at once.
        keep_failed_session_data: when a job failed, do not run the post-services clean-up, so the
            session's data and DICOM files stay for debugging.
    """
    logger = get_run_logger()
    records = PlatformRecords(DcmDatabase.resolve(database_block).open())
    try:
        with get_client(sync_client=True) as client:
            records.claim_session(session_id, str(runtime.flow_run.id), lambda holder: _run_has_ended(client, holder))
    except AlreadyClaimed as duplicate:
        logger.warning("%s; this run does nothing", duplicate)
        return Cancelled(name=AlreadyClaimed.state_name, message=str(duplicate))
    plan = SessionPlan.of(records.session_jobs(session_id), keep_failed_session_data)
    already_done = sum(1 for job in plan.jobs.values() if job.done)
    logger.info("session %s: %d jobs, %d already done", session_id, len(plan.jobs), already_done)
    in_flight: dict[UUID, str] = {}
    progress = SessionProgress(plan)
    with get_client(sync_client=True) as client:
        router = QueueRouter(client, records)
        while True:
            for job_id in plan.ready()[: max(1, max_parallel_jobs) - len(in_flight)]:
                try:
                    flow_run_id = submit_job(job_id, database_block, router.queue_for(plan.jobs[job_id]), records)
                except JobError as error:
                    _record_failure(plan, records, job_id, str(error))
                    continue
                plan.started(job_id)
                in_flight[flow_run_id] = job_id
            progress.update()
            if not in_flight:
                break
            time.sleep(POLL_SECONDS)
            for flow_run in _final_runs(client, list(in_flight)):
                job_id = in_flight.pop(flow_run.id)
                if flow_run.state.is_completed():
                    plan.succeeded(job_id)
                    continue
                _record_failure(plan, records, job_id, _state_summary(flow_run.state), flow_run.id)
    for job_id in plan.withheld_clean_up():
        logger.warning("post-services job %s not run: the failed session's data is kept for debugging", job_id)
    failed = plan.failed()
    if failed:
        names = ", ".join(f"{plan.jobs[job_id].label} ({job_id})" for job_id in failed)
        return Failed(message=f"session {session_id}: failed jobs: {names}; skipped: {len(plan.skipped())}")
    return {"session_id": session_id, "jobs": len(plan.jobs)}
