"""Issue 20's target 5: a session on stock Prefect and on the embedded stack, each beside the seed's runtime.

Stock Prefect is what a user who follows Prefect's own docs runs: `prefect server start` as shipped (SQLite,
transactions begun DEFERRED, Prefect's default settings) and Prefect's process worker
(`prefect worker start --pool dcm-process --type process`, polling every 10 s, a fresh interpreter per run),
with this project's deployments and set-up. Each round runs one session of `series` one-job series (plus pre-
and post-services: 22 jobs for 20 series) on the seed's runtime (bench/seed.py) and then the same shape of
session on the stack, both on the stack's SecantusDB, each in a database of its own; the ratio of each pair
is the target's figure, and its spread over the rounds says whether it holds every time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from prefect.events.worker import EventsWorker
from prefect.workers.process import ProcessWorker

from bench.components import database_of_its_own
from bench.load import trivial_component
from bench.seed import SEED_DEVICE, seed_environment, seed_worker
from blocks.database import DcmDatabase
from flows.runtime.components import register_service
from flows.runtime.names import PROCESS_POOL
from flows.runtime.platform_records import PlatformRecords
from flows.submit import submit_session, wait_for_run
from ops.demo import schedule_stable_patient, upload_example_patient
from ops.stack import LocalStack, StackState, _executable
from ops.warm_engine import SOCKET_VARIABLE

TUNED_SETTINGS = ("PREFECT_WORKER_QUERY_SECONDS", "PREFECT_LOGGING_TO_API_BATCH_INTERVAL")
"""The embedded stack's own settings for its workers and runs, which a stock set-up leaves at Prefect's defaults."""


class StockStack(LocalStack):
    """The embedded stack's database and deployments under stock Prefect: `prefect server start` as shipped
    and Prefect's process worker, without the warm engine."""

    def _prefect_environment(self, api_url: str | None = None) -> dict[str, str]:
        environment = super()._prefect_environment(api_url)
        return {name: value for name, value in environment.items() if name not in TUNED_SETTINGS}

    def _spawn_server(self, state: StackState) -> None:
        self._spawn(state, "prefect-server", [
            _executable("prefect"), "server", "start", "--host", "127.0.0.1",
            "--port", str(urlsplit(state.api_url).port),
        ], {**self._prefect_environment(), "PREFECT_UI_API_URL": state.api_url, "PREFECT_UI_URL": state.ui_url,
            "PREFECT_SERVER_API_AUTH_STRING": self.api_auth()})

    def start_workers(self, state: StackState, process_worker_type: str = ProcessWorker.type) -> None:
        if not state.is_ours("process-worker"):
            environment = self.worker_environment(state)
            environment.pop(SOCKET_VARIABLE)
            self._spawn(state, "process-worker", [
                _executable("prefect"), "worker", "start", "--pool", PROCESS_POOL, "--type", process_worker_type,
            ], environment)
        self._save(state)


@dataclass(frozen=True)
class Pair:
    """One round: the same shape of session on the seed's runtime and on the stack, in seconds."""

    seed: float
    stack: float

    @property
    def ratio(self) -> float:
        return self.stack / self.seed


class Sessions:
    """Sessions of one shape, made by the platform's scheduler in one database: pre-services, `series` series of
    one trivial job each, post-services; for `device_id`'s host (the seed's worker claims only its own)."""

    def __init__(self, database: DcmDatabase, folder: Path, series: int, device_id: str | None) -> None:
        self.database = database
        self.records = PlatformRecords(database.open())
        self.series = series
        self.device_id = device_id
        self.patients = 0
        register_service(self.records, trivial_component(folder / "component", folder / "callbacks"))

    def scheduled(self) -> str:
        self.patients += 1
        upload_example_patient(self.database, patient_id=f"STOCK-{self.patients}", series=self.series, instances=1)
        return schedule_stable_patient(self.database, self.records, device_id=self.device_id)


def stack_session_seconds(sessions: Sessions, block: str) -> float:
    """Trigger to end of one session run on the connected stack."""
    session_id = sessions.scheduled()
    triggered = time.time()
    final = wait_for_run(submit_session(session_id, block), timeout_seconds=1800, poll_seconds=0.2)
    assert final.state is not None and final.state.is_completed(), final.state
    assert final.end_time is not None
    return final.end_time.timestamp() - triggered


def measure_pairs(stack: LocalStack, folder: Path, rounds: int, series: int) -> list[Pair]:
    """`rounds` pairs of sessions on a fresh `stack`: the seed's runtime first (its worker started for the
    session and stopped after it, so that its polling does not weigh on the stack's session), then the stack."""
    program = seed_environment()
    state = stack.start()
    try:
        with stack.connected(state), database_of_its_own("seed") as (seed_database, _), \
                database_of_its_own("stock") as (database, block):
            seed_sessions = Sessions(seed_database, folder / "seed", series, SEED_DEVICE)
            stack_sessions = Sessions(database, folder / "stack", series, None)
            pairs = []
            for _ in range(rounds):
                with seed_worker(program, seed_database, folder / "seed") as seed:
                    session_id = seed_sessions.scheduled()
                    seed_seconds = seed.session_seconds(session_id, since=time.time())
                pairs.append(Pair(seed_seconds, stack_session_seconds(stack_sessions, block)))
                print(f"  {type(stack).__name__}: seed {pairs[-1].seed:.1f} s, stack {pairs[-1].stack:.1f} s, "
                      f"{pairs[-1].ratio:.2f}x", flush=True)
            EventsWorker.drain_all()
            return pairs
    finally:
        stack.stop()


def row(name: str, pairs: list[Pair]) -> str:
    """The table row of one stack: medians of both sides, the ratio's median and spread, the target's verdict."""
    ratios = [pair.ratio for pair in pairs]
    return (f"| {name} | {statistics.median(pair.stack for pair in pairs):.1f} s "
            f"| {statistics.median(pair.seed for pair in pairs):.1f} s | {statistics.median(ratios):.2f}x "
            f"| {min(ratios):.2f}x-{max(ratios):.2f}x | {len(pairs)} | {'yes' if max(ratios) <= 0.5 else 'no'} |")


def measure_stock(folder: Path, rounds: int, series: int) -> str:
    """The stock row and the embedded stack's, each of `rounds` pairs; the markdown section."""
    stock = measure_pairs(StockStack(folder / "stock-stack"), folder / "stock", rounds, series)
    embedded = measure_pairs(LocalStack(folder / "embedded-stack"), folder / "embedded", rounds, series)
    jobs = series + 2
    return (
        "<!-- stock -->\n## Stock Prefect against the seed's runtime (`make bench`)\n\n"
        f"bench/stock.py: a session of {jobs} jobs (pre-services, {series} one-job series of a trivial callback, "
        "post-services), trigger to end, on stock Prefect (`prefect server start` as shipped, on SQLite, and "
        "Prefect's process worker, `--type process`, with Prefect's default settings and this project's "
        "deployments) and on the embedded stack; each session right after one of the same shape on the seed's "
        "runtime (dcm-processor-worker under one mongo-qas worker with dcm-processor 2.0.1's flags, already "
        "running; from the end of scheduling to its last job's recorded completion) on the same database server. "
        "The target (issue 20, target 5): the stock row at most 0.5x the seed in every pair.\n\n"
        "| | session, median | seed, median | ratio, median | ratio, min-max | pairs | at most 0.5x every time |\n"
        "|---|---|---|---|---|---|---|\n"
        + row("stock Prefect", stock) + "\n" + row("embedded stack", embedded) + "\n<!-- /stock -->"
    )
