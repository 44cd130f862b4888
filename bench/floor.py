"""What Prefect itself costs for a job's shape, with none of this project's code: the floor under issue 20's
targets 1-3.

A job is a Prefect flow run of three tasks (pre-service, execute, post-service), started from its session's
flow run. `bare_session` runs that shape with nothing in it: child flow runs of three empty tasks, one at a
time and four at once (a session's default), in a process of its own started like a session's run (the stack's
API, the flow runs' settings). Its wall time, its own CPU and the Prefect server's CPU over it are what any job
costs on that stack whatever the runtime around it does; `make bench` prints them beside the job rows of the
same run. `python -m bench.floor JOBS AT_ONCE` is that process: it prints one JSON line.
"""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from uuid import UUID

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.context import SettingsContext, get_settings_context

from bench.figures import Figure
from bench.load import cpu_seconds
from flows.runtime.variables import flow_run_variables
from flows.session import in_session_job_settings

JOB_STEPS = 3
"""A job flow's tasks: pre-service, execute, post-service."""


@task(cache_policy=NO_CACHE, persist_result=False)
def empty_step() -> None:
    """A task that does nothing: what it costs is Prefect's."""


@flow(name="bare-job", persist_result=False)
def bare_job() -> None:
    """A job's shape with nothing in it."""
    for _ in range(JOB_STEPS):
        empty_step()


@flow(name="bare-session", persist_result=False)
def bare_session(jobs: int, at_once: int) -> None:
    """`jobs` bare jobs as child flow runs, `at_once` at a time in threads, as a session runs its jobs: with the
    options a session gives its jobs' runs (no heartbeats, no result or cache records)."""
    with ThreadPoolExecutor(max_workers=at_once) as threads, SettingsContext(
        profile=get_settings_context().profile, settings=in_session_job_settings()
    ):
        futures = [threads.submit(contextvars.copy_context().run, bare_job) for _ in range(jobs)]
        for future in futures:
            future.result()


IDLE_SECONDS = 15.0
"""How long the server's CPU is read with nothing running, for its background services' share."""


@dataclass(frozen=True)
class BareSample:
    """One bare session: its run's start to end, each child run's created to ended, and the CPU seconds the
    session's process spent in the run and the Prefect server spent meanwhile beyond its idle rate."""

    run_seconds: float
    job_seconds: list[float]
    session_cpu: float
    server_cpu: float


def idle_cpu_rate(server_pid: int) -> float:
    """The server's CPU seconds per second with no run going: its own services (scheduler, event persister,
    the stack's pool workers' polls), which a bare session's figure must not be charged with."""
    before = cpu_seconds(server_pid)
    time.sleep(IDLE_SECONDS)
    return (cpu_seconds(server_pid) - before) / IDLE_SECONDS


def bare_session_run(jobs: int, at_once: int, server_pid: int, idle_rate: float) -> BareSample:
    """Run one bare session in a process of its own against the connected stack and read back what it cost."""
    server_before, started = cpu_seconds(server_pid), time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "bench.floor", str(jobs), str(at_once)], env={**os.environ, **flow_run_variables()},
        check=True, capture_output=True, text=True,
    )
    server_cpu = cpu_seconds(server_pid) - server_before - idle_rate * (time.monotonic() - started)
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    with get_client(sync_client=True) as client:
        session = client.read_flow_run(UUID(measured["flow_run_id"]))
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[session.id])))
    assert len(children) == jobs, f"{len(children)} of {jobs} bare jobs ran"
    assert session.start_time is not None and session.end_time is not None
    return BareSample(
        run_seconds=(session.end_time - session.start_time).total_seconds(),
        session_cpu=measured["cpu"], server_cpu=server_cpu,
        job_seconds=[(child.end_time - child.created).total_seconds() for child in children
                     if child.end_time and child.created],
    )


def measure_floor(repeats: int, session_sizes: list[int], at_once: int, server_pid: int) -> list[str]:
    """Rows for bare sessions of the smallest size one job at a time and of the largest `at_once` at a time."""
    idle_rate = idle_cpu_rate(server_pid)
    print(f"  the Prefect server idle: {idle_rate:.3f} CPU seconds per second", flush=True)
    rows = []
    for size, parallel in ((session_sizes[0], 1), (session_sizes[-1], at_once)):
        samples = [bare_session_run(size, parallel, server_pid, idle_rate) for _ in range(repeats)]
        label = f"bare session of {size} empty jobs, {'one at a time' if parallel == 1 else f'{parallel} at once'}"
        figures = [
            Figure(f"{label}: session run", [sample.run_seconds for sample in samples]),
            Figure(f"{label}: session run per job", [sample.run_seconds / size for sample in samples]),
            Figure(f"{label}: one job run, created to ended",
                   [seconds for sample in samples for seconds in sample.job_seconds]),
            Figure(f"{label}: CPU per job, the session's process", [sample.session_cpu / size for sample in samples]),
            Figure(f"{label}: CPU per job, the Prefect server beyond its idle rate",
                   [sample.server_cpu / size for sample in samples]),
        ]
        for figure in figures:
            print(f"  {figure.name}: median {figure.median:.3f} s of {figure.samples}", flush=True)
        cpu_per_job = figures[3].median + figures[4].median
        rows += [figure.row() for figure in figures] + [
            f"| {label}: throughput | {size / figures[0].median * 60:.0f} jobs/min | | | | |",
            f"| {label}: jobs per minute two cores allow at that CPU | {2 * 60 / cpu_per_job:.0f} jobs/min | | | | |",
        ]
    return rows


def main(argv: list[str]) -> int:
    jobs, at_once = int(argv[0]), int(argv[1])
    cpu_before = time.process_time()
    state = bare_session(jobs, at_once, return_state=True)
    cpu = time.process_time() - cpu_before
    assert state.is_completed(), state
    print(json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "cpu": cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
