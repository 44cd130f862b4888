"""Worker hosts as network peers (ops/network_hosts.py) of the scaled stack: each host holds the environments
installed on it, and a session's jobs run on the host that holds theirs."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.states import Scheduled

from bench.components import database_of_its_own, service_component, venv_worker
from bench.load import routed_target, run_load
from blocks.database import DcmDatabase
from flows.runtime.platform_records import PlatformRecords
from flows.submit import submit_install, submit_session, wait_for_run
from ops.demo import schedule_stable_patient, upload_example_patient
from ops.network_hosts import BRIDGE_ADDRESS, WorkerHosts, worker_hosts
from tests.conftest import eventually, read_flow_run, read_logs

pytestmark = [pytest.mark.integration, pytest.mark.scaled]

WHERE_AM_I = '''
import os
import socket
import time


def where(session_id, job_name, headers, params, added_params, **kwargs):
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect((params["stack"], 9))
    address = probe.getsockname()[0]
    if os.path.exists(params["hold"] + address):
        open(params["hold"] + address + ".started", "w").close()
    while os.path.exists(params["hold"] + address):
        time.sleep(0.2)
    return address
'''
HOLD = Path(tempfile.gettempdir()) / "dcm-flows-test-hold-"
"""While the file of this prefix and a host's address exists, the `where` jobs on that host do not return (and
say they started, in a file of that name and `.started`)."""


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[WorkerHosts]:
    """The scaled stack on a bridge's address, and two worker hosts on the bridge: host 1 also runs the
    sessions; the stack's own process worker is stopped, so every process run is on one of the hosts."""
    with worker_hosts(tmp_path_factory.mktemp("hosts"), wheelhouse, sessions_on=(1,)) as made:
        yield made
        APILogWorker.drain_all()
        EventsWorker.drain_all()


def venv_component(folder: Path, name: str) -> Path:
    """A component whose venv worker's job (of the component's name: the scheduler makes one job per name)
    answers with the address of the host it ran on."""
    service_component(folder, name, WHERE_AM_I, [
        {"jobName": name, "workerEntry": "where", "events": ["stable-series"],
         "params": {"stack": BRIDGE_ADDRESS, "hold": str(HOLD)}},
    ], worker=venv_worker(name),
        worker_type="venv")
    return folder


Installed = tuple[DcmDatabase, str, dict[str, str]]


@pytest.fixture(scope="module")
def installed(hosts: WorkerHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """A platform database of its own with one venv component installed on each host; the job names of the
    components, each with the address of the host that holds it."""
    folder = tmp_path_factory.mktemp("components")
    with database_of_its_own("hosts") as (database, block):
        where = {}
        for host, device_id in zip(hosts.hosts, hosts.device_ids, strict=True):
            name = f"where-{host.number}-{folder.name[-6:].replace('_', '-')}"
            component = venv_component(folder / name, name)
            installed = wait_for_run(submit_install(str(component), database_block=block,
                                                    work_queue_name=device_id), timeout_seconds=600)
            assert installed.state is not None and installed.state.is_completed(), installed.state
            where[name] = host.address
        yield database, block, where


def answers(database: DcmDatabase, session_id: str) -> dict[str, str]:
    """What each `where` job of the session answered: the address of the host it ran on."""
    jobs = database.open().db.get_db()["jobs"].find({"sessionId": session_id})
    return {job["job_name"]: job.get("result") for job in jobs if job.get("job_name", "").startswith("where-")}


def test_each_job_runs_on_the_host_its_component_was_installed_on(
    hosts: WorkerHosts, installed: Installed
) -> None:
    database, block, where = installed
    assert len(set(hosts.device_ids)) == 2, "the hosts answered the same device id"
    session_id = ready_session(database)

    final = wait_for_run(submit_session(session_id, block), timeout_seconds=300)

    assert final.state is not None and final.state.is_completed(), final.state
    assert answers(database, session_id) == where
    for host in hosts.hosts:
        assert any((host.home / "workers").iterdir()), f"{host.name} holds no environment"


def test_a_job_for_a_host_whose_worker_is_down_waits_visibly_and_runs_when_it_is_back(
    hosts: WorkerHosts, installed: Installed
) -> None:
    database, block, where = installed
    host = hosts.hosts[1]
    host.kill_everything()
    try:
        session_run = submit_session(ready_session(database), block)
        eventually(lambda: waiting_said(session_run), timeout=120)
        assert read_flow_run(session_run).state_type == StateType.RUNNING
    finally:
        host.start_workers(hosts.stack, hosts.state)

    final = wait_for_run(session_run, timeout_seconds=300)
    assert final.state is not None and final.state.is_completed(), final.state
    said = waiting_said(session_run)
    assert len(said) == 1 and f"'{hosts.device_ids[1]}'" in said[0] and "'dcm-process'" in said[0], said
    assert answers(database, final.parameters["session_id"]) == where


def waiting_said(session_run: UUID) -> list[str]:
    return [log.message for log in read_logs(session_run) if "waits on work queue" in log.message]


def ready_session(database: DcmDatabase) -> str:
    records = PlatformRecords(database.open())
    upload_example_patient(database, patient_id=f"HOSTS-{time.monotonic_ns()}", series=1, instances=1)
    return schedule_stable_patient(database, records)


def test_a_host_killed_in_the_middle_of_a_job_fails_only_that_job_and_a_retry_after_it_is_back_finishes(
    hosts: WorkerHosts, installed: Installed
) -> None:
    database, block, where = installed
    host = hosts.hosts[1]
    hold = Path(f"{HOLD}{host.address}")
    hold.touch()
    try:
        session_id = ready_session(database)
        session_run = submit_session(session_id, block)
        eventually(Path(f"{hold}.started").exists, timeout=120)
        host.kill_everything()
        failed = wait_for_run(session_run, timeout_seconds=300)
    finally:
        hold.unlink(missing_ok=True)
        Path(f"{hold}.started").unlink(missing_ok=True)
        host.start_workers(hosts.stack, hosts.state)

    assert failed.state is not None and failed.state.is_failed(), failed.state
    records = {job.get("job_name"): job for job in jobs_of(database, session_id)}
    killed = records[next(name for name, address in where.items() if address == host.address)]
    untouched = records[next(name for name, address in where.items() if address != host.address)]
    assert not killed["done"] and "crashed" in killed["errorMessage"].lower(), killed.get("errorMessage")
    assert untouched["done"] and untouched["result"] == hosts.hosts[0].address
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(session_run, Scheduled(), force=True)
    retried = wait_for_run(session_run, timeout_seconds=300)
    assert retried.state is not None and retried.state.is_completed(), retried.state
    assert answers(database, session_id) == where


def jobs_of(database: DcmDatabase, session_id: str) -> list[dict[str, Any]]:
    return list(database.open().db.get_db()["jobs"].find({"sessionId": session_id}))


def test_sessions_submitted_at_once_run_every_job_once_on_the_host_that_holds_its_component(
    hosts: WorkerHosts, tmp_path: Path
) -> None:
    with database_of_its_own("hosts-load") as (database, block):
        marker = tmp_path / "callbacks"
        target = routed_target(hosts, database, block, tmp_path, marker)
        report = run_load(target, sessions=3, series=4, marker=marker, timeout_seconds=600)

    assert report.sessions_completed == 3
    assert report.jobs == 3 * (4 * 2 + 2), "each series has one job on each host, each session a pre and a post"
    assert (report.jobs_not_done, report.callbacks_run_twice, report.callbacks_missing,
            report.callbacks_on_another_host) == (0, 0, 0, 0)
    for host in hosts.hosts:
        assert report.services_peak_pss_mb[f"{host.name} process-worker"] > 0
    assert report.services_peak_pss_mb["postgres"] > 0 and report.services_peak_pss_mb["redis"] > 0
