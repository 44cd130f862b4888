"""Chaos: patients' sessions run while a seeded schedule kills and stops the stack's parts at random moments;
the operator recovers as docs/operating.md says (retry the session runs that failed), and the bench counts
what went wrong.

`make chaos` runs 3 sessions of 20 jobs on an embedded stack of its own. Each callback notes that it started
(its job id and pid), takes 0.5-3 s, and appends its job id to a side-effect log as its last act, so a job
whose callback ran to the end twice shows up twice there. Meanwhile each of six faults strikes twice, each at
a random moment of the first two minutes: the process pool worker and the warm engine are SIGKILLed (a
supervisor thread starts them again 3 s after it finds them gone, as systemd's Restart= would), a session's
flow-run process and a running
callback are SIGKILLed, and SecantusDB and the Prefect server are stopped for 5-150 s. An operator thread
retries every session run that ended other than Completed, as soon as the API answers.

Counted, each with 0 as its goal: callbacks that ran to the end twice, records done whose callback never
finished, records still in progress (held by a run that has ended or vanished) after the reconciler's first
pass once the last fault is over, callback processes left running, job folders and containers left behind;
and the minutes from the end of the last fault to a consistent state (every session completed, no record
in progress), whose goal is under 3. `--small` is the version CI runs (tests/test_chaos.py): 2 sessions of
5 jobs, each fault once, outages of 5-10 s.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterName,
    FlowRunFilterStartTime,
)
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectNotFound
from prefect.states import Scheduled

from bench.components import service_component
from bench.load import write_benchmarks
from bench.overhead import fresh_stack
from blocks.database import DcmDatabase
from flows.runtime.components import register_service
from flows.runtime.names import DEFAULT_BLOCK, RECONCILE_FLOW
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.process import send_signal
from flows.runtime.records import JobRecord
from flows.submit import submit_session
from ops.demo import schedule_stable_patient, upload_example_patient
from ops.pool_workers import FLOW_RUN_LABEL
from ops.stack import LocalStack, StackState, docker_engine_answers, process_alive

SERVICE = "chaos-work"
JOB_VARIABLE = "DCM-PROCESSOR-SERVICE-JOB-ID"
CHAOS_SERVICE = '''
import hashlib
import os
import time


def work(session_id, job_name, headers, params, added_params, **kwargs):
    job_id = os.environ["DCM-PROCESSOR-SERVICE-JOB-ID"]
    with open(params["starts"], "a") as starts:
        starts.write(f"{job_id} {os.getpid()} {time.time():.1f}\\n")
    low, high = params["seconds"]
    share = int(hashlib.sha256(job_id.encode()).hexdigest(), 16) % 1000 / 999
    time.sleep(low + (high - low) * share)
    with open(params["side_effects"], "a") as side_effects:
        side_effects.write(f"{job_id} {os.getpid()} {time.time():.1f}\\n")
    return 1
'''
RESTARTED_SERVICES = ("pool worker", "warm engine")
STOPPED_SERVICES = ("database", "prefect server")
KILLED_RUN_PROCESSES = ("session process", "callback")
FAULT_KINDS = (*RESTARTED_SERVICES, *KILLED_RUN_PROCESSES, *STOPPED_SERVICES)
RESTART_SECONDS = 3.0
SUPERVISED = ("process-worker", "warm-engine")
TARGET_WAIT_SECONDS = 600.0
OPERATOR_POLL_SECONDS = 3.0
CHECK_SECONDS = 2.0
CONSISTENT_GOAL_SECONDS = 180.0
GIVE_UP_SECONDS = 900.0


@dataclass(frozen=True)
class ChaosSize:
    """How much work, and how many faults over how long."""

    sessions: int
    series: int
    callback_seconds: tuple[float, float]
    faults_of_each_kind: int
    outage_seconds: tuple[float, float]
    window_seconds: float
    """Each fault strikes at a random moment this long after the sessions were submitted."""
    kills_within_seconds: float
    """The kills of a running callback and of its session's process strike this early, while work surely runs
    (the small size's work can be over before its window is)."""


FULL = ChaosSize(sessions=3, series=20, callback_seconds=(0.5, 3.0), faults_of_each_kind=2,
                 outage_seconds=(5.0, 150.0), window_seconds=120.0, kills_within_seconds=60.0)
SMALL = ChaosSize(sessions=2, series=5, callback_seconds=(1.0, 3.0), faults_of_each_kind=1,
                  outage_seconds=(5.0, 10.0), window_seconds=30.0, kills_within_seconds=6.0)
"""CI's size (tests/test_chaos.py, seed 3). The small sessions' work is over in about 10 s, so the kills of a
callback and of its session's process strike in the first 6 s, while callbacks of 1-3 s surely run."""


@dataclass
class Fault:
    """One fault of the schedule, and what it hit."""

    kind: str
    at_seconds: float
    down_seconds: float
    """How long a stopped service stays down; 0 for the killed processes."""
    target: str = ""
    restored_at: float | None = None


def schedule(size: ChaosSize, seed: int) -> list[Fault]:
    """The seeded fault schedule: each kind `faults_of_each_kind` times, in the order they strike. The kills of
    a session's process and of a callback fall in its first `kills_within_seconds`, while work surely runs."""
    chance = random.Random(seed)
    faults = []
    for kind in FAULT_KINDS:
        for _ in range(size.faults_of_each_kind):
            down = chance.uniform(*size.outage_seconds) if kind in STOPPED_SERVICES else 0.0
            latest = size.kills_within_seconds if kind in KILLED_RUN_PROCESSES else size.window_seconds
            faults.append(Fault(kind, round(chance.uniform(0, latest), 1), round(down, 1)))
    return sorted(faults, key=lambda fault: fault.at_seconds)


@dataclass(frozen=True)
class ChaosReport:
    seed: int
    sessions: int
    jobs: int
    faults: list[Fault]
    faults_without_target: int
    operator_retries: int
    sessions_completed: int
    jobs_not_done: int
    callbacks_run_twice: int
    done_without_callback: int
    in_progress_after_reconciler_pass: int
    orphan_processes: int
    leftover_job_folders: int
    leftover_containers: int
    seconds_to_consistent: float | None
    wall_seconds: float
    twice: dict[str, list[str]]
    """For each job whose callback ran to its end twice: its callbacks and its flow runs' states, in seconds
    after the sessions were submitted (ids only), to tell how it came about."""
    not_done: dict[str, list[str]]
    """The same for each job not done at the end, after its record's state, and for each session run that did
    not complete (its states)."""

    @property
    def healthy(self) -> bool:
        counts = (self.jobs_not_done, self.callbacks_run_twice, self.done_without_callback,
                  self.in_progress_after_reconciler_pass, self.orphan_processes, self.leftover_job_folders,
                  self.leftover_containers)
        return (not any(counts) and self.sessions_completed == self.sessions
                and self.seconds_to_consistent is not None and self.seconds_to_consistent < CONSISTENT_GOAL_SECONDS)


class CallbackLog:
    """The two files the chaos service writes: who started (job id and pid), and whose side effect landed."""

    def __init__(self, folder: Path) -> None:
        self.starts = folder / "starts"
        self.side_effects = folder / "side-effects"

    @staticmethod
    def _entries(log: Path) -> list[tuple[str, int, float]]:
        """(job id, pid, Unix time) of each whole line of a log."""
        lines = log.read_text().splitlines() if log.exists() else []
        return [(job_id, int(pid), float(moment))
                for job_id, pid, moment in (line.split() for line in lines if line.count(" ") == 2)]

    def started(self) -> list[tuple[str, int, float]]:
        return self._entries(self.starts)

    def finished(self) -> list[tuple[str, int, float]]:
        return self._entries(self.side_effects)

    def running_callbacks(self) -> list[int]:
        return [pid for _, pid, _ in self.started() if process_alive(pid)]

    def completions(self) -> Counter[str]:
        return Counter(job_id for job_id, _, _ in self.finished())


class FaultInjector:
    """Strikes the schedule's faults on the stack, each from a thread of its own at its moment."""

    def __init__(self, stack: LocalStack, state: StackState, callbacks: CallbackLog, began: float,
                 seed: int, work_left: Callable[[], bool]) -> None:
        self.stack = stack
        self.work_left = work_left
        self.chance = random.Random(seed)
        self.state = state
        self.callbacks = callbacks
        self.began = began
        self.stack_lock = threading.Lock()
        self.outages: Counter[str] = Counter()
        self.actions: dict[str, Callable[[Fault], None]] = {
            "pool worker": lambda fault: self._kill(fault, "process-worker"),
            "warm engine": lambda fault: self._kill(fault, "warm-engine"),
            "session process": self._kill_session_process,
            "callback": self._kill_callback,
            "database": lambda fault: self._stop_for_a_while(fault, stack.stop_database, stack.start_database),
            "prefect server": lambda fault: self._stop_for_a_while(fault, stack.stop_server, stack.start_server),
        }

    def strike(self, faults: list[Fault]) -> None:
        """Strike every fault at its moment; return once every stopped service is back."""
        threads = [in_a_thread(functools.partial(self._strike_at, fault)) for fault in faults]
        for thread in threads:
            thread.join()

    def _strike_at(self, fault: Fault) -> None:
        time.sleep(max(0.0, self.began + fault.at_seconds - time.monotonic()))
        try:
            self.actions[fault.kind](fault)
        finally:
            fault.restored_at = round(time.monotonic() - self.began, 1)
        print(f"  {fault.restored_at:7.1f} s  {fault.kind}: {fault.target}", flush=True)

    def _kill(self, fault: Fault, name: str) -> None:
        """SIGKILL a supervised process; one that is down (killed a moment before) is waited for until it is back."""

        def kill_it() -> int | None:
            with self.stack_lock:
                pid = self.state.processes[name] if self.state.is_ours(name) else None
                return pid if pid is not None and send_signal(pid, signal.SIGKILL) else None

        killed = self._first_found(kill_it)
        if killed is not None:
            fault.target = f"pid {killed} SIGKILLed"

    def _stop_for_a_while(self, fault: Fault, stop: Callable[[StackState], None],
                          start: Callable[[StackState], None]) -> None:
        """Stop the service for the fault's time; two outages of one service that overlap make one longer one."""
        with self.stack_lock:
            self.outages[fault.kind] += 1
            if self.outages[fault.kind] == 1:
                stop(self.state)
        fault.target = f"stopped for {fault.down_seconds} s"
        time.sleep(fault.down_seconds)
        with self.stack_lock:
            self.outages[fault.kind] -= 1
            if self.outages[fault.kind] == 0:
                start(self.state)

    def _kill_callback(self, fault: Fault) -> None:
        pid = self._a_running_callback()
        if pid is not None and send_signal(pid, signal.SIGKILL):
            fault.target = f"callback pid {pid} SIGKILLed"

    def _kill_session_process(self, fault: Fault) -> None:
        """The session's flow-run process is the parent of a callback of a job that runs in the session."""
        pid = self._a_running_callback()
        session_process = _parent_of(pid) if pid is not None else None
        if session_process is not None and session_process not in self.state.processes.values():
            send_signal(session_process, signal.SIGKILL)
            fault.target = f"session process pid {session_process} SIGKILLed"

    def _a_running_callback(self) -> int | None:
        """A callback running now, or at the first moment one runs (none does while the database is down);
        None once no work is left."""
        return self._first_found(
            lambda: self.chance.choice(running) if (running := self.callbacks.running_callbacks()) else None
        )

    def _first_found(self, find: Callable[[], int | None]) -> int | None:
        """What `find` finds, asked every half second until it finds something, no work is left, or
        TARGET_WAIT_SECONDS have passed (then None)."""
        deadline = time.monotonic() + TARGET_WAIT_SECONDS
        while time.monotonic() < deadline and self.work_left():
            found = find()
            if found is not None:
                return found
            time.sleep(0.5)
        return None


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def in_a_thread(target: Callable[[], None]) -> threading.Thread:
    """Run `target` in a new thread that sees this one's Prefect settings (the stack's API): a bare thread
    would see the settings of import time, and Prefect would start a temporary server of its own for it."""
    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,), daemon=True)
    thread.start()
    return thread


class Supervisor:
    """Starts the stack's workers and warm engine again a few seconds after it finds one gone, as a service
    manager does (a worker started while the Prefect server is down exits, and is started again later)."""

    def __init__(self, stack: LocalStack, state: StackState, stack_lock: threading.Lock) -> None:
        self.stack = stack
        self.state = state
        self.stack_lock = stack_lock
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            if all(self.state.is_ours(name) for name in SUPERVISED):
                continue
            if self.stopped.wait(RESTART_SECONDS):
                return
            with self.stack_lock, contextlib.suppress(Exception):
                self.stack.start_workers(self.state)


class Operator:
    """Retries each session run that ended other than Completed, as docs/operating.md tells an operator to."""

    def __init__(self, session_runs: list[UUID]) -> None:
        self.session_runs = session_runs
        self.retries = 0
        self.completed: set[UUID] = set()
        self.stopped = threading.Event()

    def work_left(self) -> bool:
        return len(self.completed) < len(self.session_runs)

    def run(self) -> None:
        while not self.stopped.wait(OPERATOR_POLL_SECONDS):
            with contextlib.suppress(Exception):  # the API is down: look again at the next round
                self._retry_what_failed()

    def _retry_what_failed(self) -> None:
        with get_client(sync_client=True) as client:
            for run_id in self.session_runs:
                state = client.read_flow_run(run_id).state
                if state is None or not state.is_final():
                    continue
                if state.is_completed():
                    self.completed.add(run_id)
                else:
                    client.set_flow_run_state(run_id, Scheduled(), force=True)
                    self.retries += 1


class Inspector:
    """Reads what the platform and the machine hold about the chaos sessions' jobs."""

    def __init__(self, records: PlatformRecords, session_ids: list[str], callbacks: CallbackLog) -> None:
        self.records = records
        self.session_ids = session_ids
        self.callbacks = callbacks

    def jobs(self) -> list[JobRecord]:
        return [job for session_id in self.session_ids for job in self.records.session_jobs(session_id)]

    def stuck_records(self) -> int:
        """Records in progress whose holding flow run has ended or is gone: nothing will ever write them."""
        held = [(job_id, run_id) for job_id, run_id, session_id in self.records.jobs_held_by_runs()
                if session_id in self.session_ids]
        stuck = 0
        with get_client(sync_client=True) as client:
            for _, run_id in held:
                try:
                    state = client.read_flow_run(UUID(run_id)).state
                except ObjectNotFound:
                    stuck += 1
                    continue
                stuck += state is not None and state.is_final()
        return stuck

    def orphan_processes(self) -> int:
        """Live processes started for a chaos job (their environment names its job id)."""
        job_ids = {job.id for job in self.jobs()}
        found = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or not process_alive(int(entry.name)):
                continue
            try:
                variables = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            found += any(variable.split(b"=", 1)[-1].decode(errors="replace") in job_ids
                         for variable in variables if variable.startswith(JOB_VARIABLE.encode() + b"="))
        return found

    def leftover_job_folders(self) -> int:
        temporary = Path(tempfile.gettempdir())
        return sum(len(list(temporary.glob(f"dcm-job-{job.id}-*"))) for job in self.jobs())


def leftover_containers() -> int:
    """Containers still on the Docker engine of flow runs of this stack's server (other stacks' are not counted)."""
    if not docker_engine_answers():
        return 0
    listing = subprocess.run(["docker", "ps", "-a", "--filter", f"label={FLOW_RUN_LABEL}",
                              "--format", f'{{{{.Label "{FLOW_RUN_LABEL}"}}}}'],
                             capture_output=True, text=True, check=False).stdout
    found = 0
    with get_client(sync_client=True) as client:
        for flow_run_id in listing.split():
            with contextlib.suppress(ObjectNotFound, ValueError):
                client.read_flow_run(UUID(flow_run_id))
                found += 1
    return found


def timeline_of(job_id: str, callbacks: CallbackLog, began_at: float) -> list[str]:
    """What happened to one job: its callbacks' starts and ends, and each state of each of its flow runs."""
    events = [(moment, f"callback pid {pid} started") for job, pid, moment in callbacks.started() if job == job_id]
    events += [(moment, f"callback pid {pid} ran to its end") for job, pid, moment in callbacks.finished()
               if job == job_id]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=job_id)))
    return as_timeline(events + states_of(runs), began_at)


def as_timeline(events: list[tuple[float, str]], began_at: float) -> list[str]:
    """`events` (Unix time, what) in order, each in seconds after `began_at`."""
    return [f"{moment - began_at:7.1f} s  {what}" for moment, what in sorted(events)]


def states_of(runs: list[FlowRun]) -> list[tuple[float, str]]:
    """Each state each of `runs` went through: (Unix time, what)."""
    events = []
    with get_client(sync_client=True) as client:
        for run in runs:
            for state in client.read_flow_run_states(run.id):
                events.append((state.timestamp.timestamp(),
                               f"run {run.id}: {state.name}: {(state.message or '')[:300]}"))
    return events


def what_is_not_done(jobs: list[JobRecord], session_runs: list[UUID], completed: set[UUID],
                     callbacks: CallbackLog, began_at: float) -> dict[str, list[str]]:
    """The record and timeline of each job not done, and the states of each session run not completed."""
    found = {
        job.id: [f"record: in progress {job.in_progress}, failed {job.failed}, {(job.error_message or '')[:300]}",
                 *timeline_of(job.id, callbacks, began_at)]
        for job in jobs if not job.done
    }
    with get_client(sync_client=True) as client:
        unfinished = [client.read_flow_run(run_id) for run_id in session_runs if run_id not in completed]
    for run in unfinished:
        found[f"session run {run.id}"] = as_timeline(states_of([run]), began_at)
    return found


def reconciler_pass_after(moment: datetime) -> bool:
    """Whether a `dcm-reconcile` run that started after `moment` has completed."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[RECONCILE_FLOW])),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=moment)),
        )
    return any(run.state is not None and run.state.is_completed() for run in runs)


def run_chaos(stack: LocalStack, state: StackState, database: DcmDatabase, size: ChaosSize, seed: int,
              folder: Path) -> ChaosReport:
    """Run the sessions through the fault schedule and the operator's recovery; count what went wrong."""
    records = PlatformRecords(database.open())
    callbacks = CallbackLog(folder)
    register_service(records, service_component(folder / "component", SERVICE, CHAOS_SERVICE, [{
        "jobName": "work", "workerEntry": "work", "events": ["stable-series"],
        "params": {"starts": str(callbacks.starts), "side_effects": str(callbacks.side_effects),
                   "seconds": list(size.callback_seconds)},
    }]))
    session_ids = []
    for number in range(size.sessions):
        upload_example_patient(database, patient_id=f"CHAOS-{seed}-{number}", series=size.series, instances=1)
        session_ids.append(schedule_stable_patient(database, records))
    inspector = Inspector(records, session_ids, callbacks)
    faults = schedule(size, seed)
    began, began_at = time.monotonic(), time.time()
    operator = Operator([submit_session(session_id) for session_id in session_ids])
    injector = FaultInjector(stack, state, callbacks, began, seed, work_left=operator.work_left)
    supervisor = Supervisor(stack, state, injector.stack_lock)
    helpers = {operator.stopped: in_a_thread(operator.run), supervisor.stopped: in_a_thread(supervisor.run)}
    injector.strike(faults)
    calm_since = time.monotonic()
    calm_since_utc = datetime.now(timezone.utc)
    print(f"  faults over after {calm_since - began:.0f} s; waiting for a consistent state", flush=True)
    stuck_after_pass: int | None = None
    consistent: float | None = None
    while time.monotonic() - calm_since < GIVE_UP_SECONDS and (consistent is None or stuck_after_pass is None):
        time.sleep(CHECK_SECONDS)
        with contextlib.suppress(Exception):  # a record or run that cannot be read now is read at the next round
            if stuck_after_pass is None and reconciler_pass_after(calm_since_utc):
                stuck_after_pass = inspector.stuck_records()
            if (consistent is None and len(operator.completed) == len(operator.session_runs)
                    and not any(job.in_progress for job in inspector.jobs())):
                consistent = time.monotonic() - calm_since
    for stopped, thread in helpers.items():
        stopped.set()
        thread.join()
    jobs = inspector.jobs()
    completions = callbacks.completions()
    return ChaosReport(
        seed=seed,
        sessions=size.sessions,
        jobs=len(jobs),
        faults=faults,
        faults_without_target=sum(1 for fault in faults if not fault.target),
        operator_retries=operator.retries,
        sessions_completed=len(operator.completed),
        jobs_not_done=sum(1 for job in jobs if not job.done),
        callbacks_run_twice=sum(1 for count in completions.values() if count > 1),
        done_without_callback=sum(1 for job in jobs if job.done and job.service_name == SERVICE
                                  and job.id not in completions),
        in_progress_after_reconciler_pass=stuck_after_pass if stuck_after_pass is not None else -1,
        orphan_processes=inspector.orphan_processes(),
        leftover_job_folders=inspector.leftover_job_folders(),
        leftover_containers=leftover_containers(),
        seconds_to_consistent=round(consistent, 1) if consistent is not None else None,
        wall_seconds=round(time.monotonic() - began, 1),
        twice={job_id: timeline_of(job_id, callbacks, began_at)
               for job_id, count in completions.items() if count > 1},
        not_done=what_is_not_done(jobs, operator.session_runs, operator.completed, callbacks, began_at),
    )


def markdown(report: ChaosReport, size: ChaosSize) -> str:
    faults = Counter(fault.kind for fault in report.faults if fault.target)
    outages = [fault.down_seconds for fault in report.faults if fault.kind in STOPPED_SERVICES]
    consistent = (f"{report.seconds_to_consistent / 60:.1f} min" if report.seconds_to_consistent is not None
                  else f"not within {GIVE_UP_SECONDS / 60:.0f} min")
    rows = [
        ("sessions x jobs (with pre- and post-services)", f"{report.sessions} x {report.jobs // report.sessions}"),
        ("callbacks", f"{size.callback_seconds[0]}-{size.callback_seconds[1]} s each"),
        ("faults that struck", ", ".join(f"{kind} {count}" for kind, count in faults.items())),
        ("outages (database, Prefect server)", ", ".join(f"{seconds:.0f} s" for seconds in outages)),
        ("down, overlapping outages merged (s after the sessions started)", "; ".join(
            f"{kind} {', '.join(f'{start:.0f}-{end:.0f} s' for start, end in _down_spans(report.faults, kind))}"
            for kind in STOPPED_SERVICES)),
        ("faults that found nothing to hit", report.faults_without_target),
        ("session runs retried by the operator", report.operator_retries),
        ("sessions completed", f"{report.sessions_completed} of {report.sessions}"),
        ("jobs not done at the end", report.jobs_not_done),
        ("jobs whose callback ran twice (side-effect log)", report.callbacks_run_twice),
        ("records done without their callback having run", report.done_without_callback),
        ("records in progress after the reconciler's next pass", report.in_progress_after_reconciler_pass),
        ("orphan processes", report.orphan_processes),
        ("leftover job folders / containers", f"{report.leftover_job_folders} / {report.leftover_containers}"),
        ("time from the last fault's end to a consistent state", consistent),
        ("wall time", f"{report.wall_seconds / 60:.1f} min"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        "<!-- chaos -->\n## Chaos (`make chaos`)\n\n"
        f"bench/chaos.py, seed {report.seed}, on an embedded stack of its own on this 2-core machine: "
        f"{report.sessions} sessions of {size.series} jobs at once while each of six faults strikes "
        f"{size.faults_of_each_kind} times at random moments of the first {size.window_seconds:.0f} s; an "
        "operator thread retries each session run that ends other than Completed. The goal of every count is "
        "0, and of the time to a consistent state, under 3 minutes.\n\n| | |\n|---|---|\n" + table
        + "\n<!-- /chaos -->"
    )


def _down_spans(faults: list[Fault], kind: str) -> list[tuple[float, float]]:
    """When the service was down: its outages, those that overlap merged (FaultInjector keeps it down)."""
    spans: list[tuple[float, float]] = []
    for fault in sorted((fault for fault in faults if fault.kind == kind), key=lambda fault: fault.at_seconds):
        start, end = fault.at_seconds, fault.at_seconds + fault.down_seconds
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--small", action="store_true", help="the version CI runs: 2 sessions of 5 jobs")
    arguments.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "big"))
    arguments.add_argument("--no-write", action="store_true", help="print the report only")
    options = arguments.parse_args(argv)
    size = SMALL if options.small else FULL
    print(f"chaos, seed {options.seed}:", json.dumps(asdict(size)), flush=True)
    with tempfile.TemporaryDirectory(prefix="dcm-chaos-") as scratch:
        folder = Path(scratch)
        with fresh_stack(folder / "stack") as (stack, state):
            database = DcmDatabase.load(DEFAULT_BLOCK)
            report = run_chaos(stack, state, database, size, options.seed, folder)
    print(json.dumps(asdict(report), indent=2))
    if not options.no_write and not options.small:
        write_benchmarks(markdown(report, size), "chaos")
    return 0 if report.healthy else 1


if __name__ == "__main__":
    sys.exit(main())
