"""The operator's tools (`dcm-flows find`, ...): what an operator on a busy morning asks of the platform, answered
on the platform's side, with patient data kept out of Prefect."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterName,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterTimestamp,
)
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectAlreadyExists
from prefect.states import Crashed, Pending
from pydantic import TypeAdapter

from bench.components import service_component
from blocks.database import DcmDatabase
from flows.bridge import SessionBridge
from flows.job import job_flow
from flows.runtime.components import register_service
from flows.runtime.intake import RECHECK_SECONDS
from flows.runtime.names import BACKLOG_ARTIFACT, BACKLOG_FLOW, PROCESS_POOL, deployment
from flows.runtime.platform_records import PlatformRecords
from flows.submit import submit_session
from ops.demo import schedule_stable_patient, upload_example_patient
from ops.prefect_setup import CRASH_AUTOMATION, NOTIFICATIONS
from ops.stack import (
    EVENT_RETENTION_DAYS,
    FLOW_RUN_RETENTION_DAYS,
    HEARTBEAT_RETENTION_DAYS,
    LocalStack,
    StackState,
)
from tests.conftest import eventually, finished, read_logs, separate_database
from tests.platform import Platform

pytestmark = pytest.mark.integration

PATIENT = "FIND-4711"
TRIAGE_SERVICE = '''
import time


def measure(session_id, job_name, headers, params, added_params, **kwargs):
    time.sleep(params.get("seconds", 0))
    return 1


def report(session_id, job_name, headers, params, added_params, **kwargs):
    raise RuntimeError("the report template is missing")
'''
TRIAGE_JOBS = [
    {"jobName": "measure", "workerEntry": "measure", "events": ["stable-series"]},
    {"jobName": "report", "workerEntry": "report", "events": ["stable-patient"]},
    {"jobName": "archive", "workerEntry": "measure", "events": ["stable-patient"], "dependsOn": "report"},
]
"""A job that succeeds, one that fails, and one that the failure blocks."""


def dcm_flows(local_stack: LocalStack, *arguments: str) -> subprocess.CompletedProcess[str]:
    """The `dcm-flows` command, as an operator runs it on the stack's machine."""
    return subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(local_stack.home), *arguments],
                          capture_output=True, text=True, env=dict(os.environ), timeout=120, check=False)


def stored_by_prefect_since(moment: datetime) -> str:
    """Every log line and event the Prefect API stored since `moment`, as one text to search."""
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(timestamp=LogFilterTimestamp(after_=moment)))
        events = client.request("POST", "/events/filter", json={
            "filter": {"occurred": {"since": moment.isoformat()}}, "limit": 50,
        }).json()["events"]
    return json.dumps([log.model_dump(mode="json") for log in logs]) + json.dumps(events)


@pytest.fixture
def finished_session(database: DcmDatabase, tmp_path: Path) -> Iterator[tuple[str, str, Any]]:
    """A session of the scheduler for patient PATIENT, run to its end: one series job done, the patient job
    failed. Yields (database block, session id, session run)."""
    with separate_database(database, "find-test") as (block, own):
        records = PlatformRecords(own.open())
        register_service(records, service_component(tmp_path / "triage", "triage", TRIAGE_SERVICE, TRIAGE_JOBS))
        upload_example_patient(own, patient_id=PATIENT, series=1, instances=1)
        session_id = schedule_stable_patient(own, records)
        session_run = finished(submit_session(session_id, database_block=block), timeout=300)
        yield block, session_id, session_run


def test_find_shows_a_patients_session_jobs_states_errors_and_run_links_and_sends_none_of_it_to_prefect(
    finished_session: tuple[str, str, Any], local_stack: LocalStack, stack: StackState
) -> None:
    block, session_id, session_run = finished_session
    with get_client(sync_client=True) as client:
        job_runs = {str(run.id) for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[session_run.id])))}
    asked_at = datetime.now(timezone.utc)

    found = dcm_flows(local_stack, "find", "--patient-id", PATIENT, "--database-block", block, "--json")

    assert found.returncode == 0, found.stderr
    [session] = json.loads(found.stdout)
    jobs = {job["job"]: job for job in session["jobs"]}
    assert session["session_id"] == session_id and session["state"] == "failed"
    assert session["session_run"].endswith(f"/runs/flow-run/{session_run.id}")
    assert {name: job["state"] for name, job in jobs.items()} == {
        "pre-services": "done", "triage/measure": "done", "triage/report": "failed", "triage/archive": "failed",
        "post-services": "done",
    }
    assert "the report template is missing" in jobs["triage/report"]["error"]
    assert "skipped: dependency" in jobs["triage/archive"]["error"]
    ran = [job for name, job in jobs.items() if name != "triage/archive"]
    assert {job["flow_run_id"] for job in ran} == job_runs and jobs["triage/archive"]["run"] is None
    assert all(job["run"].endswith(f"/runs/flow-run/{job['flow_run_id']}") for job in ran)
    assert all(job["seconds"] is not None and job["seconds"] >= 0 for job in ran)
    assert PATIENT not in stored_by_prefect_since(asked_at)


def test_find_reads_a_session_by_its_id_for_people_and_says_when_nothing_matches(
    finished_session: tuple[str, str, Any], local_stack: LocalStack, stack: StackState
) -> None:
    block, session_id, _ = finished_session

    by_session = dcm_flows(local_stack, "find", "--session-id", session_id, "--database-block", block)
    nothing = dcm_flows(local_stack, "find", "--accession", "NO-SUCH-ACCESSION", "--database-block", block)

    assert by_session.returncode == 0, by_session.stderr
    assert f"session {session_id}  failed" in by_session.stdout
    assert "error: " in by_session.stdout and "the report template is missing" in by_session.stdout
    assert nothing.returncode == 1 and "no session found" in nothing.stdout


def test_a_session_run_shows_its_job_graph_with_the_failed_job_and_what_it_blocked(
    finished_session: tuple[str, str, Any], stack: StackState
) -> None:
    _, _, session_run = finished_session
    with get_client(sync_client=True) as client:
        [graph] = [artifact for artifact in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[session_run.id]), type=ArtifactFilterType(any_=["markdown"])))]

    rows = {cells[2]: cells for cells in (
        [cell.strip() for cell in line.split("|")] for line in graph.data.splitlines() if line.startswith("| ")
    )}
    assert "5 jobs: 3 succeeded, 1 failed, 1 skipped" in graph.data
    assert rows["triage/report"][3] == "**failed**" and rows["triage/archive"][3] == "skipped"
    assert rows["triage/report"][6] == rows["triage/archive"][1], "the failed job names the job it blocked"
    assert rows["triage/report"][1] in rows["triage/archive"][5].split(", "), "the blocked job names what it waited for"
    assert rows["pre-services"][5] == "" and all(row[5] for label, row in rows.items() if label != "pre-services")
    assert rows["triage/measure"][3] == "succeeded" and rows["triage/measure"][4].endswith(" s")
    assert PATIENT not in graph.data and "template is missing" not in graph.data


@pytest.fixture
def paused_and_resumed(local_stack: LocalStack) -> Iterator[None]:
    """Intake is resumed however the test ends (the tests after it need the pools)."""
    try:
        yield
    finally:
        dcm_flows(local_stack, "resume")


def test_a_pause_lets_running_jobs_finish_starts_nothing_new_holds_the_bridge_and_a_resume_goes_on(
    database: DcmDatabase, tmp_path: Path, local_stack: LocalStack, stack: StackState, paused_and_resumed: None
) -> None:
    jobs = [{"jobName": "slow", "workerEntry": "measure", "events": ["stable-patient"], "params": {"seconds": 15}},
            {"jobName": "after", "workerEntry": "measure", "events": ["stable-patient"], "dependsOn": "slow"}]
    with separate_database(database, "pause-test") as (block, own):
        records = PlatformRecords(own.open())
        register_service(records, service_component(tmp_path / "paced", "paced", TRIAGE_SERVICE, jobs))
        upload_example_patient(own, patient_id="PAUSE-1", series=1, instances=1)
        session_id = schedule_stable_patient(own, records)
        bridge = SessionBridge(records, block, say=lambda _line: None)

        paused = dcm_flows(local_stack, "pause")
        status = dcm_flows(local_stack, "stack", "status")
        held = bridge.poll_once()
        dcm_flows(local_stack, "resume")
        submitted = eventually(bridge.poll_once, timeout=RECHECK_SECONDS + 10)

        assert paused.returncode == 0 and "paused: pool dcm-process" in paused.stdout
        assert "paused: pool dcm-process, pool dcm-docker" in status.stdout
        assert held == [] and submitted == [session_id]
        by_name = {job.job_name: job for job in records.session_jobs(session_id)}
        eventually(lambda: records.job(by_name["slow"].id).in_progress, timeout=120)
        dcm_flows(local_stack, "pause")
        [session_run] = session_runs_of(session_id)
        eventually(lambda: any("intake is paused" in log.message for log in read_logs(session_run.id)), timeout=30)
        assert records.job(by_name["slow"].id).in_progress, "the session saw the pause while its job still ran"
        eventually(lambda: records.job(by_name["slow"].id).done, timeout=60)
        time.sleep(RECHECK_SECONDS + 3)
        after = records.job(by_name["after"].id)
        assert not after.in_progress and not after.done, "a job started while intake was paused"

        dcm_flows(local_stack, "resume")
        assert finished(session_run.id, timeout=120).state.is_completed()
        assert records.job(by_name["after"].id).done


def session_runs_of(session_id: str) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=session_id)))


class WebhookReceiver:
    """A local HTTP endpoint that keeps the body of every POST it receives."""

    def __init__(self) -> None:
        received: list[str] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_arguments: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dcm-failures"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def notified(local_stack: LocalStack, stack: StackState) -> Iterator[WebhookReceiver]:
    """A receiver that `dcm-flows automations --notify` points the failure notifications at; the notifications
    are deleted afterwards."""
    receiver = WebhookReceiver()
    created = dcm_flows(local_stack, "automations", "--notify", receiver.url)
    assert created.returncode == 0, created.stderr
    try:
        yield receiver
    finally:
        receiver.close()
        with get_client(sync_client=True) as client:
            for name in NOTIFICATIONS:
                for automation in client.read_automations_by_name(name):
                    client.delete_automation(automation.id)


def test_a_failed_session_is_posted_to_the_operators_webhook_with_ids_and_link_and_no_patient_data(
    notified: WebhookReceiver, finished_session: tuple[str, str, Any], database: DcmDatabase
) -> None:
    _, session_id, session_run = finished_session

    [posted] = eventually(lambda: [json.loads(body) for body in notified.received
                                   if str(session_run.id) in body], timeout=60)

    assert posted["flow"] == "dcm-session" and posted["state"] == "Failed"
    assert posted["event"] == "prefect.flow-run.Failed" and posted["parameters"]["session_id"] == session_id
    assert posted["ui_url"].endswith(f"/runs/flow-run/{session_run.id}")
    assert "triage/report" in posted["message"]
    text = "".join(notified.received)
    assert PATIENT not in text and database.url.get_secret_value() not in text


def test_doctor_names_a_missing_step_with_its_fix_and_setup_puts_it_back_without_echoing_the_database_url(
    local_stack: LocalStack, stack: StackState
) -> None:
    before = dcm_flows(local_stack, "doctor")
    with get_client(sync_client=True) as client:
        for automation in client.read_automations_by_name(CRASH_AUTOMATION):
            client.delete_automation(automation.id)

    sick = dcm_flows(local_stack, "doctor")
    setup = dcm_flows(local_stack, "setup")
    after = dcm_flows(local_stack, "doctor")

    for line in ("ok    Prefect server", "ok    work pool dcm-process", "ok    work queue sessions",
                 "ok    deployments", "ok    automations", "ok    database block default",
                 "ok    platform database", "ok    warm engine"):
        assert line in before.stdout, before.stdout
        assert line in after.stdout, after.stdout
    assert sick.returncode == 1 and "FAIL  automations" in sick.stdout
    assert "fix: run `dcm-flows setup`" in sick.stdout
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "deployments of prefect.yaml deployed" in setup.stdout
    assert stack.database_url not in setup.stdout + setup.stderr


def test_status_and_the_backlog_artifact_count_waiting_sessions_and_failures_by_service(
    finished_session: tuple[str, str, Any], database: DcmDatabase, local_stack: LocalStack, stack: StackState
) -> None:
    block, _, _ = finished_session
    own = database.with_database_name(block)
    upload_example_patient(own, patient_id="WAITING-1", series=1, instances=1)
    schedule_stable_patient(own, PlatformRecords(own.open()))

    status = dcm_flows(local_stack, "status", "--database-block", block)
    published = run_deployment(deployment(BACKLOG_FLOW), parameters={"database_block": block}, timeout=120)
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[published.id])))

    counts = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in status.stdout.splitlines()
                  if not line.startswith(("paused", "intake")))
    assert status.returncode == 0, status.stderr
    assert counts["sessions waiting (work left, nothing running)"] == "1"
    assert counts["sessions running"] == "0" and counts["jobs running"] == "0"
    assert counts["failed in the last 24 h: triage"] == "2", "the failed job and the one it blocked"
    assert counts["oldest waiting job"].endswith("min")
    assert published.state.is_completed() and artifact.key == BACKLOG_ARTIFACT
    assert {row["what"]: row["count"] for row in json.loads(artifact.data)} == counts


def parse_duration(value: str | float) -> timedelta:
    """A duration as Prefect's settings endpoint writes it (ISO 8601, or seconds)."""
    return TypeAdapter(timedelta).validate_python(value)


def test_the_embedded_stacks_prefect_server_deletes_old_runs_logs_and_events_by_itself(stack: StackState) -> None:
    with get_client(sync_client=True) as client:
        settings = client.request("GET", "/admin/settings").json()

    vacuum = settings["server"]["services"]["db_vacuum"]
    assert set(vacuum["enabled"]) == {"events", "flow_runs"}
    assert parse_duration(vacuum["retention_period"]) == timedelta(days=FLOW_RUN_RETENTION_DAYS)
    assert parse_duration(settings["server"]["events"]["retention_period"]) == timedelta(days=EVENT_RETENTION_DAYS)
    heartbeats = vacuum["event_retention_overrides"]["prefect.flow-run.heartbeat"]
    assert parse_duration(heartbeats) == timedelta(days=HEARTBEAT_RETENTION_DAYS)


def test_one_hosts_queue_is_paused_and_resumed_alone_and_an_unknown_queue_is_refused(
    local_stack: LocalStack, stack: StackState, paused_and_resumed: None
) -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_queue(name="host-b", work_pool_name=PROCESS_POOL)

    paused = dcm_flows(local_stack, "pause", "--queue", "host-b")
    status = dcm_flows(local_stack, "stack", "status")
    with get_client(sync_client=True) as client:
        queue_paused = client.read_work_queue_by_name("host-b", work_pool_name=PROCESS_POOL).is_paused
        pool_paused = client.read_work_pool(PROCESS_POOL).is_paused
    resumed = dcm_flows(local_stack, "resume", "--queue", "host-b")
    unknown = dcm_flows(local_stack, "pause", "--queue", "no-such-host")

    assert paused.returncode == 0 and "paused: queue host-b of pool dcm-process" in paused.stdout
    assert "paused: queue host-b of pool dcm-process" in status.stdout
    assert queue_paused and not pool_paused
    assert resumed.returncode == 0 and "resumed: queue host-b of pool dcm-process" in resumed.stdout
    assert unknown.returncode == 1 and "no pool has a work queue named 'no-such-host'" in unknown.stderr


def test_a_command_with_no_prefect_api_to_talk_to_says_so_instead_of_starting_a_temporary_server(
    tmp_path: Path,
) -> None:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_API")}

    answered = subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(tmp_path), "doctor"],
                              capture_output=True, text=True, env=environment, timeout=60, check=False)

    assert answered.returncode == 1
    assert "no Prefect API to talk to: set PREFECT_API_URL" in answered.stderr
    assert "temporary server" not in answered.stderr.lower()


def test_a_crashed_job_run_is_posted_to_the_operators_webhook(
    notified: WebhookReceiver, platform: Platform, database: DcmDatabase
) -> None:
    job_id = platform.service_job(platform.service("crashing", "def run(*args, **kwargs):\n    return 1\n"))
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(job_flow, parameters={"job_id": job_id}, name="crashing/run",
                                          state=Pending())
        client.set_flow_run_state(flow_run.id, Crashed(message="its process was killed"), force=True)

    [posted] = eventually(lambda: [json.loads(body) for body in notified.received
                                   if str(flow_run.id) in body], timeout=60)

    assert posted["flow"] == "dcm-job" and posted["state"] == "Crashed"
    assert posted["run_name"] == "crashing/run" and posted["parameters"]["job_id"] == job_id
    assert posted["message"] == "its process was killed"
    assert database.url.get_secret_value() not in "".join(notified.received)
