"""What Prefect orchestration costs per job (and a venv install), measured side by side on the embedded stack.

`make bench` runs a trivial callback (it appends its job id and the time it started to a file) in
several ways, each repeated, and prints and writes into docs/benchmarks.md the median, min and max:

- the callback as a raw subprocess of the same interpreter (the floor every job pays);
- one `dcm-job` deployment run through a process worker (pre-service, execute, post-service, record);
- trigger to callback start through `submit_job`, against a stock one-task flow deployed on the same pool;
- sessions of 10 and 50 jobs (half of them independent, half depending on one of those), with jobs run
  in the session's process (the default) and, as the baseline, each job handed to the worker;
- memory of the worker and of the flow-run processes below it;
- building a venv worker's environment with pip against uv, with a cold and a warm package cache;
- a docker job against a raw `docker run` of the same image (bench/containers.py);
- a 22-job session on stock Prefect and on the embedded stack, each beside the seed's runtime (bench/stock.py);
- bare sessions of empty child flows, what Prefect itself costs for a job's shape (bench/floor.py).

Each part runs on an embedded stack of its own, started for it and stopped afterwards, so that no earlier
run in the Prefect server's database weighs on the figures. Every figure comes from records, the Prefect
API or a clock around the command, never from a sleep.
`--parts jobs`, `--parts install`, `--parts docker`, `--parts operator`, `--parts stock` or `--parts floor`
runs one part.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.deployments import run_deployment
from prefect.workers.process import ProcessWorker

from bench.components import database_of_its_own, lone_job, service_component
from bench.containers import ContainerBench, runtime_layer_build
from bench.figures import Figure
from bench.floor import measure_floor
from bench.load import MemorySampler, write_benchmarks
from bench.operator_views import measure_operator_views
from bench.stock import measure_stock
from blocks.database import DcmDatabase
from blocks.host import home_folder
from flows.runtime.components import Component, register_service
from flows.runtime.names import PROCESS_POOL, SESSION_FLOW, deployment
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.records import JobRecord
from flows.runtime.wheelhouse import build_wheelhouse
from flows.session import DEFAULT_MAX_PARALLEL_JOBS
from flows.submit import submit_job, wait_for_run
from ops.demo import schedule_stable_patient, upload_example_patient
from ops.scaled_stack import ScaledStack
from ops.stack import LocalStack, StackState, docker_engine_answers

STOCK_DEPLOYMENT = "bench-one-task/stock"

TRIVIAL_SERVICE = '''
import os
import time


def touch(session_id, job_name, headers, params, added_params, **kwargs):
    started = time.time()
    with open(params["marker"], "a") as marker:
        marker.write(f"{os.environ.get('DCM-PROCESSOR-SERVICE-JOB-ID', 'raw')} {started}\\n")
    return 1
'''


@task
def _note_start(marker: str) -> None:
    with open(marker, "a") as stream:
        stream.write(f"stock {time.time()}\n")


@flow(name="bench-one-task")
def one_task_flow(marker: str) -> None:
    """Prefect's simplest deployment run: one task that notes when it started."""
    _note_start(marker)


def bench_component(folder: Path, marker: Path) -> Component:
    """One trivial job per series, and a second one per series that depends on the first."""
    return service_component(folder, "bench-touch", TRIVIAL_SERVICE, [
        {"jobName": "first", "workerEntry": "touch", "events": ["stable-series"], "params": {"marker": str(marker)}},
        {"jobName": "second", "workerEntry": "touch", "events": ["stable-series"], "params": {"marker": str(marker)},
         "dependsOn": "first"},
    ])


def starts(marker: Path) -> dict[str, float]:
    """When each callback started, by job id (the raw runs write 'raw', the stock flow 'stock')."""
    if not marker.exists():
        return {}
    return {name: float(at) for name, at in (line.split() for line in marker.read_text().splitlines())}


class Bench:
    """The embedded stack, a database of the bench's own, and the trivial service registered in it."""

    def __init__(self, database: DcmDatabase, block: str, folder: Path, stack: LocalStack, state: StackState) -> None:
        self.database = database
        self.block = block
        self.folder = folder
        self.stack = stack
        self.state = state
        self.marker = folder / "callbacks"
        self.records = PlatformRecords(database.open())
        register_service(self.records, bench_component(folder / "component", self.marker))
        self.patients = 0

    def session(self, series: int) -> str:
        """A scheduled session of `series` one-image series: 2 jobs per series, pre- and post-services."""
        self.patients += 1
        upload_example_patient(self.database, patient_id=f"BENCH-{self.patients}", series=series, instances=1)
        return schedule_stable_patient(self.database, self.records)

    def raw_callback(self) -> float:
        """The callback in a fresh interpreter, as a worker environment would run it, without Prefect."""
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import module; "
                "module.touch(None, 'first', {}, {'marker': sys.argv[2]}, {})")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, str(self.folder / "component"), str(self.marker)], check=True)
        return time.perf_counter() - started

    def deployment_job(self) -> tuple[float, float, float]:
        """One job through `submit_job`: (trigger to callback start, flow run duration, trigger to end)."""
        self.patients += 1
        job_id = lone_job(self.database, self.records, f"BENCH-{self.patients}", "first")
        triggered = time.time()
        run = wait_for_run(submit_job(job_id, self.block), poll_seconds=0.05)
        assert run.state is not None and run.state.is_completed(), run.state
        assert run.start_time is not None and run.end_time is not None
        return (starts(self.marker)[job_id] - triggered, (run.end_time - run.start_time).total_seconds(),
                run.end_time.timestamp() - triggered)

    def deployment_job_without_warm_engine(self) -> tuple[float, float, float]:
        """`deployment_job` with the warm engine stopped: the job command starts a fresh engine process."""
        self.stack.stop_warm_engine(self.state)
        try:
            return self.deployment_job()
        finally:
            self.stack.start_workers(self.state)

    @contextmanager
    def prefect_process_worker(self) -> Iterator[None]:
        """Prefect's own process worker in place of this project's: it finds new runs only when it polls."""
        self.stack.replace_process_worker(self.state, ProcessWorker.type)
        try:
            yield
        finally:
            self.stack.replace_process_worker(self.state)

    def stock_start(self) -> float:
        """Trigger to first task line of a stock one-task flow on the same pool (under `prefect_process_worker`)."""
        triggered = time.time()
        run = run_deployment(STOCK_DEPLOYMENT, parameters={"marker": str(self.folder / "stock")}, timeout=0)
        finished = wait_for_run(run.id, poll_seconds=0.05)
        assert finished.state is not None and finished.state.is_completed(), finished.state
        return starts(self.folder / "stock")["stock"] - triggered

    def session_run(
        self, series: int, jobs_in_session: bool, max_parallel_jobs: int = DEFAULT_MAX_PARALLEL_JOBS
    ) -> SessionSample:
        """Run a whole session and read back from the API how long it and each of its jobs took."""
        session_id = self.session(series)
        jobs = {job.id: job for job in self.records.session_jobs(session_id)}
        triggered = time.time()
        run = run_deployment(deployment(SESSION_FLOW), timeout=0, parameters={
            "session_id": session_id, "database_block": self.block, "jobs_in_session": jobs_in_session,
            "max_parallel_jobs": max_parallel_jobs,
        })
        final = wait_for_run(run.id, timeout_seconds=1800, poll_seconds=0.2)
        assert final.state is not None and final.state.is_completed(), final.state
        assert final.start_time is not None and final.end_time is not None
        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
            executes = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[child.id for child in children])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="execute")),
            )
        job_of_run = {child.id: child.name.rsplit(" ", 1)[-1] for child in children}
        created = {child.id: child.created for child in children}
        callback_seconds = {job_of_run[execute.flow_run_id]: execute.total_run_time.total_seconds()
                            for execute in executes if execute.flow_run_id in job_of_run}
        return SessionSample(
            trigger_to_end=final.end_time.timestamp() - triggered,
            run_seconds=(final.end_time - final.start_time).total_seconds(),
            job_seconds=[(child.end_time - child.created).total_seconds() for child in children
                         if child.end_time and child.created],
            start_seconds=[(execute.start_time - created[execute.flow_run_id]).total_seconds()
                           for execute in executes if execute.start_time and created.get(execute.flow_run_id)],
            callbacks_sum=sum(callback_seconds.values()),
            critical_path=_longest_path(jobs, callback_seconds),
        )


@dataclass(frozen=True)
class SessionSample:
    """One session run: its makespan, each job run's created-to-ended time, and its callbacks' own time."""

    trigger_to_end: float
    run_seconds: float
    job_seconds: list[float]
    start_seconds: list[float]
    callbacks_sum: float
    critical_path: float


def _longest_path(jobs: dict[str, JobRecord], seconds: dict[str, float]) -> float:
    """The longest chain of dependent callbacks, each counted with its execute task's own duration."""
    finish: dict[str, float] = {}

    def finished_after(job_id: str) -> float:
        if job_id not in finish:
            before = [finished_after(str(dependency)) for dependency in jobs[job_id].depends_on if dependency in jobs]
            finish[job_id] = max(before, default=0.0) + seconds.get(job_id, 0.0)
        return finish[job_id]

    return max((finished_after(job_id) for job_id in jobs), default=0.0)


def repeat(name: str, times: int, measure: Callable[[], float]) -> Figure:
    figure = Figure(name)
    for _ in range(times):
        figure.samples.append(measure())
    print(f"  {name}: median {figure.median:.3f} s of {figure.samples}", flush=True)
    return figure


def deploy_stock_flow() -> None:
    """Deploy the stock one-task flow onto the process pool, as a user of plain Prefect would."""
    repository = str(Path(__file__).resolve().parents[1])
    one_task_flow.from_source(source=repository, entrypoint="bench/overhead.py:one_task_flow").deploy(
        name="stock", work_pool_name=PROCESS_POOL, print_next_steps=False,
    )


def measure(bench: Bench, repeats: int, baseline_repeats: int, session_sizes: list[int], scaled: bool = False) -> str:
    """Run every measurement; return the markdown section."""
    raw = repeat("callback as a raw subprocess", repeats * 2, bench.raw_callback)
    job_samples, stock = [], Figure("trigger to task start, stock one-task flow, Prefect's process worker")
    for _ in range(repeats):
        pair = bench.deployment_job(), bench.deployment_job_without_warm_engine()
        with bench.prefect_process_worker():
            job_samples.append((*pair, bench.deployment_job()))
            stock.samples.append(bench.stock_start())
    deployment = [sample for sample, _, _ in job_samples]
    fresh_start = Figure("trigger to callback start, `submit_job`, warm engine stopped (a fresh engine process)",
                         [fresh[0] for _, fresh, _ in job_samples])
    polled_start = Figure("trigger to callback start, `submit_job`, Prefect's process worker (found at its poll)",
                          [polled[0] for _, _, polled in job_samples])
    start = Figure("trigger to callback start, `submit_job` (dcm-job)", [sample[0] for sample in deployment])
    job_run = Figure("dcm-job deployment run, flow run duration", [sample[1] for sample in deployment])
    job_total = Figure("dcm-job deployment run, trigger to end", [sample[2] for sample in deployment])
    rows = [raw.row(), job_run.row(raw), job_total.row(raw), stock.row(), fresh_start.row(stock),
            polled_start.row(stock), start.row(stock),
            f"| trigger to callback start, `submit_job`, with against without the warm engine | "
            f"{start.median / fresh_start.median:.2f}x | | | {repeats} pairs | |",
            f"| trigger to callback start, `submit_job`, this project's process worker against Prefect's | "
            f"{start.median / polled_start.median:.2f}x | | | {repeats} pairs | |"]
    sessions: list[str] = []
    sampler = MemorySampler({}, {name: bench.state.processes[name] for name in ("process-worker", "warm-engine")})
    sampler.start()
    for size in session_sizes:
        series = (size - 2) // 2
        for jobs_in_session, label in ((False, "each job on the worker"), (True, "jobs in the session's process")):
            runs = repeats if jobs_in_session else baseline_repeats
            samples = [bench.session_run(series, jobs_in_session) for _ in range(runs)]
            makespan = Figure(f"{size} jobs, {label}: trigger to end", [sample.trigger_to_end for sample in samples])
            run = Figure(f"{size} jobs, {label}: session run, start to end", [sample.run_seconds for sample in samples])
            critical = Figure(f"{size} jobs, {label}: critical path of callbacks",
                              [sample.critical_path for sample in samples])
            callbacks = Figure(f"{size} jobs, {label}: callbacks' sum", [sample.callbacks_sum for sample in samples])
            per_job = Figure(f"session of {size} jobs, {label}: one job run, created to ended",
                             [seconds for sample in samples for seconds in sample.job_seconds])
            print(f"  {run.name}: median {run.median:.1f} s, critical path {critical.median:.1f} s", flush=True)
            sessions += [makespan.row(), run.row(critical), critical.row(), callbacks.row(),
                         f"| {size} jobs, {label}: throughput | {size / run.median * 60:.0f} jobs/min | | | | |"]
            to_start = Figure(f"session of {size} jobs, {label}: job run created to callback start",
                              [seconds for sample in samples for seconds in sample.start_seconds])
            rows += [per_job.row(raw), to_start.row()]
    sampler.stopped.set()
    sampler.join()
    alone = [bench.session_run((session_sizes[0] - 2) // 2, True, max_parallel_jobs=1) for _ in range(repeats)]
    rows.append(Figure(f"session of {session_sizes[0]} jobs, one job at a time: one job run, created to ended",
                       [seconds for sample in alone for seconds in sample.job_seconds]).row(raw))
    rows.append(Figure(f"session of {session_sizes[0]} jobs, one job at a time: session run less its callbacks' "
                       "time, per job", [(sample.run_seconds - sample.callbacks_sum) / session_sizes[0]
                                         for sample in alone]).row())
    header = "| | median s | min s | max s | runs | against |\n|---|---|---|---|---|---|\n"
    marker = section_marker(scaled)
    where = SCALED_STACK if scaled else EMBEDDED_STACK
    return (
        f"<!-- {marker} -->\n## Per-job overhead{' on the scaled stack' if scaled else ''} (`make bench`)\n\n"
        f"bench/overhead.py on {where}, a trivial callback (it appends one line to a file). Ratios are against "
        "the raw subprocess, or for "
        "trigger-to-start against the stock one-task flow, measured in the same run.\n\n"
        + header + "\n".join(rows) + "\n\nWhole sessions of the platform's scheduler: pre-services, then per "
        "series one job and a second that depends on it, then post-services. The critical path and the sum "
        "count each callback with its execute task's duration; the session run is compared with its "
        "critical path:\n\n" + header + "\n".join(sessions)
        + f"\n\nMemory during the sessions: process worker peak {sampler.worker_peak:.0f} MB RSS, flow-run processes "
        f"(job commands, runs forked by the warm engine, callbacks) peak {sampler.flow_runs_peak:.0f} MB PSS summed, "
        f"{sampler.processes_peak} processes at most.\n"
        f"<!-- /{marker} -->"
    )


def section_marker(scaled: bool) -> str:
    """The marker of the per-job section in docs/benchmarks.md: each stack has its own."""
    return "overhead-scaled" if scaled else "overhead"


EMBEDDED_STACK = "the embedded stack (SecantusDB, Prefect server on SQLite, one process worker)"
SCALED_STACK = ("the scaled stack (`bench/overhead.py --scaled`; ops/scaled_stack.py: PostgreSQL, Redis, two API "
                "servers behind haproxy, Prefect's services apart, SecantusDB, one process worker)")


INSTALL_PACKAGES = ["dcm-processor-service", "nibabel", "dcm2niix"]
"""A venv worker with a few real packages: the service helpers (pydicom, numpy, pymongo...), NIfTI, dcm2niix."""


def environment_build(wheelhouse: Path, folder: Path, installer: str, cache: Path) -> float:
    """Seconds to build a venv worker's environment the way VenvWorker.install does (virtualenv, then
    the packages from the host's wheelhouse), with `installer` and the package cache `cache`."""
    venv = folder / f"venv-{uuid.uuid4().hex[:8]}"
    sources = ["--no-index", "--find-links", str(wheelhouse)]
    python = venv / "bin" / "python"
    if installer == "uv":
        install = [sys.executable, "-m", "uv", "pip", "install", "--quiet", "--compile-bytecode",
                   "--python", str(python), "--cache-dir", str(cache), *sources, *INSTALL_PACKAGES]
    else:
        install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                   "--cache-dir", str(cache), *sources, *INSTALL_PACKAGES]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "virtualenv", "--quiet", str(venv)], check=True)
    subprocess.run(install, check=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(venv)
    return elapsed


def _build_with_a_new_cache(wheelhouse: Path, folder: Path, installer: str) -> float:
    return environment_build(wheelhouse, folder, installer, folder / f"cache-{uuid.uuid4().hex[:8]}")


def measure_installs(wheelhouse: Path, folder: Path, repeats: int) -> str:
    """pip against uv, each with a cold cache (a new one per build) and a warm one (primed once)."""
    rows = []
    for installer in ("pip", "uv"):
        cold = repeat(f"venv worker environment, {installer}, cold cache", repeats,
                      functools.partial(_build_with_a_new_cache, wheelhouse, folder, installer))
        warm_cache = folder / f"warm-{installer}"
        environment_build(wheelhouse, folder, installer, warm_cache)
        warm = repeat(f"venv worker environment, {installer}, warm cache", repeats,
                      functools.partial(environment_build, wheelhouse, folder, installer, warm_cache))
        rows += [cold, warm]
    pip_cold = rows[0]
    table = "\n".join(figure.row(pip_cold) for figure in rows)
    return (
        "<!-- install -->\n## Installing a venv worker (`make bench`)\n\n"
        f"virtualenv, then {', '.join(INSTALL_PACKAGES)} and their dependencies from the local wheelhouse "
        "(`--no-index`), as `dcm-install-component` builds a venv worker; ratios against pip with a cold "
        "cache, measured in the same run.\n\n| | median s | min s | max s | runs | against |\n"
        "|---|---|---|---|---|---|\n" + table + "\n<!-- /install -->"
    )


PARTS = ["jobs", "floor", "install", "docker", "operator", "stock"]


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--repeats", type=int, default=3)
    arguments.add_argument("--baseline-repeats", type=int, default=1,
                           help="runs of each session with every job on the worker (minutes each)")
    arguments.add_argument("--sessions", type=int, nargs="*", default=[10, 50], help="session sizes, in jobs")
    arguments.add_argument("--parts", nargs="*", choices=PARTS, default=PARTS)
    arguments.add_argument("--stock-rounds", type=int, default=4,
                           help="pairs of sessions (the seed's runtime, then the stack) on each stack")
    arguments.add_argument("--stock-series", type=int, default=20, help="series of each of those sessions")
    arguments.add_argument("--no-write", action="store_true", help="print the tables only")
    arguments.add_argument("--scaled", action="store_true",
                           help="the jobs part on the scaled stack instead (its own section of docs/benchmarks.md)")
    options = arguments.parse_args(argv)
    sections = {}
    with tempfile.TemporaryDirectory() as folder:
        if "install" in options.parts:
            wheelhouse = build_wheelhouse(home_folder() / "wheelhouse")
            sections["install"] = measure_installs(wheelhouse, Path(folder), options.repeats)
        if "jobs" in options.parts:
            sections[section_marker(options.scaled)] = measure_jobs(options, Path(folder))
        if "floor" in options.parts:
            sections["floor"] = measure_prefect_floor(options, Path(folder))
        if "operator" in options.parts:
            with fresh_stack(Path(folder) / "operator-stack"):
                sections["operator"] = measure_operator_views(options.repeats)
        if "stock" in options.parts:
            sections["stock"] = measure_stock(Path(folder), options.stock_rounds, options.stock_series)
        if "docker" in options.parts:
            if docker_engine_answers():
                sections["docker"] = measure_docker_jobs(options.repeats, Path(folder))
            else:
                print("no Docker engine answers: the docker part is not measured (.ci/docker-engine.sh starts one)")
    for marker, section in sections.items():
        print(section)
        if not options.no_write:
            write_benchmarks(section, marker)
    return 0


@contextmanager
def fresh_stack(home: Path, scaled: bool = False) -> Iterator[tuple[LocalStack, StackState]]:
    """An embedded (or scaled) stack of its own in the new folder `home`, stopped afterwards: the figures must
    not depend on the runs an earlier bench (or demo) left in the Prefect server's database, nor on work it
    still does."""
    stack = ScaledStack(home) if scaled else LocalStack(home)
    try:
        state = stack.start()
        with stack.connected(state):
            yield stack, state
    finally:
        if isinstance(stack, ScaledStack):
            stack.purge()  # its PostgreSQL cluster lives outside `home`
        else:
            stack.stop()


def measure_jobs(options: argparse.Namespace, folder: Path) -> str:
    """The job, trigger and session figures, on the embedded stack and a database of the bench's own."""
    with fresh_stack(folder / "jobs-stack", options.scaled) as (stack, state):
        deploy_stock_flow()
        with database_of_its_own("bench") as (database, name):
            bench = Bench(database, name, folder, stack, state)
            return measure(bench, options.repeats, options.baseline_repeats, options.sessions, options.scaled)


def measure_prefect_floor(options: argparse.Namespace, folder: Path) -> str:
    """Bare sessions (bench/floor.py) on an embedded stack of their own: what any job costs there."""
    with fresh_stack(folder / "floor-stack") as (_, state):
        rows = measure_floor(options.repeats, options.sessions, DEFAULT_MAX_PARALLEL_JOBS,
                             state.processes["prefect-server"])
    return (
        "<!-- floor -->\n## What Prefect itself costs for a job's shape (`make bench`)\n\n"
        f"bench/floor.py on {EMBEDDED_STACK}: a bare session, a flow run in a process of its own with the flow "
        "runs' settings, runs bare jobs, child flow runs of three empty tasks each (a job's pre-service, execute "
        "and post-service with nothing in them), as a session runs its jobs (threads, one at a time or "
        f"{DEFAULT_MAX_PARALLEL_JOBS} at once). None of this project's code runs: these are the floor under the "
        "per-job rows above, measured in the same `make bench`. CPU is the session's process's own in its run, "
        "and the Prefect server's over the same time beyond what it spends idle (its own services and the stack's "
        "pool workers' polls, read for 15 s first).\n\n"
        "| | median s | min s | max s | runs | against |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n<!-- /floor -->"
    )


def measure_docker_jobs(repeats: int, folder: Path) -> str:
    """A docker job through `submit_job` against a raw `docker run` of its image, on the embedded stack;
    the runtime layer's build with pip and with uv."""
    wheelhouse = build_wheelhouse(home_folder() / "wheelhouse")
    layers = [repeat(f"runtime layer on the base image, {installer}, no build cache", repeats,
                     functools.partial(runtime_layer_build, wheelhouse, installer)) for installer in ("pip", "uv")]
    with fresh_stack(folder / "docker-stack"):
        bench = ContainerBench(folder / "container")
        image = bench.install()
        try:
            raw = [bench.raw_run(image) for _ in range(repeats * 2)]
            imports = {modules: [bench.raw_import(image, modules) for _ in range(repeats * 2)]
                       for modules in ("prefect.engine", "prefect.engine, flows.job")}
            jobs = [bench.job() for _ in range(repeats)]
        finally:
            bench.remove()
    raw_start = Figure("raw `docker run`, trigger to callback start", [sample[0] for sample in raw])
    raw_end = Figure("raw `docker run`, trigger to exit", [sample[1] for sample in raw])
    imported = [Figure(f"raw `docker run`, trigger to `import {modules}` done", samples)
                for modules, samples in imports.items()]
    start = Figure("docker job, trigger to callback start (`submit_job`)", [sample[0] for sample in jobs])
    run = Figure("docker job, flow run duration (in the container)", [sample[1] for sample in jobs])
    end = Figure("docker job, trigger to end", [sample[2] for sample in jobs])
    for figure in (raw_start, raw_end, *imported, start, run, end):
        print(f"  {figure.name}: median {figure.median:.3f} s of {figure.samples}", flush=True)
    return (
        "<!-- docker -->\n## Docker jobs (`make bench`)\n\n"
        "The same trivial callback (it returns the time it started) in the same image (the worker image the "
        "installer built, with the runtime layer), as a `dcm-job` run on the `dcm-docker` pool (the prefect-docker "
        "worker starts one container per job, whose flow run does pre-service, execute and post-service) and as "
        "`docker run --rm` of that image with the service module mounted. A job's container runs `python -m "
        "prefect.engine`, which loads the job flow (`flows.job`): two more raw runs of the image only import those, "
        "the least a container per job waits before its flow's first line. Ratios against the raw run, measured "
        "in the same run.\n\n| | median s | min s | max s | runs | against |\n|---|---|---|---|---|---|\n"
        + "\n".join([raw_start.row(), raw_end.row(), *(figure.row(raw_start) for figure in imported),
                     start.row(raw_start), run.row(raw_end), end.row(raw_end)])
        + "\n\nThe runtime layer (this project and its dependencies from the wheelhouse, into the image's own venv), "
        "built on the base image without Docker's build cache; ratio against pip:\n\n"
        "| | median s | min s | max s | runs | against |\n|---|---|---|---|---|---|\n"
        + "\n".join([layers[0].row(), layers[1].row(layers[0])]) + "\n<!-- /docker -->"
    )


if __name__ == "__main__":
    sys.exit(main())
