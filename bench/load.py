"""Load: many patients' sessions at once, on the embedded stack and on the scaled one.

`make load` stores patients of 50 one-image series each, lets the platform's scheduler make their sessions,
submits all sessions at the same moment and waits, three times:

- the embedded stack, 5 patients: each series has one job of a trivial service with no worker of its own,
  which runs in its session's process;
- the scaled stack (ops/scaled_stack.py) with two worker hosts (ops/network_hosts.py) that both take
  sessions, the same 5 patients' jobs;
- the same scaled stack, 10 patients of 25 series: each series has one job of a venv component installed on
  host 1 and one of a venv component installed on host 2, so every session's 50 jobs are spread over both
  hosts by their device ids.

It checks that every job record is done and that every callback ran exactly once, and on its host (each
appends its job id and its Python to a file), samples the memory and counts the CPU of every service, worker
and flow-run process, and writes the figures side by side into docs/benchmarks.md. `tests/test_faults.py` and
`tests/test_network_hosts.py` run the same at a smaller size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

from bench.components import database_of_its_own, service_component, venv_worker
from blocks.database import DcmDatabase
from blocks.host import home_folder
from flows.runtime.components import Component, register_service
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.wheelhouse import build_wheelhouse
from flows.submit import submit_install, submit_session, wait_for_run
from ops.demo import schedule_stable_patient, upload_example_patient
from ops.network_hosts import WorkerHosts, worker_hosts
from ops.stack import LocalStack

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SAMPLE_SECONDS = 0.5
SERVICE_NAME = "load-touch"
FLOW_RUNS = "flow runs (sessions, jobs, callbacks)"
MACHINE = "the whole machine"

TRIVIAL_SERVICE = '''
import os
import sys


def touch(session_id, job_name, headers, params, added_params, **kwargs):
    with open(params["marker"], "a") as marker:
        marker.write(os.environ["DCM-PROCESSOR-SERVICE-JOB-ID"] + " " + sys.prefix + "\\n")
    return 1
'''


@dataclass(frozen=True)
class LoadReport:
    sessions: int
    jobs: int
    wall_seconds: float
    jobs_per_minute: float
    worker_peak_rss_mb: float
    """The largest peak RSS of a process worker."""
    flow_runs_peak_pss_mb: float
    peak_flow_run_processes: int
    sessions_completed: int
    jobs_not_done: int
    callbacks_run_twice: int
    callbacks_missing: int
    callbacks_on_another_host: int
    services_peak_pss_mb: dict[str, float] = field(default_factory=dict)
    """Each service's peak PSS, its own processes included (PostgreSQL's backends, say); a worker's or a warm
    engine's flow runs are counted in `flow_runs_peak_pss_mb` instead."""
    cpu_ms_per_job: dict[str, float] = field(default_factory=dict)
    """CPU each service (counted as its memory is), the flow runs and the whole machine spent during the run,
    divided by the job records: what each job costs where."""


@dataclass(frozen=True)
class LoadTarget:
    """What a load run submits to and watches: the platform database and its block, the services it samples
    and the services whose jobs it counts."""

    database: DcmDatabase
    database_block: str
    services: dict[str, int]
    """Name to pid of each process sampled with the processes below it."""
    run_starters: dict[str, int]
    """Name to pid of each process worker and warm engine: the processes below them are flow runs."""
    counted: dict[str, Path | None]
    """Service name to the folder its callbacks' Python must be in (its host's environments), or None."""


def trivial_component(folder: Path, marker: Path, name: str = SERVICE_NAME, venv: bool = False) -> Component:
    """A service whose one series job (of the component's name) appends its job id and its Python's prefix to
    `marker`; with `venv`, the job runs in a venv worker of its own."""
    return service_component(folder, name, TRIVIAL_SERVICE, [
        {"jobName": name, "workerEntry": "touch", "events": ["stable-series"], "params": {"marker": str(marker)}},
    ], worker=venv_worker(name) if venv else None, worker_type="venv")


def _memory_mb(pid: int, file: str, field: str) -> float:
    try:
        with open(f"/proc/{pid}/{file}") as lines:
            for line in lines:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _rss_mb(pid: int) -> float:
    return _memory_mb(pid, "status", "VmRSS")


def _pss_mb(pid: int) -> float:
    """Resident memory with each shared page divided among the processes sharing it: runs forked from the
    warm engine share most of theirs, which a sum of RSS would count once per run."""
    return _memory_mb(pid, "smaps_rollup", "Pss")


def cpu_seconds(pid: int, with_reaped_children: bool = True) -> float:
    """User and system time of the process, and of its children that ended and were waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(value) for value in fields[11:15 if with_reaped_children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def cpu_totals(services: dict[str, int], run_starters: dict[str, int]) -> dict[str, float]:
    """CPU seconds spent so far by each service with the processes below it, by each worker and warm engine
    alone, by the flow runs below those, and by the machine."""
    parents = _children_by_parent()

    def tree(pid: int) -> float:
        return sum(cpu_seconds(process) for process in [pid, *descendants(pid, parents)])

    totals = {name: tree(pid) for name, pid in services.items()}
    totals |= {name: cpu_seconds(pid, with_reaped_children=False) for name, pid in run_starters.items()}
    totals[FLOW_RUNS] = sum(tree(pid) - totals[name] for name, pid in run_starters.items())
    totals[MACHINE] = machine_busy_seconds()
    return totals


def _children_by_parent() -> dict[int, list[int]]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(parent, []).append(int(entry.name))
    return parents


def descendants(pid: int, parents: dict[int, list[int]] | None = None) -> list[int]:
    parents = _children_by_parent() if parents is None else parents
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found.extend(children)
        frontier.extend(children)
    return found


class MemorySampler(threading.Thread):
    """Samples each service's PSS (its process and those below it), each process worker's RSS, and the summed
    PSS of the flow-run processes: those below a process worker (the job commands it starts) and below a warm
    engine (the runs it forks, and their callbacks)."""

    def __init__(self, services: dict[str, int], run_starters: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.services = services
        self.run_starters = run_starters
        self.services_peak = dict.fromkeys([*services, *run_starters], 0.0)
        self.worker_peak = 0.0
        self.flow_runs_peak = 0.0
        self.processes_peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_SECONDS):
            parents = _children_by_parent()
            for name, pid in self.services.items():
                pss = sum(_pss_mb(process) for process in [pid, *descendants(pid, parents)])
                self.services_peak[name] = max(self.services_peak[name], pss)
            runs = [child for pid in self.run_starters.values() for child in descendants(pid, parents)]
            for name, pid in self.run_starters.items():
                self.services_peak[name] = max(self.services_peak[name], _pss_mb(pid))
                if name.endswith("process-worker"):
                    self.worker_peak = max(self.worker_peak, _rss_mb(pid))
            self.flow_runs_peak = max(self.flow_runs_peak, sum(_pss_mb(run) for run in runs))
            self.processes_peak = max(self.processes_peak, len(runs))


def run_load(target: LoadTarget, sessions: int, series: int, marker: Path, timeout_seconds: float = 3600
             ) -> LoadReport:
    """Schedule `sessions` patients of `series` series each, run all their sessions at once, check them."""
    database = target.database
    records = PlatformRecords(database.open())
    session_ids = []
    for number in range(sessions):
        upload_example_patient(database, patient_id=f"LOAD-{number}", series=series, instances=1)
        session_ids.append(schedule_stable_patient(database, records))
    counted = {job.id: target.counted[job.service_name] for session_id in session_ids
               for job in records.session_jobs(session_id) if job.service_name in target.counted}
    sampler = MemorySampler(target.services, target.run_starters)
    sampler.start()
    cpu_before = cpu_totals(target.services, target.run_starters)
    started = time.monotonic()
    runs = [submit_session(session_id, database_block=target.database_block) for session_id in session_ids]
    finals = [wait_for_run(run_id, timeout_seconds=timeout_seconds, poll_seconds=1) for run_id in runs]
    wall = time.monotonic() - started
    cpu_after = cpu_totals(target.services, target.run_starters)
    sampler.stopped.set()
    sampler.join()
    calls = [line.split(" ", 1) for line in marker.read_text().splitlines()] if marker.exists() else []
    times = Counter(job_id for job_id, _ in calls)
    all_jobs = [job for session_id in session_ids for job in records.session_jobs(session_id)]
    return LoadReport(
        sessions=sessions,
        jobs=len(all_jobs),
        wall_seconds=round(wall, 1),
        jobs_per_minute=round(len(all_jobs) / wall * 60, 1),
        worker_peak_rss_mb=round(sampler.worker_peak, 1),
        flow_runs_peak_pss_mb=round(sampler.flow_runs_peak, 1),
        peak_flow_run_processes=sampler.processes_peak,
        sessions_completed=sum(1 for run in finals if run.state is not None and run.state.is_completed()),
        jobs_not_done=sum(1 for job in all_jobs if not job.done),
        callbacks_run_twice=sum(1 for count in times.values() if count > 1),
        callbacks_missing=sum(1 for job_id in counted if job_id not in times),
        callbacks_on_another_host=sum(
            1 for job_id, prefix in calls
            if (home := counted.get(job_id)) is not None and not Path(prefix).is_relative_to(home)
        ),
        services_peak_pss_mb={name: round(peak, 1) for name, peak in sampler.services_peak.items()},
        cpu_ms_per_job={name: round((cpu_after[name] - cpu_before[name]) / len(all_jobs) * 1000, 1)
                        for name in cpu_after},
    )


RUN_STARTERS = ("process-worker", "docker-worker", "warm-engine")


def _target(database: DcmDatabase, database_block: str, processes: dict[str, int],
            counted: dict[str, Path | None]) -> LoadTarget:
    return LoadTarget(
        database, database_block,
        services={name: pid for name, pid in processes.items() if not name.endswith(RUN_STARTERS)},
        run_starters={name: pid for name, pid in processes.items() if name.endswith(RUN_STARTERS)},
        counted=counted,
    )


def in_session_target(database: DcmDatabase, database_block: str, processes: dict[str, int], folder: Path,
                      marker: Path) -> LoadTarget:
    """`processes` (a stack's, and its hosts'), with the trivial service registered in `database`: it has no
    worker, so its jobs run in their sessions' processes."""
    register_service(PlatformRecords(database.open()), trivial_component(folder / "component", marker))
    return _target(database, database_block, processes, {SERVICE_NAME: None})


def hosts_processes(scaled: WorkerHosts) -> dict[str, int]:
    """The scaled stack's processes and its hosts' (named `<host> <process>`)."""
    return {**scaled.state.processes, **{f"{host.name} {name}": process.pid for host in scaled.hosts
                                         for name, process in host.processes.items()}}


def routed_target(scaled: WorkerHosts, database: DcmDatabase, database_block: str, folder: Path,
                  marker: Path) -> LoadTarget:
    """The scaled stack's and its hosts' processes, with a venv component of the trivial service installed on
    each host (by the install deployment on the work queue of the host's device id): each series then has one
    job on each host."""
    counted: dict[str, Path | None] = {}
    for host, device_id in zip(scaled.hosts, scaled.device_ids, strict=True):
        name = f"{SERVICE_NAME}-{host.number}"
        trivial_component(folder / name, marker, name, venv=True)
        installed = wait_for_run(submit_install(str(folder / name), database_block=database_block,
                                                work_queue_name=device_id), timeout_seconds=600)
        if installed.state is None or not installed.state.is_completed():
            raise RuntimeError(f"installing {name} on {host.name} ended {installed.state}")
        counted[name] = host.home
    return _target(database, database_block, hosts_processes(scaled), counted)


@dataclass(frozen=True)
class LoadRun:
    """One shape's load run, as a column of the table."""

    title: str
    series_jobs: str
    report: LoadReport


def _memory_and_cpu(report: LoadReport, name: str) -> str:
    memory = f"{report.services_peak_pss_mb[name]} MB" if name in report.services_peak_pss_mb else ""
    cpu = f"{report.cpu_ms_per_job[name]:.0f} ms" if name in report.cpu_ms_per_job else ""
    return ", ".join(part for part in (memory, cpu) if part)


def markdown(runs: list[LoadRun]) -> str:
    reports = [run.report for run in runs]
    rows: list[tuple[str, list[object]]] = [
        ("sessions submitted at once", [report.sessions for report in reports]),
        ("jobs of a series", [run.series_jobs for run in runs]),
        ("job records (with pre- and post-services)", [report.jobs for report in reports]),
        ("sessions completed", [report.sessions_completed for report in reports]),
        ("jobs not done / callbacks run twice / missing / on another host", [
            f"{report.jobs_not_done} / {report.callbacks_run_twice} / {report.callbacks_missing} / "
            f"{report.callbacks_on_another_host}" for report in reports]),
        ("wall time", [f"{report.wall_seconds} s" for report in reports]),
        ("throughput", [f"{report.jobs_per_minute} jobs/min" for report in reports]),
        ("process worker, peak RSS (the largest of them)", [f"{report.worker_peak_rss_mb} MB" for report in reports]),
        ("flow-run processes (job commands, runs, callbacks), peak summed PSS",
         [f"{report.flow_runs_peak_pss_mb} MB" for report in reports]),
        ("flow-run processes at once, peak", [report.peak_flow_run_processes for report in reports]),
    ]
    rows.append((f"CPU per job, {MACHINE}", [f"{report.cpu_ms_per_job.get(MACHINE, 0):.0f} ms" for report in reports]))
    rows.append((f"CPU per job, {FLOW_RUNS}", [f"{report.cpu_ms_per_job.get(FLOW_RUNS, 0):.0f} ms"
                                              for report in reports]))
    services = dict.fromkeys(name for report in reports for name in report.services_peak_pss_mb)
    rows += [(f"`{name}`: peak PSS, CPU per job", [_memory_and_cpu(report, name) for report in reports])
             for name in services]
    table = "\n".join(f"| {name} | {' | '.join(str(value) for value in values)} |" for name, values in rows)
    header = f"| | {' | '.join(run.title for run in runs)} |\n|---|{'---|' * len(runs)}"
    return (
        "<!-- load -->\n## Load: concurrent sessions, embedded and scaled\n\n"
        "`make load` (bench/load.py) on this 2-core machine; every service, host and flow run shares its two "
        "cores. At most 3 sessions at once (their queue's limit), `max_parallel_jobs` 4 per session. Embedded: "
        "SecantusDB, Prefect server on SQLite, one process worker. Scaled (ops/scaled_stack.py): PostgreSQL, "
        "Redis, two API servers behind haproxy, Prefect's services apart, SecantusDB, and two worker hosts "
        "(network namespaces, ops/network_hosts.py) that both take sessions. A job \"in its session\" is a "
        "service's without a worker: it runs in its session's process. Over two hosts, each series has one job "
        "of a venv component installed on each host, which runs there as a deployment run on the work queue of "
        "the host's device id. Peak PSS counts a service's processes together (PostgreSQL's backends, say); a "
        "worker's or warm engine's flow runs are counted in the flow-run rows. CPU per job is the CPU time a "
        "service (with the same processes) spent during the run, divided by the job records.\n\n"
        + header + "\n" + table + "\n<!-- /load -->"
    )


def measured_on() -> str:
    """When and on which commit a section's figures were measured, so that a reader can tell figures older
    than the code they describe (`git log <commit>..` lists what changed since)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCHMARKS.parent, capture_output=True,
                            text=True, check=False).stdout.strip() or "unknown"
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BENCHMARKS.parent,
                             capture_output=True, text=True, check=False).stdout.strip()
    return f"_Measured on {date.today().isoformat()} at commit {commit}{' with local changes' if changed else ''}._"


def write_benchmarks(section: str, marker: str) -> None:
    """Replace the part of docs/benchmarks.md between `<!-- marker -->` and `<!-- /marker -->`, or append it,
    stamped with `measured_on()`."""
    section = section.replace(f"<!-- /{marker} -->", f"\n{measured_on()}\n<!-- /{marker} -->")
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    between = re.compile(f"<!-- {marker} -->.*<!-- /{marker} -->", flags=re.DOTALL)
    text = between.sub(lambda _: section, text) if between.search(text) else text.rstrip("\n") + "\n\n" + section
    BENCHMARKS.write_text(text + ("" if text.endswith("\n") else "\n"))


def embedded_load(sessions: int, series: int) -> LoadReport:
    """The load on the embedded stack of this machine's home (started if it is not running)."""
    stack = LocalStack(home_folder())
    state = stack.start()
    with (
        stack.connected(state),
        tempfile.TemporaryDirectory() as folder,
        database_of_its_own("load") as (database, name),
    ):
        marker = Path(folder) / "callbacks"
        return run_load(in_session_target(database, name, state.processes, Path(folder), marker),
                        sessions, series, marker)


def scaled_loads(in_session_sessions: int, routed_sessions: int, series: int) -> tuple[LoadReport, LoadReport]:
    """On a scaled stack and two worker hosts of its own (removed afterwards), both taking sessions: the
    embedded shape's load (jobs in their sessions' processes), then `routed_sessions` patients whose series
    each have one job on each host (`series` jobs per session in all)."""
    wheelhouse = build_wheelhouse(Path(__file__).resolve().parents[1] / ".dcm-flows" / "wheelhouse")
    with tempfile.TemporaryDirectory() as folder, worker_hosts(Path(folder) / "scaled", wheelhouse) as scaled:
        with database_of_its_own("load") as (database, name):
            marker = Path(folder) / "in-session"
            target = in_session_target(database, name, hosts_processes(scaled), Path(folder), marker)
            in_session = run_load(target, in_session_sessions, series, marker)
        print(json.dumps(asdict(in_session), indent=2), flush=True)
        with database_of_its_own("load") as (database, name):
            marker = Path(folder) / "routed"
            target = routed_target(scaled, database, name, Path(folder), marker)
            return in_session, run_load(target, routed_sessions, series // 2, marker)


def healthy(report: LoadReport) -> bool:
    lost_or_twice = (report.jobs_not_done, report.callbacks_run_twice, report.callbacks_missing,
                     report.callbacks_on_another_host)
    return lost_or_twice == (0, 0, 0, 0) and report.sessions_completed == report.sessions


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--sessions", type=int, default=5, help="patients whose jobs run in their sessions")
    arguments.add_argument("--routed-sessions", type=int, default=10,
                           help="patients on the scaled stack whose jobs are spread over its two hosts")
    arguments.add_argument("--series", type=int, default=50, help="jobs of a session (not counting pre and post)")
    arguments.add_argument("--shape", choices=["both", "embedded", "scaled"], default="both",
                           help="only one stack: its figures are printed, docs/benchmarks.md is left as it is")
    options = arguments.parse_args(argv)
    if options.shape != "embedded" and os.geteuid() != 0:
        arguments.error("the scaled stack's worker hosts are network namespaces, which only root can make: run as "
                        "root, or with --shape embedded")
    shape = f"{options.sessions} x {options.series}"
    runs = []
    if options.shape in ("both", "embedded"):
        runs.append(LoadRun(f"embedded, {shape}", "1, in its session", embedded_load(options.sessions, options.series)))
        print(json.dumps(asdict(runs[-1].report), indent=2), flush=True)
    if options.shape in ("both", "scaled"):
        in_session, routed = scaled_loads(options.sessions, options.routed_sessions, options.series)
        runs += [LoadRun(f"scaled, {shape}", "1, in its session", in_session),
                 LoadRun(f"scaled, {options.routed_sessions} x {options.series} over two hosts",
                         "2, one on each host", routed)]
        print(json.dumps(asdict(routed), indent=2), flush=True)
    if options.shape == "both":
        write_benchmarks(markdown(runs), "load")
        print(f"written to {BENCHMARKS}")
    return 0 if all(healthy(run.report) for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
