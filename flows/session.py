"""`dcm-session`: a patient's whole job graph, each job a child `dcm-job` flow run.

The session run checks the graph before anything runs, starts every job as soon as all of its
dependencies have succeeded (independent jobs at the same time, at most `max_parallel_jobs`),
skips the dependents of a failed job, and runs the post-services clean-up last. A retried session
run starts from the records: jobs that are done are not run again.

Where a job runs: a job whose `channel` names a work queue of its pool goes to that queue (the
host that holds its environment), and so does every docker job (its flow runs in a container);
both become deployment runs that a pool worker picks up. Every other job runs as a child flow run in
a thread of the session's own process, which saves the pool worker's hand-off and a Python process per
job; its callback still runs in a child process of its environment, as on a pool worker.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import Task, flow, get_run_logger, runtime, tags
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.context import FlowRunContext, SettingsContext, get_settings_context
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, Settings, get_current_settings
from prefect.states import Cancelled, Cancelling, Failed, State

from blocks.database import DcmDatabase, resolved_once
from flows.job import job_flow
from flows.runtime.environments import Environment, environment_of_job
from flows.runtime.errors import AlreadyClaimed, ClaimLost, DatabaseUnavailable, JobError
from flows.runtime.fast_path import say_if_started_slowly
from flows.runtime.intake import IntakeWatch
from flows.runtime.names import DEFAULT_BLOCK, SESSION_FLOW, JobParameters
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.records import POST_SERVICES_JOB, JobRecord
from flows.runtime.redaction import Redactor
from flows.runtime.session_plan import SessionPlan
from flows.submit import job_run_name, job_tags, submit_job

POLL_SECONDS = 1.0
DEFAULT_MAX_PARALLEL_JOBS = 4
CANCEL_GRACE_SECONDS = 20
PROGRESS_SECONDS = 2.0
WAITING_NOTICE_SECONDS = 20.0
"""A job's run on a pool worker still Scheduled this long after it was created is said, once, to wait for its
queue's worker (the host's worker is down, or its pool or queue paused)."""
ATTEMPT_KEYS = 1_000_000


@dataclass(frozen=True)
class JobRoute:
    """Where one job runs: its environment, and the work queue of its host when it has one."""

    environment: Environment
    queue: str | None

    def in_session(self, allowed: bool) -> bool:
        """Whether the session runs the job's flow in its own process rather than on a pool worker."""
        return allowed and self.queue is None and self.environment.runs_in_session


class QueueRouter:
    """Finds the work queue of a job's host: the queue named by its `channel`, if the pool has one."""

    def __init__(self, client: SyncPrefectClient, records: PlatformRecords) -> None:
        self.client = client
        self.records = records
        self._known: dict[tuple[str, str], bool] = {}

    def route(self, job: JobRecord) -> JobRoute:
        environment = environment_of_job(job, self.records)
        if not job.channel:
            return JobRoute(environment, None)
        key = (environment.work_pool, job.channel)
        if key not in self._known:
            try:
                self.client.read_work_queue_by_name(job.channel, work_pool_name=environment.work_pool)
                self._known[key] = True
            except ObjectNotFound:
                self._known[key] = False
        return JobRoute(environment, job.channel if self._known[key] else None)


def in_session_job_settings() -> Settings:
    """Prefect's settings for the job runs in a session's process: no heartbeats of their own. A job run lives and
    dies with this session's process, whose heartbeat and crash handling (flows/crash.py) cover it; each
    heartbeat is a write to the server's database."""
    return get_current_settings().copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


class JobRunKeys:
    """The keys of a session attempt's child job runs: one of its own for each, in the order they start.

    Prefect files the k-th child flow run of a flow run under a tracking task run keyed k, counted in the flow run's
    context, which the job threads share. Two threads that counted at once got the same key: the second job ran
    under the first one's flow run and claimed its record with that run's id. Here the session's loop, one
    thread, hands each child run a copy of the context in which Prefect's next count is that run's key, so the
    threads start at once. An attempt of a retried session run is handed an earlier attempt's k-th child run when
    that one did not end, and a retried session starts its jobs in another order (the done ones are left out):
    each attempt's keys start past the earlier attempts' (at most ATTEMPT_KEYS children each).
    """

    def __init__(self) -> None:
        context = FlowRunContext.get()
        attempt = context.flow_run.run_count if context is not None and context.flow_run is not None else 1
        self._counted = itertools.count(ATTEMPT_KEYS * (max(attempt, 1) - 1))
        self._tracking = Task(name=job_flow.name, fn=job_flow.fn, version=job_flow.version).task_key

    def next_run(self) -> contextlib.AbstractContextManager[Any]:
        """The context to start the next child run in (outside a flow run, as in tests, nothing to key)."""
        context = FlowRunContext.get()
        if context is None or context.flow_run is None:
            return contextlib.nullcontext()
        counts = {**context.task_run_dynamic_keys, self._tracking: next(self._counted)}
        return context.model_copy(update={"task_run_dynamic_keys": counts})


class SessionJobs:
    """The session's jobs in flight: child flow runs in this process, and deployment runs on pool workers.

    A child run reports its final state from a state hook, the moment the state is set, before Prefect's
    engine has wound the run down.
    """

    def __init__(self, client: SyncPrefectClient, database_block: str, max_parallel_jobs: int) -> None:
        self.client = client
        self.database_block = database_block
        # Twice the slots: a reported run's thread still winds the run down while the next job starts.
        self.threads = ThreadPoolExecutor(max_workers=2 * max_parallel_jobs, thread_name_prefix="dcm-job")
        self.here: set[str] = set()
        self.threads_running: set[Future[State]] = set()
        self.on_pool_workers: dict[UUID, str] = {}
        self._unseen_since: dict[UUID, float] = {}
        """Runs on pool workers not yet found started, and when they were created."""
        self._ended: queue.SimpleQueue[tuple[str, State | str]] = queue.SimpleQueue()
        self._reported: set[str] = set()
        self._lock = threading.Lock()
        self._keys = JobRunKeys()
        self._polled = 0.0
        # Built once: a copy of Prefect's settings costs about 30 ms of CPU, and the jobs share one process.
        self._job_settings = in_session_job_settings()

    def __len__(self) -> int:
        return len(self.here) + len(self.on_pool_workers)

    def _report(self, job_id: str, ending: State | str) -> None:
        with self._lock:
            if job_id in self._reported:
                return
            self._reported.add(job_id)
        self._ended.put((job_id, ending))

    def _run_here(self, job: JobRecord, keyed: contextlib.AbstractContextManager[Any]) -> State:
        """Run the job's flow as a child run in this thread, under the key `keyed` gives it."""

        def on_final_state(flow: Any, flow_run: Any, state: State) -> None:
            self._report(job.id, state)

        hooks = [on_final_state]
        job_run = job_flow.with_options(
            flow_run_name=job_run_name(job.id, job),
            on_completion=hooks, on_failure=hooks, on_cancellation=hooks, on_crashed=hooks,
        )
        settings = SettingsContext(profile=get_settings_context().profile, settings=self._job_settings)
        with keyed, tags(*job_tags(job)), settings:
            return job_run(**JobParameters(job.id, self.database_block).as_parameters(), return_state=True)

    def _thread_ended(self, job_id: str, future: Future[State]) -> None:
        with self._lock:
            self.threads_running.discard(future)
        try:
            self._report(job_id, future.result())
        except Exception as error:
            self._report(job_id, f"its flow run did not start: {type(error).__name__}: {error}")

    def start_here(self, job: JobRecord) -> None:
        self.here.add(job.id)
        future = self.threads.submit(contextvars.copy_context().run, self._run_here, job, self._keys.next_run())
        with self._lock:
            self.threads_running.add(future)
        future.add_done_callback(lambda done: self._thread_ended(job.id, done))

    def start_on_pool_worker(self, job: JobRecord, work_queue: str | None, records: PlatformRecords) -> None:
        flow_run_id = submit_job(job.id, self.database_block, work_queue, records)
        self.on_pool_workers[flow_run_id] = job.id
        self._unseen_since[flow_run_id] = time.monotonic()

    def wait_for_ended(self) -> list[tuple[str, State | str]]:
        """Wait up to a poll interval; return the jobs that ended, each with its final state or why it
        has none (its flow run could not be created)."""
        ended: list[tuple[str, State | str]] = []
        if self.here:
            with contextlib.suppress(queue.Empty):
                ended.append(self._ended.get(timeout=POLL_SECONDS))
                while True:
                    ended.append(self._ended.get_nowait())
            self.here.difference_update(job_id for job_id, _ in ended)
        else:
            time.sleep(POLL_SECONDS)
        if self.on_pool_workers and time.monotonic() - self._polled >= POLL_SECONDS:
            self._polled = time.monotonic()
            runs = self.client.read_flow_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=list(self.on_pool_workers))))
            for flow_run in runs:
                if flow_run.state is not None and flow_run.state.is_final():
                    ended.append((self.on_pool_workers.pop(flow_run.id), flow_run.state))
                self._say_if_waiting(flow_run)
        return ended

    def _say_if_waiting(self, flow_run: FlowRun) -> None:
        """Say once that a job's run waits for its queue's worker, when it has been Scheduled too long."""
        since = self._unseen_since.get(flow_run.id)
        if since is None:
            return
        if flow_run.state is None or not flow_run.state.is_scheduled():
            del self._unseen_since[flow_run.id]
        elif time.monotonic() - since >= WAITING_NOTICE_SECONDS:
            del self._unseen_since[flow_run.id]
            get_run_logger().warning(
                "job %s waits on work queue '%s' of pool '%s': no worker has taken its run %s for %.0f s (is that "
                "host's worker running? `dcm-flows doctor` there)", self.on_pool_workers.get(flow_run.id),
                flow_run.work_queue_name, flow_run.work_pool_name, flow_run.name, time.monotonic() - since,
            )

    def cancel(self, session_run_id: UUID) -> None:
        """Ask every running child run to stop (each records its job as cancelled), then give the
        ones in this process a moment to do so."""
        for child in unfinished_job_runs(self.client, session_run_id):
            self.client.set_flow_run_state(child.id, Cancelling(message="its session ended"), force=True)
        with self._lock:
            still_running = list(self.threads_running)
        wait(still_running, timeout=CANCEL_GRACE_SECONDS)
        self.threads.shutdown(wait=False, cancel_futures=True)


class HeldElsewhere:
    """Jobs whose child run found them held by another live run (the bridge raced a mongo-qas worker, a
    resubmitted session met its docker jobs still running): the run ended `Duplicate`, and the session
    waits for the holder's outcome in the records instead of taking the job for failed."""

    def __init__(self, records: PlatformRecords) -> None:
        self.records = records
        self.jobs: set[str] = set()

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, job_id: str) -> None:
        self.jobs.add(job_id)

    def settled(self) -> list[JobRecord]:
        """The records of the jobs whose holder has written their outcome; they are no longer watched."""
        settled = [record for record in map(self.records.job, sorted(self.jobs)) if not record.in_progress]
        self.jobs.difference_update(record.id for record in settled)
        return settled


def unfinished_job_runs(client: SyncPrefectClient, session_run_id: UUID) -> list[FlowRun]:
    """The child runs of a session run that have not ended (scheduled, pending or running)."""
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[session_run_id]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[
            StateType.PENDING, StateType.RUNNING, StateType.SCHEDULED
        ])),
    ))


def left_behind(job_run: FlowRun, session_run: FlowRun) -> bool:
    """Whether a job run that ran in its session's process can no longer end on its own: the attempt of the
    session run whose process ran it is over. The session run has ended, or waits to run again, or runs again
    since after the job run was created: an operator's retry keeps the run's id, and a later attempt does
    not know the job runs of an earlier one."""
    state = session_run.state
    if state is None:
        return False
    if state.is_final() or state.type in (StateType.SCHEDULED, StateType.PENDING):
        return True
    return state.is_running() and job_run.created is not None and job_run.created < state.timestamp


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
    """Note a failed job and skip its dependents, saying in their records which job failed. The reason may quote
    what the job's callback said (a record's errorMessage): the session's log gets it redacted."""
    logger = get_run_logger()
    redact = Redactor.for_job(plan.jobs[job_id].kwargs, records.database.dburl)
    logger.warning("job %s (%s) did not succeed: %s", job_id, plan.jobs[job_id].label, redact(reason))
    records.mark_failed_unless_recorded(
        job_id, str(flow_run_id), f"the job's flow run ended without recording an outcome: {reason}"
    )
    for skipped in plan.failed_job(job_id, reason):
        records.mark_skipped(skipped, plan.reasons[skipped])
        logger.warning("job %s (%s) %s", skipped, plan.jobs[skipped].label, plan.reasons[skipped])


class SessionProgress:
    """A progress artifact of the session run (the share of its jobs that ended).

    Updated at most every PROGRESS_SECONDS, and once at the end: each update is a write to the
    Prefect server's database, which the job runs of a large session compete for.
    """

    def __init__(self, plan: SessionPlan) -> None:
        self.plan = plan
        self.shown = plan.percent_finished()
        self.artifact_id = create_progress_artifact(self.shown, description="jobs of the session that ended")
        self.updated = time.monotonic()

    def update(self, final: bool = False) -> None:
        percent = self.plan.percent_finished()
        if percent == self.shown or (not final and time.monotonic() - self.updated < PROGRESS_SECONDS):
            return
        update_progress_artifact(self.artifact_id, percent)
        self.shown = percent
        self.updated = time.monotonic()


@flow(name=SESSION_FLOW, persist_result=False, log_prints=False)
def session_flow(
    session_id: str,
    database_block: str = DEFAULT_BLOCK,
    max_parallel_jobs: int = DEFAULT_MAX_PARALLEL_JOBS,
    keep_failed_session_data: bool = False,
    jobs_in_session: bool = True,
) -> Any:
    """Run every job of a platform session in dependency order.

    Args:
        session_id: the `_id` of the session the platform's scheduler created.
        database_block: name of the `dcm-database` block.
        max_parallel_jobs: how many job runs may be in flight at once.
        keep_failed_session_data: when a job failed, do not run the post-services clean-up, so the
            session's data and DICOM files stay for debugging.
        jobs_in_session: run jobs that no work queue claims as child flow runs in this session's
            process; False hands every job to a pool worker as a deployment run.
    """
    with resolved_once():
        return _run_session(session_id, database_block, max_parallel_jobs, keep_failed_session_data, jobs_in_session)


def _run_session(
    session_id: str, database_block: str, max_parallel_jobs: int, keep_failed_session_data: bool,
    jobs_in_session: bool,
) -> Any:
    logger = get_run_logger()
    say_if_started_slowly(logger)
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
    progress = SessionProgress(plan)
    with get_client(sync_client=True) as client:
        session = SessionRun(session_id, plan, records, client, database_block, max(1, max_parallel_jobs),
                             jobs_in_session)
        try:
            while session.start_ready():
                progress.update()
                session.settle_ended()
        except BaseException:
            with contextlib.suppress(Exception):
                session.in_flight.cancel(runtime.flow_run.id)
            raise
    progress.update(final=True)
    publish_job_graph(plan, records, session_id)
    for job_id in plan.withheld_clean_up():
        logger.warning("post-services job %s not run: the failed session's data is kept for debugging", job_id)
    failed = plan.failed()
    if failed:
        names = ", ".join(f"{plan.jobs[job_id].label} ({job_id})" for job_id in failed)
        return Failed(message=f"session {session_id}: failed jobs: {names}; skipped: {len(plan.skipped())}")
    return {"session_id": session_id, "jobs": len(plan.jobs)}


def publish_job_graph(plan: SessionPlan, records: PlatformRecords, session_id: str) -> None:
    """The session's job graph as a markdown artifact of its run: what ran, failed or was skipped, and what each
    failure blocked. Durations come from the records; a database that cannot be read now only leaves them out."""
    try:
        seconds = {job.id: job.seconds for job in records.progress_of_session(session_id)}
    except DatabaseUnavailable:
        seconds = {}
    create_markdown_artifact(plan.as_markdown(seconds), description="the session's jobs: state, duration, graph")


class SessionRun:
    """The loop of one session run: start what is ready, then settle what ended, until nothing is left."""

    def __init__(self, session_id: str, plan: SessionPlan, records: PlatformRecords, client: SyncPrefectClient,
                 database_block: str, max_parallel_jobs: int, jobs_in_session: bool) -> None:
        self.session_id = session_id
        self.plan = plan
        self.records = records
        self.router = QueueRouter(client, records)
        self.in_flight = SessionJobs(client, database_block, max_parallel_jobs)
        self.held_elsewhere = HeldElsewhere(records)
        self.max_parallel_jobs = max_parallel_jobs
        self.jobs_in_session = jobs_in_session
        self.intake = IntakeWatch(client)
        self.said_paused = False

    def start_ready(self) -> bool:
        """Start the jobs that are ready, as many as the free slots allow; False once nothing is left to wait for.

        The post-services job deletes the session's data, so it does not start while any other job of the
        session is in progress anywhere (a job held by another run, a mongo-qas worker's).
        """
        if self.intake.paused():
            if not self.said_paused:
                get_run_logger().warning("intake is paused (dcm-flows resume): running jobs finish, none starts")
            self.said_paused = True
            return bool(len(self.in_flight) or self.held_elsewhere or self.plan.ready())
        self.said_paused = False
        clean_up_waits = False
        for job_id in self.plan.ready()[: self.max_parallel_jobs - len(self.in_flight)]:
            job = self.plan.jobs[job_id]
            if job.function_name == POST_SERVICES_JOB and self.records.jobs_in_progress(self.session_id, job_id):
                clean_up_waits = True
                continue
            try:
                route = self.router.route(job)
                if route.in_session(self.jobs_in_session):
                    self.in_flight.start_here(job)
                else:
                    self.in_flight.start_on_pool_worker(job, route.queue, self.records)
            except JobError as error:
                _record_failure(self.plan, self.records, job_id, str(error))
                continue
            self.plan.started(job_id)
        return bool(len(self.in_flight) or self.held_elsewhere or clean_up_waits)

    def settle_ended(self) -> None:
        """Wait up to a poll interval, then note every job that ended: succeeded, failed (its dependents are
        skipped), or held by another run, whose outcome the session then waits for."""
        for job_id, ending in self.in_flight.wait_for_ended():
            if isinstance(ending, State) and ending.name in (AlreadyClaimed.state_name, ClaimLost.state_name):
                self.held_elsewhere.add(job_id)
            elif isinstance(ending, State) and ending.is_completed():
                self.plan.succeeded(job_id)
            else:
                reason = _state_summary(ending) if isinstance(ending, State) else ending
                _record_failure(self.plan, self.records, job_id, reason, _flow_run_of(ending))
        for record in self.held_elsewhere.settled():
            if record.done:
                self.plan.succeeded(record.id)
            else:
                reason = f"the run that held it recorded: {record.error_message}"
                _record_failure(self.plan, self.records, record.id, reason)


def _flow_run_of(ending: State | str) -> UUID | None:
    return ending.state_details.flow_run_id if isinstance(ending, State) else None
