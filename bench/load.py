"""Load: many patients' sessions at once on the embedded stack's one process worker.

`make load` stores 5 patients of 50 one-image series each, lets the platform's scheduler make their
sessions (each series gets one job of a trivial service, plus the pre- and post-services jobs), submits
all sessions at the same moment and waits. It checks that every job record is done and that every
callback ran exactly once (each appends its job id to a file), samples the memory of the worker and of
the flow-run processes it started, and writes the figures into docs/benchmarks.md.
`tests/test_faults.py` runs the same at a smaller size.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from bench.components import database_of_its_own, service_component
from blocks.database import DcmDatabase
from blocks.host import home_folder
from flows.runtime.components import Component, register_service
from flows.runtime.platform_records import PlatformRecords
from flows.submit import submit_session, wait_for_run
from ops.demo import schedule_stable_patient, upload_example_patient
from ops.stack import LocalStack

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SAMPLE_SECONDS = 0.5

TRIVIAL_SERVICE = '''
import os


def touch(session_id, job_name, headers, params, added_params, **kwargs):
    with open(params["marker"], "a") as marker:
        marker.write(os.environ["DCM-PROCESSOR-SERVICE-JOB-ID"] + "\\n")
    return 1
'''


@dataclass(frozen=True)
class LoadReport:
    sessions: int
    jobs: int
    wall_seconds: float
    jobs_per_minute: float
    worker_peak_rss_mb: float
    flow_runs_peak_pss_mb: float
    peak_flow_run_processes: int
    sessions_completed: int
    jobs_not_done: int
    callbacks_run_twice: int
    callbacks_missing: int


def trivial_component(folder: Path, marker: Path) -> Component:
    """A service whose one series job appends its job id to `marker`."""
    return service_component(folder, "load-touch", TRIVIAL_SERVICE, [
        {"jobName": "touch", "workerEntry": "touch", "events": ["stable-series"], "params": {"marker": str(marker)}},
    ])


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


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found.extend(children)
        frontier.extend(children)
    return found


class MemorySampler(threading.Thread):
    """Samples the worker's RSS, and the summed PSS of the flow-run processes: those below the worker (the
    job commands it starts) and below the warm engine (the runs it forks, and their callbacks)."""

    def __init__(self, worker_pid: int, warm_engine_pid: int) -> None:
        super().__init__(daemon=True)
        self.worker_pid = worker_pid
        self.warm_engine_pid = warm_engine_pid
        self.worker_peak = 0.0
        self.flow_runs_peak = 0.0
        self.processes_peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_SECONDS):
            children = descendants(self.worker_pid) + descendants(self.warm_engine_pid)
            self.worker_peak = max(self.worker_peak, _rss_mb(self.worker_pid))
            self.flow_runs_peak = max(self.flow_runs_peak, sum(_pss_mb(child) for child in children))
            self.processes_peak = max(self.processes_peak, len(children))


def run_load(database: DcmDatabase, database_block: str, processes: dict[str, int], sessions: int, series: int,
             folder: Path, timeout_seconds: float = 3600) -> LoadReport:
    """Schedule `sessions` patients of `series` series each, run all their sessions at once, check them."""
    records = PlatformRecords(database.open())
    marker = folder / "callbacks"
    register_service(records, trivial_component(folder / "component", marker))
    session_ids = []
    for number in range(sessions):
        upload_example_patient(database, patient_id=f"LOAD-{number}", series=series, instances=1)
        session_ids.append(schedule_stable_patient(database, records))
    job_ids = [job.id for session_id in session_ids for job in records.session_jobs(session_id)
               if job.service_name == "load-touch"]
    sampler = MemorySampler(processes["process-worker"], processes["warm-engine"])
    sampler.start()
    started = time.monotonic()
    runs = [submit_session(session_id, database_block=database_block) for session_id in session_ids]
    finals = [wait_for_run(run_id, timeout_seconds=timeout_seconds, poll_seconds=1) for run_id in runs]
    wall = time.monotonic() - started
    sampler.stopped.set()
    sampler.join()
    calls = Counter(marker.read_text().split()) if marker.exists() else Counter()
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
        callbacks_run_twice=sum(1 for count in calls.values() if count > 1),
        callbacks_missing=sum(1 for job_id in job_ids if job_id not in calls),
    )


def markdown(report: LoadReport, series: int) -> str:
    rows = [
        ("sessions submitted at once", report.sessions),
        ("series per patient (one trivial job each)", series),
        ("job records (with pre- and post-services)", report.jobs),
        ("sessions completed", report.sessions_completed),
        ("jobs not done / callbacks run twice / missing",
         f"{report.jobs_not_done} / {report.callbacks_run_twice} / {report.callbacks_missing}"),
        ("wall time", f"{report.wall_seconds} s"),
        ("throughput", f"{report.jobs_per_minute} jobs/min"),
        ("process worker, peak RSS", f"{report.worker_peak_rss_mb} MB"),
        ("flow-run processes (job commands, runs, callbacks), peak summed PSS", f"{report.flow_runs_peak_pss_mb} MB"),
        ("processes below the worker at once, peak", report.peak_flow_run_processes),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        "<!-- load -->\n## Load: concurrent sessions on one process worker\n\n"
        "`make load` (bench/load.py) on this 2-core machine, embedded stack (SecantusDB, Prefect server on "
        "SQLite), at most 3 sessions at once (their queue's limit), `max_parallel_jobs` 4 per session, jobs in "
        "the session's process:\n\n| | |\n|---|---|\n" + table + "\n<!-- /load -->"
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


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--sessions", type=int, default=5)
    arguments.add_argument("--series", type=int, default=50)
    options = arguments.parse_args(argv)
    stack = LocalStack(home_folder())
    state = stack.start()
    with (
        stack.connected(state),
        tempfile.TemporaryDirectory() as folder,
        database_of_its_own("load") as (database, name),
    ):
        report = run_load(database, name, state.processes, options.sessions, options.series, Path(folder))
    print(json.dumps(asdict(report), indent=2))
    write_benchmarks(markdown(report, options.series), "load")
    print(f"written to {BENCHMARKS}")
    healthy = report.jobs_not_done == report.callbacks_run_twice == report.callbacks_missing == 0
    return 0 if healthy and report.sessions_completed == report.sessions else 1


if __name__ == "__main__":
    sys.exit(main())
