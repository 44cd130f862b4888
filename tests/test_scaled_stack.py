"""The scaled stack (ops/scaled_stack.py): Prefect on PostgreSQL and Redis, two API servers behind haproxy, its
background services apart; sessions of real DICOM run through it as through the embedded stack, and survive
one API server's end."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker

from bench.components import database_of_its_own, service_component
from blocks.database import DcmDatabase
from flows.runtime.components import register_service
from flows.runtime.platform_records import PlatformRecords
from flows.submit import submit_session, wait_for_run
from ops.demo import schedule_stable_patient, upload_example_patient
from ops.scaled_stack import API_SERVERS, PREFECT_DATABASE, PREFECT_ROLE, ScaledStack, postgres_program
from ops.stack import StackState

pytestmark = [pytest.mark.integration, pytest.mark.scaled]

SERVICE = '''
import os
import time


def work(session_id, job_name, headers, params, added_params, **kwargs):
    with open(params["starts"], "a") as starts:
        starts.write(os.environ["DCM-PROCESSOR-SERVICE-JOB-ID"] + "\\n")
    time.sleep(params["seconds"])
    return os.getpid()
'''


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ScaledStack, StackState]]:
    stack = ScaledStack(tmp_path_factory.mktemp("scaled"))
    try:
        state = stack.start()
        with stack.connected(state):
            yield stack, state
            APILogWorker.drain_all()
            EventsWorker.drain_all()
    finally:
        stack.purge()


def prefect_rows(stack: ScaledStack, state: StackState, table: str) -> int:
    """Rows of a table of Prefect's database, read from PostgreSQL."""
    answer = subprocess.run(
        [postgres_program("psql"), "-h", "127.0.0.1", "-p", str(state.ports["postgres"]), "-U", PREFECT_ROLE,
         "-d", PREFECT_DATABASE, "-tAc", f"SELECT count(*) FROM {table}"],
        env={**os.environ, "PGPASSWORD": (stack.home / "postgres-password").read_text()},
        capture_output=True, text=True, check=True,
    )
    return int(answer.stdout)


@pytest.fixture
def database(scaled: tuple[ScaledStack, StackState]) -> Iterator[tuple[DcmDatabase, str]]:
    """A platform database of the test's own on the scaled stack's SecantusDB, and the block of its name."""
    with database_of_its_own("scaled") as own:
        yield own


def session_of(database: DcmDatabase, folder: Path, series: int, seconds: float) -> str:
    """A scheduled session of `series` series, each with one job of a service that takes `seconds`."""
    records = PlatformRecords(database.open())
    register_service(records, service_component(folder / "component", f"scaled-{folder.name}", SERVICE, [{
        "jobName": "work", "workerEntry": "work", "events": ["stable-series"],
        "params": {"starts": str(folder / "starts"), "seconds": seconds},
    }]))
    upload_example_patient(database, patient_id=f"SCALED-{folder.name}", series=series, instances=1)
    return schedule_stable_patient(database, records)


def test_a_session_runs_through_two_api_servers_on_postgresql_with_the_services_apart(
    scaled: tuple[ScaledStack, StackState], database: tuple[DcmDatabase, str], tmp_path: Path
) -> None:
    (stack, state), (platform_database, block) = scaled, database
    runs_before = prefect_rows(stack, state, "flow_run")

    session_id = session_of(platform_database, tmp_path, series=3, seconds=0.2)
    final = wait_for_run(submit_session(session_id, block), timeout_seconds=300)

    assert final.state is not None and final.state.is_completed(), final.state
    assert all(job["done"] for job in platform_database.open().db.get_db()["jobs"].find({"sessionId": session_id}))
    assert prefect_rows(stack, state, "flow_run") >= runs_before + 6
    assert all(state.is_ours(name) for name in (*API_SERVERS, "prefect-services", "load-balancer", "redis"))
    connections = stack.connections_per_api_server()
    assert set(connections) == set(API_SERVERS) and all(connections.values()), connections


def run_while(stack: ScaledStack, state: StackState, database: tuple[DcmDatabase, str], folder: Path,
              fault: Callable[[], None], repair: Callable[[], None] = lambda: None) -> str:
    """Run a session of six 2-second jobs, with `fault` done once the first callback has started and `repair`
    once the session's run has ended; return the session's id once the checks below have passed."""
    platform_database, block = database
    session_id = session_of(platform_database, folder, series=6, seconds=2.0)

    flow_run_id = submit_session(session_id, block)
    deadline = time.monotonic() + 120
    while not (folder / "starts").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    fault()
    try:
        final = wait_for_run(flow_run_id, timeout_seconds=300)
    finally:
        repair()

    assert final.state is not None and final.state.is_completed(), final.state
    jobs = list(platform_database.open().db.get_db()["jobs"].find({"sessionId": session_id}))
    assert len(jobs) == 8 and all(job["done"] for job in jobs)
    assert len((folder / "starts").read_text().split()) == 6, "a callback ran twice"
    with get_client(sync_client=True) as client:
        assert client.api_healthcheck() is None
    return session_id


def test_a_session_completes_when_one_api_server_ends_in_its_middle(
    scaled: tuple[ScaledStack, StackState], database: tuple[DcmDatabase, str], tmp_path: Path
) -> None:
    stack, state = scaled

    run_while(stack, state, database, tmp_path, fault=lambda: stack.stop_api_server(state, API_SERVERS[0]),
              repair=lambda: stack.start_api_server(state, API_SERVERS[0]))


@pytest.mark.parametrize("service", ["postgres", "redis"])
def test_a_session_completes_when_postgresql_or_redis_restarts_in_its_middle(
    scaled: tuple[ScaledStack, StackState], database: tuple[DcmDatabase, str], tmp_path: Path, service: str
) -> None:
    stack, state = scaled
    restart = {"postgres": stack.restart_postgres, "redis": stack.restart_redis}[service]

    run_while(stack, state, database, tmp_path, fault=lambda: restart(state))


def test_a_session_completes_when_postgresql_is_down_for_seconds_in_its_middle(
    scaled: tuple[ScaledStack, StackState], database: tuple[DcmDatabase, str], tmp_path: Path
) -> None:
    """While PostgreSQL refuses connections, Prefect's API servers answer 500 (not 503): the runs' clients must
    ride that out as they ride out a restart."""
    stack, state = scaled

    run_while(stack, state, database, tmp_path, fault=lambda: stack.restart_postgres(state, down_seconds=6))


def test_a_second_stack_connected_for_a_while_leaves_later_processes_pointed_at_the_first(tmp_path: Path) -> None:
    first, second = ScaledStack(tmp_path / "first"), ScaledStack(tmp_path / "second")
    first_state = StackState("mongodb://10.0.0.1:1", "http://10.0.0.1:1/api", "http://10.0.0.1:1")
    second_state = StackState("mongodb://10.0.0.2:2", "http://10.0.0.2:2/api", "http://10.0.0.2:2")

    with first.connected(first_state):
        with second.connected(second_state):
            assert os.environ["PREFECT_API_URL"] == second_state.api_url
        inherited = subprocess.run(["sh", "-c", "echo $PREFECT_API_URL $PREFECT_HOME"], capture_output=True,
                                   text=True, check=True).stdout.split()

    assert inherited == [first_state.api_url, str(first.home / "prefect")]
