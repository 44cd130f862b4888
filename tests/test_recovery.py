"""Whatever fails and whenever, no job record is left in progress for good, and none is overwritten by a run that
no longer holds it: fencing of outcome writes, retried steps, and outages of the Prefect API, on the real stack."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Pending, Running, Scheduled, State

from blocks.database import DcmDatabase
from flows.bridge import SessionBridge
from flows.job import _cancellation_check, job_flow
from flows.runtime.errors import ClaimLost
from flows.runtime.names import JOB_FLOW, RECONCILE_FLOW, deployment
from flows.session import session_flow
from flows.submit import submit_job, submit_session
from ops.prefect_setup import CRASH_AUTOMATION, ensure_crash_automations
from ops.stack import LocalStack, StackState, process_alive
from tests.conftest import (
    SleeperRun,
    database_away,
    eventually,
    finished,
    prefect_away,
    read_flow_run,
    running_callback,
    separate_database,
)
from tests.platform import Platform, job_folder_of, parent_of

pytestmark = pytest.mark.integration

TRIVIAL_SERVICE = "def run(**kwargs):\n    return 'ran'\n"


def trivial_job(platform: Platform) -> str:
    return platform.service_job(platform.service(f"trivial-{uuid.uuid4().hex[:8]}", TRIVIAL_SERVICE))


def live_run() -> str:
    """The id of a flow run that is Running (no process runs it): the reconciler, which runs every minute,
    leaves the records such a run holds alone for 75 s."""
    return str(a_run_of_the_job_flow(Running()))


def test_a_run_taken_for_dead_cannot_overwrite_the_outcome_of_the_run_that_holds_the_job_now(
    platform: Platform,
) -> None:
    records, job_id = platform.records, trivial_job(platform)
    first, second = live_run(), live_run()
    records.claim(job_id, first)
    records.mark_failed_unless_recorded(job_id, first, "the first run crashed (it was only slow)")
    records.claim(job_id, second)

    with pytest.raises(ClaimLost, match=f"no longer held by flow run {first} but by flow run {second}"):
        records.mark_succeeded(job_id, first, "late value")
    with pytest.raises(ClaimLost):
        records.mark_failed(job_id, first, "late failure")

    held = platform.job(job_id)
    assert held["inProgress"] is True and held["flowRunId"] == second and held["done"] is not True
    records.mark_succeeded(job_id, second, "value of run-2")
    assert platform.job(job_id)["result"] == "value of run-2"


def test_a_run_whose_job_was_taken_over_ends_superseded_and_leaves_the_holders_record_alone(
    platform: Platform, start_sleeper: Callable[..., SleeperRun]
) -> None:
    sleeper, holder = start_sleeper(sleep=4), live_run()
    platform.manager.db.update("jobs", sleeper.job_id, {"$set": {"flowRunId": holder}})

    run = finished(sleeper.flow_run_id)

    assert run.state.is_cancelled() and run.state.name == "Superseded", run.state
    assert holder in run.state.message and str(sleeper.flow_run_id) in run.state.message
    record = platform.job(sleeper.job_id)
    assert record["inProgress"] is True and record["flowRunId"] == holder
    assert record["done"] is not True and "result" not in record


def test_a_job_that_failed_once_and_whose_next_run_crashes_is_failed_and_can_be_claimed_again(
    platform: Platform, tmp_path: Path
) -> None:
    job_id, pid_file = platform.sleeper_job(tmp_path)
    platform.manager.db.update("jobs", job_id, {"$set": {
        "error": True, "inProgress": False, "errorMessage": "the first attempt failed", "attempts": 1,
    }})
    flow_run_id = submit_job(job_id)
    callback = running_callback(pid_file)

    os.kill(parent_of(callback), signal.SIGKILL)

    assert finished(flow_run_id, timeout=60).state.is_crashed()
    record = eventually(lambda: (job := platform.job(job_id))["inProgress"] is False and job, timeout=90)
    assert f"flow run {flow_run_id} crashed" in record["errorMessage"] and record["attempts"] == 2
    platform.records.claim(job_id, live_run())


FINISHING_SERVICE = """
import os, threading, time

def run(session_id, job_name, headers, params, added_params, **kwargs):
    with open(params["pid_file"], "w") as pid_file:
        pid_file.write(str(os.getpid()))
    while not os.path.exists(params["go"]):
        time.sleep(0.05)
    with open(params["side_effects"], "a") as side_effects:
        side_effects.write("side effect\\n")
    threading.Thread(target=time.sleep, args=(params["linger"],)).start()
    return {"value": 7}
"""


@pytest.mark.parametrize("callback_process_ended", [True, False], ids=["callback-process-ended", "still-ending"])
def test_a_callback_that_returned_before_its_run_died_unrecorded_is_recorded_by_the_retry_and_not_run_again(
    platform: Platform, tmp_path: Path, callback_process_ended: bool
) -> None:
    pid_file, go, side_effects = tmp_path / "pid", tmp_path / "go", tmp_path / "side-effects"
    job_id = platform.service_job(platform.service(f"finishing-{tmp_path.name}", FINISHING_SERVICE))
    platform.manager.db.update("jobs", job_id, {"$set": {"data.kwargs.params": {
        "pid_file": str(pid_file), "go": str(go), "side_effects": str(side_effects),
        "linger": 0 if callback_process_ended else 60,
    }}})
    first_run = submit_job(job_id)
    callback = running_callback(pid_file)
    run_process, job_folder = parent_of(callback), job_folder_of(callback)
    if callback_process_ended:  # the run's process stands still between the callback's exit and the record's write
        os.kill(run_process, signal.SIGSTOP)

    go.touch()
    eventually(lambda: list(job_folder.glob("calls/*/result.json")), timeout=30, interval=0.05)
    if callback_process_ended:
        eventually(lambda: not process_alive(callback), timeout=30)
    os.kill(run_process, signal.SIGKILL)

    assert finished(first_run, timeout=60).state.is_crashed()
    eventually(lambda: platform.job(job_id)["inProgress"] is False, timeout=90)
    retry = finished(submit_job(job_id))  # what an operator does: run the failed job again

    assert retry.state.is_completed(), retry.state.message
    assert side_effects.read_text().splitlines() == ["side effect"], "the callback ran to its end twice"
    record = platform.job(job_id)
    assert record["done"] is True and record["error"] is False and record["result"] == {"value": 7}
    assert not job_folder.exists()
    assert not process_alive(callback)


POST_SCRIPT = """
def callback(session_dir, **kwargs):
    with open({marker!r}, "a") as marker:
        marker.write("post-script ran\\n")
"""


def test_a_post_service_retried_after_a_database_outage_runs_the_post_script_once_and_records_the_job(
    platform: Platform, service_venv: Path, tmp_path: Path, stack: StackState, local_stack: LocalStack
) -> None:
    marker = tmp_path / "post-script-runs"
    worker_id = platform.venv_worker(
        f"post-scripted-{tmp_path.name}", str(service_venv),
        scripts={"after.py": POST_SCRIPT.format(marker=str(marker))}, post_scripts=["after.py"],
    )
    job_id, pid_file = platform.sleeper_job(tmp_path, sleep=3)
    platform.manager.db.update("jobs", job_id, {"$set": {
        "data.kwargs.worker_id": platform.manager.make_oid(worker_id), "data.kwargs.worker_type": "venv",
    }})
    flow_run_id = submit_job(job_id)
    callback = running_callback(pid_file)
    with database_away(local_stack, stack):  # post-service starts while the database is away
        eventually(lambda: not process_alive(callback), timeout=30)
        time.sleep(4)

    run = finished(flow_run_id, timeout=180)

    assert run.state.is_completed(), run.state.message
    assert marker.read_text().splitlines() == ["post-script ran"]
    record = platform.job(job_id)
    assert record["done"] is True and record["inProgress"] is False and record["result"] == "slept"
    assert not list(Path("/tmp").glob(f"dcm-job-{job_id}-*")), "the job's folders are gone"


def test_the_cancellation_check_takes_an_api_that_does_not_answer_for_no_cancellation() -> None:
    with SyncPrefectClient("http://127.0.0.1:9/api") as unreachable:
        cancelling = _cancellation_check(unreachable, str(uuid.uuid4()), logging.getLogger("test"))

        assert cancelling() is False


def test_a_prefect_api_outage_while_a_callback_runs_does_not_kill_it_and_the_run_catches_up(
    platform: Platform, tmp_path: Path, stack: StackState, local_stack: LocalStack
) -> None:
    job_id, pid_file = platform.sleeper_job(tmp_path, sleep=8)
    flow_run_id = submit_job(job_id)
    callback = running_callback(pid_file)
    with prefect_away(local_stack, stack):  # before the run's first cancellation check, 2 s into the callback
        eventually(lambda: not process_alive(callback), timeout=30)

    run = finished(flow_run_id, timeout=300)

    record = platform.job(job_id)
    assert record["done"] is True and record["result"] == "slept", record.get("errorMessage")
    assert run.state.is_completed(), run.state.message


def test_a_session_whose_jobs_cannot_be_read_is_reported_and_the_bridge_submits_the_others(
    database: DcmDatabase,
) -> None:
    with separate_database(database, "bridge-skips") as (block, own):
        platform = Platform(own.open())
        broken, sound = platform.session(), platform.session()
        service = platform.service("broken-timeout", TRIVIAL_SERVICE)
        platform.service_job(service, session_id=broken, timeout="whenever")
        for session_id in (broken, sound):
            platform.session_hook_job(session_id, pre=False)
        said: list[str] = []
        bridge = SessionBridge(platform.records, block, say=said.append)

        assert bridge.poll_once() == [sound]
        assert bridge.poll_once() == []

        reported = [line for line in said if broken in line]
        assert len(reported) == 1 and "not submitted" in reported[0] and "job_timeout" in reported[0]
        sound_run = re.search(rf"session {sound}: flow run ([0-9a-f-]+)", "\n".join(said))
        assert sound_run is not None and finished(UUID(sound_run.group(1))).state.is_completed()


def test_stopping_a_stack_whose_record_names_processes_it_did_not_start_signals_none_of_them(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        home = tmp_path / "after-a-reboot"
        home.mkdir()
        (home / "stack.json").write_text(json.dumps({
            "database_url": "mongodb://127.0.0.1:9", "api_url": "http://127.0.0.1:9/api", "ui_url": "",
            "processes": {"database": bystander.pid, "prefect-server": bystander.pid},
        }))

        LocalStack(home).stop()

        assert bystander.poll() is None, "a process the stack did not start was signalled"
        assert not (home / "stack.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def duplicate_child_of(session_run_id: UUID) -> bool:
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[session_run_id])
        ))
    return any(child.state is not None and child.state.name == "Duplicate" for child in children)


def test_a_session_waits_for_a_job_held_by_another_run_and_cleans_up_only_after_its_outcome(
    platform: Platform,
) -> None:
    session_id = platform.session()
    service = platform.service(f"held-{uuid.uuid4().hex[:8]}", TRIVIAL_SERVICE)
    held = platform.service_job(service, session_id=session_id)
    dependent = platform.service_job(service, session_id=session_id, depends_on=[platform.manager.make_oid(held)])
    clean_up = platform.session_hook_job(session_id, pre=False)
    elsewhere = live_run()
    platform.records.claim(held, elsewhere)

    session_run_id = submit_session(session_id)
    eventually(lambda: duplicate_child_of(session_run_id), timeout=120)
    time.sleep(3)

    assert platform.job(clean_up).get("startedAt") is None, "the clean-up ran while a job was in progress"
    assert platform.job(dependent)["error"] is not True
    platform.records.mark_succeeded(held, elsewhere, "done elsewhere")
    run = finished(session_run_id, timeout=120)

    assert run.state.is_completed(), run.state.message
    assert platform.job(dependent)["done"] is True
    assert platform.job(clean_up)["startedAt"] > platform.job(held)["completedAt"]


def reconcile(**parameters: Any) -> None:
    """One pass of the reconciler, through its deployment (it also runs every minute by its schedule)."""
    flow_run = run_deployment(deployment(RECONCILE_FLOW), parameters=parameters, timeout=0, as_subflow=False)
    state = finished(flow_run.id).state
    assert state.is_completed(), state.message


def a_run_of_the_job_flow(state: State) -> UUID:
    """A flow-run record of the `dcm-job` deployment, created in `state` (no worker runs it)."""
    with get_client(sync_client=True) as client:
        job_deployment = client.read_deployment_by_name(deployment(JOB_FLOW))
        parameters = {"job_id": "0" * 24}
        flow_run = client.create_flow_run_from_deployment(job_deployment.id, parameters=parameters, state=state)
    return flow_run.id


def test_the_reconciler_fails_records_whose_run_vanished_or_ended_and_leaves_those_of_live_runs(
    platform: Platform,
) -> None:
    vanished, ended, live = trivial_job(platform), trivial_job(platform), trivial_job(platform)
    vanished_run, ended_run = str(uuid.uuid4()), str(a_run_of_the_job_flow(Cancelled(message="cancelled late")))
    live_run = str(a_run_of_the_job_flow(Running()))
    for job_id, flow_run_id in ((vanished, vanished_run), (ended, ended_run), (live, live_run)):
        platform.records.claim(job_id, flow_run_id)

    reconcile()
    reconcile()

    for job_id, reason in ((vanished, f"flow run {vanished_run} no longer exists"),
                           (ended, f"flow run {ended_run} ended Cancelled without recording the job's outcome")):
        record = platform.job(job_id)
        assert record["inProgress"] is False and record["error"] is True and record["attempts"] == 1, record
        assert reason in record["errorMessage"]
    assert platform.job(live)["inProgress"] is True and platform.job(live).get("error") is not True


def test_the_reconciler_fails_the_records_of_job_runs_an_earlier_attempt_of_their_session_left_behind(
    platform: Platform,
) -> None:
    session_id = platform.session()
    left, current = trivial_job(platform), trivial_job(platform)
    for job_id in (left, current):
        platform.manager.db.update("jobs", job_id, {"$set": {"sessionId": session_id}})
    with get_client(sync_client=True) as client:
        session_run = client.create_flow_run(session_flow, parameters={"session_id": session_id}, state=Running())
        left_run = client.create_flow_run(job_flow, parameters={"job_id": left}, state=Running())
        time.sleep(0.1)
        client.set_flow_run_state(session_run.id, Scheduled(), force=True)  # an operator's retry
        client.set_flow_run_state(session_run.id, Running(), force=True)
        current_run = client.create_flow_run(job_flow, parameters={"job_id": current}, state=Running())
    platform.records.claim_session(session_id, str(session_run.id), lambda _: True)
    platform.records.claim(left, str(left_run.id))
    platform.records.claim(current, str(current_run.id))

    reconcile()

    record = platform.job(left)
    assert record["inProgress"] is False and record["error"] is True, record
    assert f"an earlier attempt of its session's flow run {session_run.id}" in record["errorMessage"]
    assert read_flow_run(left_run.id).state.is_crashed()
    assert platform.job(current)["inProgress"] is True, "the job run of the session's running attempt is left alone"


def test_a_run_a_stopped_pool_worker_left_pending_is_scheduled_again_by_the_reconciler_and_runs(
    platform: Platform,
) -> None:
    job_id = trivial_job(platform)
    with get_client(sync_client=True) as client:  # what a pool worker killed while it started the run leaves
        job_deployment = client.read_deployment_by_name(deployment(JOB_FLOW))
        stranded = client.create_flow_run_from_deployment(
            job_deployment.id, parameters={"job_id": job_id}, state=Pending(name="Submitting")
        )
    time.sleep(2)
    assert read_flow_run(stranded.id).state.is_pending(), "no worker takes a Pending run"

    reconcile(stranded_after_seconds=1)

    run = finished(stranded.id)
    assert run.state.is_completed(), run.state.message
    assert platform.job(job_id)["done"] is True


def test_a_reconciler_run_left_pending_by_its_pool_worker_stops_no_later_pass_and_is_run_again(
    platform: Platform,
) -> None:
    with get_client(sync_client=True) as client:
        reconciler = client.read_deployment_by_name(deployment(RECONCILE_FLOW))
        stranded = client.create_flow_run_from_deployment(
            reconciler.id, state=Scheduled(scheduled_time=datetime.now(timezone.utc) + timedelta(hours=1))
        )
        # As a pool worker does when it takes the run; killed then, or with the server restarted and its leases lost
        client.set_flow_run_state(stranded.id, Pending(name="Submitting"))

    reconcile(stranded_after_seconds=1)

    assert finished(stranded.id).state.is_completed()


@contextmanager
def without_the_heartbeat_automation() -> Iterator[None]:
    """As a new user's server is after `prefect deploy --all` alone: no `dcm-flows automations`."""
    with get_client(sync_client=True) as client:
        for automation in client.read_automations_by_name(CRASH_AUTOMATION):
            client.delete_automation(automation.id)
    try:
        yield
    finally:
        ensure_crash_automations()


def test_a_job_whose_process_and_worker_are_killed_is_repaired_in_three_minutes_without_any_automation_command(
    platform: Platform, tmp_path: Path, stack: StackState, local_stack: LocalStack
) -> None:
    with without_the_heartbeat_automation():
        job_id, pid_file = platform.sleeper_job(tmp_path)
        flow_run_id = submit_job(job_id)
        callback = running_callback(pid_file)
        worker = stack.processes["process-worker"]
        os.kill(worker, signal.SIGKILL)
        os.kill(parent_of(callback), signal.SIGKILL)
        killed = time.monotonic()
        eventually(lambda: not process_alive(worker), timeout=15)  # a SIGKILL takes effect a moment later
        local_stack.start_workers(stack)  # as a service manager restarts a worker that died

        record = eventually(lambda: (job := platform.job(job_id))["inProgress"] is False and job,
                            timeout=240, interval=2)

    assert time.monotonic() - killed < 180
    assert "no heartbeat" in record["errorMessage"] and record["error"] is True
    assert finished(flow_run_id, timeout=30).state.is_crashed()


def test_a_job_a_mongo_qas_worker_claims_after_a_run_of_ours_recorded_it_is_left_to_that_worker(
    platform: Platform,
) -> None:
    job_id, vanished_run = trivial_job(platform), str(uuid.uuid4())
    platform.records.claim(job_id, vanished_run)
    platform.records.mark_failed(job_id, vanished_run, "the first attempt failed")
    platform.manager.db.update("jobs", job_id, {"$set": {"inProgress": True}})  # as mongo-qas claims a job

    reconcile()

    record = platform.job(job_id)
    assert record["inProgress"] is True and record["attempts"] == 1 and "flowRunId" not in record
