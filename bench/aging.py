"""Aging: does a long-lived embedded stack stay fast and small?

`make aging` starts an embedded stack of its own and runs `--jobs` jobs through it in `make load`'s concurrent
sessions. Then it measures two rows of `make bench` on it (one job at a time inside a 10-job session, and a
50-job session against its critical path), how long the Prefect server stays busy and its CPU at rest. Then a
month passes: the Prefect server is stopped, every timestamp of its database is moved back by the flow-run
retention period and a day, and the server starts again with its vacuum pass due every few seconds instead of
every hour (the retention periods are the stack's own). Once the pass has deleted what it deletes, it measures
again. Both times a fresh stack, started beside it once the jobs have run, is the baseline, measured in rounds
that alternate with the aging stack's. The size of the Prefect database (file, pages in use,
rows per table) is read at each step. The figures go into docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.components import database_of_its_own
from bench.load import (
    cpu_seconds,
    descendants,
    in_session_target,
    machine_busy_seconds,
    run_load,
    write_benchmarks,
)
from bench.overhead import Bench, fresh_stack
from ops.stack import FLOW_RUN_RETENTION_DAYS, LocalStack, StackState

SERIES_PER_SESSION = 50
SESSIONS_PER_ROUND = 5
REST_SECONDS = 30
VACUUM_LOOP_SECONDS = 5
VACUUM_LOOPS = ("PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS",
                "PREFECT_SERVER_SERVICES_DB_VACUUM_ORPHAN_CLEANUP_LOOP_SECONDS")
QUIET_SHARE = 0.3
FRESH = "a fresh stack"

COUNTED_TABLES = ("flow_run", "task_run", "flow_run_state", "task_run_state", "log", "artifact", "events",
                  "event_resources")

AGED_COLUMNS = {
    "flow_run": ("created", "updated", "expected_start_time", "next_scheduled_start_time", "start_time", "end_time"),
    "flow_run_state": ("created", "updated", "timestamp"),
    "task_run": ("created", "updated", "expected_start_time", "next_scheduled_start_time", "start_time", "end_time"),
    "task_run_state": ("created", "updated", "timestamp"),
    "log": ("created", "updated", "timestamp"),
    "artifact": ("created", "updated"),
    "events": ("created", "updated", "occurred", "received"),
    "event_resources": ("created", "updated", "occurred"),
}
"""The timestamps a month's passing makes old: everything Prefect's retention compares, and the rest of each
row's times with them, so that the aged rows are what a month-old run would have left."""


@dataclass(frozen=True)
class Speed:
    """`make bench`'s rows 2 and 3 on one stack at one moment, and its Prefect server's CPU at rest."""

    per_job_seconds: float
    session_seconds: float
    critical_path_seconds: float
    busy_seconds: float
    at_rest: dict[str, float]


@dataclass(frozen=True)
class Size:
    """The Prefect database's size: its files, the bytes of the pages in use, and the rows that grow."""

    file_mb: float
    used_mb: float
    rows: dict[str, int]


def prefect_database(stack: LocalStack) -> Path:
    return stack.home / "prefect" / "prefect.db"


def size_of(database: Path) -> Size:
    """Read the database's size without writing to it (a read-only connection beside the running server)."""
    files = sum(path.stat().st_size for path in database.parent.glob(database.name + "*"))
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        page_size, pages, free = (connection.execute(f"PRAGMA {name}").fetchone()[0]
                                  for name in ("page_size", "page_count", "freelist_count"))
        rows = {table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in COUNTED_TABLES}
    return Size(file_mb=files / 1e6, used_mb=(pages - free) * page_size / 1e6, rows=rows)


def cpu_at_rest(state: StackState, seconds: float = REST_SECONDS) -> dict[str, float]:
    """Each service's share of one core (with the processes it started) while nothing is submitted, and the
    whole machine's, which counts whatever else runs on it."""
    def totals() -> dict[str, float]:
        return {"machine": machine_busy_seconds(), **{
            name: sum(cpu_seconds(pid, with_reaped_children=False) for pid in [root, *descendants(root)])
            for name, root in state.processes.items()}}

    before = totals()
    time.sleep(seconds)
    after = totals()
    return {name: (after[name] - before.get(name, after[name])) / seconds for name in after}


def speed_of(bench: Bench, repeats: int) -> Speed:
    """Rows 2 and 3 of `make bench`, as bench/overhead.py measures them, once the server has caught up with
    what came before (how long that took), and the server's CPU at rest."""
    busy_seconds = wait_until_quiet(bench.state)
    at_rest = cpu_at_rest(bench.state)
    alone = [bench.session_run(4, True, max_parallel_jobs=1) for _ in range(repeats)]
    sessions = [bench.session_run(24, True) for _ in range(repeats)]
    return Speed(
        per_job_seconds=statistics.median((sample.run_seconds - sample.callbacks_sum) / 10 for sample in alone),
        session_seconds=statistics.median(sample.run_seconds for sample in sessions),
        critical_path_seconds=statistics.median(sample.critical_path for sample in sessions),
        busy_seconds=busy_seconds,
        at_rest=at_rest,
    )


def run_jobs(stack_state: StackState, jobs: int, folder: Path) -> tuple[int, int, float]:
    """Run at least `jobs` job records through rounds of concurrent sessions, each round in a database of its
    own; return (job records, of them not done, callbacks run twice or missing), and the jobs per minute."""
    done = not_done = wrong = 0
    started = time.monotonic()
    while done < jobs:
        with database_of_its_own("aging") as (database, name):
            (folder / name).mkdir()
            marker = folder / name / "callbacks"
            target = in_session_target(database, name, stack_state.processes, folder / name, marker)
            report = run_load(target, SESSIONS_PER_ROUND, SERIES_PER_SESSION, marker)
        done += report.jobs
        not_done += report.jobs_not_done
        wrong += report.callbacks_run_twice + report.callbacks_missing
        print(f"  {done} jobs, {report.jobs_per_minute} jobs/min this round, {report.jobs_not_done} not done, "
              f"{report.callbacks_run_twice} run twice, {report.callbacks_missing} missing", flush=True)
    return done, not_done + wrong, done / (time.monotonic() - started) * 60


def age_by(database: Path, days: int) -> None:
    """Move every timestamp of `AGED_COLUMNS` back by `days` (the server must be stopped). Runs still to come
    (the reconciler's schedule) keep their times: moved back, they would all be due at once."""
    with sqlite3.connect(database) as connection:
        for table, columns in AGED_COLUMNS.items():
            present = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
            ended = " AND state_type IN ('COMPLETED', 'FAILED', 'CANCELLED', 'CRASHED')" if table == "flow_run" else ""
            for column in (column for column in columns if column in present):
                connection.execute(
                    f"UPDATE {table} SET {column} = datetime({column}, '-{days} days') || substr({column}, 20) "
                    f"WHERE {column} IS NOT NULL{ended}"
                )


def aged_rows(database: Path) -> int:
    """Ended runs and events older than a day: after `age_by`, what the retention pass has still to delete
    (the logs and artifacts of a run go with it)."""
    day_ago = "datetime('now', '-1 day')"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return sum(connection.execute(query).fetchone()[0] for query in (
            f"SELECT count(*) FROM flow_run WHERE end_time < {day_ago}",
            f"SELECT count(*) FROM events WHERE occurred < {day_ago}",
        ))


def retention_pass(stack: LocalStack, state: StackState, timeout_seconds: float = 1800) -> float:
    """Restart the server with its vacuum due every few seconds; wait until nothing aged is left. Return the
    seconds it took."""
    stack.stop_server(state)
    age_by(prefect_database(stack), FLOW_RUN_RETENTION_DAYS + 1)
    os.environ.update(dict.fromkeys(VACUUM_LOOPS, str(VACUUM_LOOP_SECONDS)))
    started = time.monotonic()
    try:
        stack.start_server(state)
        while aged_rows(prefect_database(stack)) and time.monotonic() - started < timeout_seconds:
            time.sleep(5)
        took = time.monotonic() - started
    finally:
        for loop in VACUUM_LOOPS:
            del os.environ[loop]
    stack.restart_server(state)
    return took


def wait_until_quiet(state: StackState, share: float = QUIET_SHARE, timeout_seconds: float = 900) -> float:
    """Wait until the Prefect server uses less than `share` of a core over 10 s; return the seconds waited."""
    started = time.monotonic()
    while cpu_at_rest(state, 10)["prefect-server"] >= share and time.monotonic() - started < timeout_seconds:
        pass
    return time.monotonic() - started


FIGURES: dict[str, tuple[Callable[[Speed], float], str]] = {
    "one job at a time in a 10-job session: session run less its callbacks, per job":
        (lambda speed: speed.per_job_seconds, "{:.3f} s"),
    "50-job session run": (lambda speed: speed.session_seconds, "{:.1f} s"),
    "its critical path": (lambda speed: speed.critical_path_seconds, "{:.1f} s"),
    f"Prefect server busy (over {QUIET_SHARE * 100:.0f} % of a core) before the figures":
        (lambda speed: speed.busy_seconds, "{:.0f} s"),
}


@dataclass
class Comparison:
    """One moment of the aging stack, measured in rounds that alternate with the fresh stack beside it: the
    machine's mood changes by ±30 % within minutes, so each round's ratio compares neighbours in time."""

    aged: list[Speed] = field(default_factory=list)
    fresh: list[Speed] = field(default_factory=list)

    def cells(self, figure: Callable[[Speed], float], form: str, with_ratio: bool = True) -> list[str]:
        """The aging stack's median, the fresh stack's, and each round's ratio with their median."""
        medians = [form.format(statistics.median(map(figure, self.aged))),
                   form.format(statistics.median(map(figure, self.fresh)))]
        if not with_ratio:
            return [*medians, ""]
        ratios = [figure(aged) / figure(fresh) if figure(fresh) else float("nan")
                  for aged, fresh in zip(self.aged, self.fresh, strict=True)]
        each_round = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        return [*medians, f"**{statistics.median(ratios):.2f}x** ({each_round})"]


def markdown(aging: Aging) -> str:
    header = ("| | " + " | ".join(f"{label} | {FRESH} | ratio (each round)" for label in aging.comparisons)
              + " |\n|---|" + "---|---|---|" * len(aging.comparisons) + "\n")

    def row(name: str, values: list[str]) -> str:
        return f"| {name} | " + " | ".join(values) + " |"

    comparisons = list(aging.comparisons.values())
    services = comparisons[0].fresh[0].at_rest
    speed_rows = [
        *(row(name, [cell for comparison in comparisons for cell in comparison.cells(figure, form)])
          for name, (figure, form) in FIGURES.items()),
        *(row(f"at rest over {REST_SECONDS} s, share of a core: {name}",
              [cell for comparison in comparisons for cell in comparison.cells(
                  lambda speed, name=name: speed.at_rest.get(name, 0) * 100, "{:.0f} %", with_ratio=False)])
          for name in services),
    ]
    sizes = aging.sizes
    size_header = "| | " + " | ".join(sizes) + " |\n|---|" + "---|" * len(sizes) + "\n"
    size_rows = [
        row("Prefect database: files", [f"{size.file_mb:.0f} MB" for size in sizes.values()]),
        row("Prefect database: pages in use", [f"{size.used_mb:.0f} MB" for size in sizes.values()]),
        *(row(f"rows of `{table}`", [f"{size.rows[table]:,}" for size in sizes.values()]) for table in COUNTED_TABLES),
    ]
    return (
        "<!-- aging -->\n## A long-lived stack (`make aging`)\n\n"
        f"bench/aging.py: one embedded stack after {aging.jobs:,} job records in rounds of {SESSIONS_PER_ROUND} "
        f"concurrent {SERIES_PER_SESSION}-series sessions ({aging.jobs_per_minute:.0f} jobs/min, {aging.failures} "
        "jobs not done, run twice or missing), and a month later: every timestamp of Prefect's database moved back "
        f"{FLOW_RUN_RETENTION_DAYS + 1} days, then the server's own vacuum pass with the stack's retention periods "
        f"(it took {aging.retention_pass_seconds:.0f} s). A fresh stack, started once the jobs had run, runs beside "
        f"it; at each moment the two are measured in {aging.rounds} alternating rounds (each figure of a round the "
        "median of its runs), and the ratio of each round compares neighbours in time.\n\n"
        + header + "\n".join(speed_rows) + "\n\n" + size_header + "\n".join(size_rows) + "\n<!-- /aging -->"
    )


@contextmanager
def bench_on(stack: LocalStack, state: StackState, folder: Path) -> Iterator[Bench]:
    """bench/overhead.py's Bench on `stack`, with a platform database of its own on the stack's database server
    (saved as a block of the stack's Prefect server)."""
    with stack.connected(state), database_of_its_own("aging-bench") as (database, name):
        yield Bench(database, name, folder / name, stack, state)


@dataclass
class Aging:
    """What one stack went through: the jobs run on it, its speed beside a fresh stack's and its size at each
    moment."""

    rounds: int
    repeats: int
    jobs: int = 0
    failures: int = 0
    jobs_per_minute: float = 0.0
    retention_pass_seconds: float = 0.0
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    sizes: dict[str, Size] = field(default_factory=dict)

    def compare(self, label: str, aged: Bench, fresh: Bench) -> None:
        """Measure the aging stack and the fresh one in alternating rounds; read the aging stack's size."""
        self.sizes[label] = size_of(prefect_database(aged.stack))
        comparison = self.comparisons[label] = Comparison()
        for _ in range(self.rounds):
            for bench, speeds in ((aged, comparison.aged), (fresh, comparison.fresh)):
                with bench.stack.connected(bench.state):
                    speeds.append(speed_of(bench, self.repeats))
            print(label, comparison.aged[-1], comparison.fresh[-1], flush=True)


def age(folder: Path, jobs: int, aging: Aging) -> None:
    """Run `jobs` jobs on a stack; start a fresh one beside it and compare them; let a month pass and the
    retention pass run on the aged stack; compare them again."""
    with fresh_stack(folder / "aging-stack") as (stack, state):
        aging.jobs, aging.failures, aging.jobs_per_minute = run_jobs(state, jobs, folder)
        with fresh_stack(folder / "fresh-stack") as (fresh, fresh_state), \
                bench_on(stack, state, folder) as aged_bench, bench_on(fresh, fresh_state, folder) as fresh_bench:
            aging.compare(f"after {aging.jobs:,} jobs", aged_bench, fresh_bench)
            with stack.connected(state):
                aging.retention_pass_seconds = retention_pass(stack, state)
            aging.compare("a month later, after the retention pass", aged_bench, fresh_bench)
            aging.sizes[FRESH] = size_of(prefect_database(fresh))


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--jobs", type=int, default=5000, help="job records to run on the aging stack")
    arguments.add_argument("--rounds", type=int, default=3, help="alternating rounds at each moment")
    arguments.add_argument("--repeats", type=int, default=2, help="runs of each figure in a round")
    arguments.add_argument("--no-write", action="store_true", help="print the table only")
    options = arguments.parse_args(argv)
    aging = Aging(rounds=options.rounds, repeats=options.repeats)
    with tempfile.TemporaryDirectory() as folder:
        age(Path(folder), options.jobs, aging)
    section = markdown(aging)
    print(section)
    if not options.no_write:
        write_benchmarks(section, "aging")
    return 0 if aging.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
