"""Sessions: the platform's unmodified scheduler makes the job graph, dcm-session runs it.

Every test uses a database of its own (a block pointing at a fresh database on the same server), so
the scheduler sees only the services the test registers.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectAlreadyExists

from bench.components import service_component
from blocks.database import DcmDatabase
from flows.runtime.components import Component, register_service
from flows.runtime.names import PROCESS_POOL, SESSION_FLOW, SESSION_QUEUE, deployment
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.records import PRE_SERVICES_JOB, SERVICE_JOB, JobRecord
from flows.submit import submit_job, submit_session
from ops.demo import schedule_stable_patient, upload_example_patient
from ops.prefect_setup import DEFAULT_SESSIONS_AT_ONCE
from ops.stack import StackState
from tests.conftest import eventually, finished, read_logs, separate_database

pytestmark = pytest.mark.integration

GRAPH_SERVICE = '''
import os, time
from dcm_processor_service import get_series_dicom, set_session_data

def _timed(name, work):
    started = time.time()
    value = work()
    set_session_data(name, value)
    return {"started": started, "finished": time.time(), "value": value}

def count_instances(session_id, job_name, headers, params, added_params, **kwargs):
    return _timed("instances", lambda: len(get_series_dicom(str(headers["_id"]))))

def study_note(session_id, job_name, headers, params, added_params, **kwargs):
    return _timed("study", lambda: len(headers["Series"]))

def patient_first(session_id, job_name, headers, params, added_params, **kwargs):
    if os.path.exists(params["fail_marker"]):
        raise RuntimeError("patient-first was told to fail")
    return _timed("first", lambda: "first")

def patient_second(session_id, job_name, headers, params, added_params, **kwargs):
    return _timed("second", lambda: "second")
'''


def graph_component(folder: Path, fail_marker: Path) -> Component:
    jobs = [
        {"jobName": "count", "workerEntry": "count_instances", "events": ["stable-series"]},
        {"jobName": "study", "workerEntry": "study_note", "events": ["stable-study"]},
        {"jobName": "first", "workerEntry": "patient_first", "events": ["stable-patient"],
         "params": {"fail_marker": str(fail_marker)}},
        {"jobName": "second", "workerEntry": "patient_second", "events": ["stable-patient"], "dependsOn": "first"},
    ]
    return service_component(folder, "graph", GRAPH_SERVICE, [{**job, "timeout": "5m"} for job in jobs])


@pytest.fixture
def session_database(database: DcmDatabase) -> Iterator[tuple[str, DcmDatabase]]:
    """A database of its own for one test, reachable by block name from the worker."""
    with separate_database(database, "session-test") as own:
        yield own


@pytest.fixture
def graph(session_database: tuple[str, DcmDatabase], tmp_path: Path):
    block, database = session_database
    fail_marker = tmp_path / "fail"
    register_service(PlatformRecords(database.open()), graph_component(tmp_path / "graph", fail_marker))
    return block, database, fail_marker


@pytest.fixture
def failing_session(graph) -> tuple[str, PlatformRecords, str]:
    """A scheduled session of the graph service whose job "first" fails: (block, records, session id)."""
    block, database, fail_marker = graph
    records = PlatformRecords(database.open())
    fail_marker.touch()
    upload_example_patient(database, patient_id="FAIL-1", series=1, instances=1)
    return block, records, schedule_stable_patient(database, records)


def job_runs_of(session_run_id) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[session_run_id])
        ))


def records_by_name(records: PlatformRecords, session_id: str) -> dict[str, JobRecord]:
    """The session's jobs by job name (pre- and post-services by their label)."""
    return {job.job_name or job.label: job for job in records.session_jobs(session_id)}


def test_session_runs_the_schedulers_job_graph_in_dependency_order_and_cleans_up(graph) -> None:
    block, database, _ = graph
    records = PlatformRecords(database.open())
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_queue(name="host-a", work_pool_name=PROCESS_POOL)
    upload_example_patient(database, patient_id="ORDER-1", series=2, instances=2)
    session_id = schedule_stable_patient(database, records, device_id="host-a")

    session_run_id = submit_session(session_id, database_block=block)
    session_run = finished(session_run_id, timeout=300)

    assert session_run.state.is_completed(), session_run.state.message
    jobs = {job.id: job for job in records.session_jobs(session_id)}
    assert len(jobs) == 7 and all(job.done for job in jobs.values())
    raw = {job_id: database.open().get_job_by_id(job_id) for job_id in jobs}
    for job_id, job in jobs.items():
        for dependency in job.depends_on:
            assert raw[dependency]["completedAt"] <= raw[job_id]["startedAt"], f"{job.label} ran before its dependency"
    by_name = {job.job_name: job for job in jobs.values() if job.job_name}
    assert [job.result["value"] for job in jobs.values() if job.job_name == "count"] == [2, 2]
    assert by_name["first"].result["finished"] <= by_name["second"].result["started"]
    children = job_runs_of(session_run_id)
    assert len(children) == 7 and {run.work_queue_name for run in children} == {"host-a"}
    manager = database.open()
    assert manager.get_session(session_id) is None and manager.db.count("patients") == 0
    assert manager.db.count("dicomfiles.files") == 0, "post-services removed the patient's DICOM files"


def test_failed_job_skips_its_dependents_runs_the_clean_up_and_a_retry_runs_only_what_did_not_succeed(
    graph, failing_session, stack: StackState
) -> None:
    block, records, session_id = failing_session
    _, _, fail_marker = graph

    session_run_id = submit_session(session_id, database_block=block)
    session_run = finished(session_run_id, timeout=300)

    assert session_run.state.is_failed()
    jobs = records_by_name(records, session_id)
    assert "first" in session_run.state.message and jobs["first"].id in session_run.state.message
    assert jobs["first"].failed and "told to fail" in jobs["first"].error_message
    assert jobs["second"].failed and not jobs["second"].done
    assert jobs["second"].error_message == f"skipped: dependency {jobs['first'].id} (graph/first) failed"
    assert jobs["post-services"].done, "the clean-up ran although a job failed"
    assert len(job_runs_of(session_run_id)) == 5, "the skipped job got no run"

    fail_marker.unlink()
    retried = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "flow-run", "retry", str(session_run_id)],
        capture_output=True, text=True, env={**os.environ, "PREFECT_API_URL": stack.api_url}, timeout=120,
    )
    assert retried.returncode == 0, retried.stdout + retried.stderr
    eventually(lambda: len(job_runs_of(session_run_id)) == 7, timeout=240)
    final = finished(session_run_id, timeout=300)

    assert final.state.is_completed(), final.state.message
    after = records_by_name(records, session_id)
    assert after["first"].done and after["second"].done
    assert after["count"].result == jobs["count"].result, "jobs that had succeeded did not run again"


@pytest.mark.parametrize("defect", ["cycle", "unknown-dependency"])
def test_a_broken_job_graph_is_rejected_before_any_job_starts(session_database, defect: str) -> None:
    block, database = session_database
    manager = database.open()
    session_id = manager.create_session({"patient_id": manager.make_oid(None), "peer_id": "p"})
    kwargs = {"session_id": session_id, "headers": {}, "added_params": {}, "params": {}}
    first = manager.create_job(session_id=session_id, function_name=PRE_SERVICES_JOB, kwargs=dict(kwargs),
                               channel=None, depends_on=[])
    missing = manager.make_oid(None)
    second = manager.create_job(
        session_id=session_id, function_name=SERVICE_JOB,
        kwargs={**kwargs, "service_id": manager.make_oid(None)}, channel=None,
        depends_on=[first] if defect == "cycle" else [missing],
        job_name="x", service_name="x", job_event="stable-series", job_worker_entry="x",
    )
    if defect == "cycle":
        manager.db.update("jobs", first, {"$set": {"depends_on": [second]}})

    session_run_id = submit_session(session_id, database_block=block)
    session_run = finished(session_run_id)

    assert session_run.state.is_failed()
    expected = "cycle" if defect == "cycle" else f"depends on unknown jobs: {missing}"
    assert expected in session_run.state.message
    assert job_runs_of(session_run_id) == []
    for job_id in (first, second):
        record = manager.get_job_by_id(job_id)
        assert not record["inProgress"] and not record["done"] and record["attempts"] == 0


def session_runs(session_id: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=["dcm-session", f"session:{session_id}"])
        ))


def start_bridge(block: str, stack: StackState, log: Path) -> subprocess.Popen:
    with open(log, "ab") as output:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "dcm-flows"), "bridge", "--database-block", block,
             "--poll-seconds", "0.5"],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PREFECT_API_URL": stack.api_url},
        )


def test_bridge_runs_each_session_of_the_unmodified_scheduler_once_even_across_restarts(
    graph, stack: StackState, tmp_path: Path
) -> None:
    block, database, _ = graph
    records = PlatformRecords(database.open())
    upload_example_patient(database, patient_id="BRIDGE-1", series=1, instances=1)
    upload_example_patient(database, patient_id="BRIDGE-2", series=1, instances=1)
    sessions = [schedule_stable_patient(database, records), schedule_stable_patient(database, records)]

    bridge = start_bridge(block, stack, tmp_path / "bridge.log")
    try:
        runs = eventually(lambda: all(session_runs(s) for s in sessions) and [session_runs(s) for s in sessions],
                          timeout=120)
        for session_run in (run for found in runs for run in found):
            assert finished(session_run.id, timeout=300).state.is_completed()
    finally:
        bridge.terminate()
        bridge.wait(10)
    restarted = start_bridge(block, stack, tmp_path / "bridge.log")
    try:
        with pytest.raises(AssertionError):
            eventually(lambda: any(len(session_runs(s)) > 1 for s in sessions), timeout=6)
    finally:
        restarted.terminate()
        restarted.wait(10)

    for session_id in sessions:
        assert len(session_runs(session_id)) == 1
        jobs = records.session_jobs(session_id)
        assert all(job.done for job in jobs)
        assert len(job_runs_of(session_runs(session_id)[0].id)) == len(jobs), "every job ran exactly once"
        raw = database.open().db.find("jobs", {"query": {"sessionId": session_id}})
        assert {document["consumer_id"] for document in raw} == {"dcm-processor-flows"}


def test_retrying_a_failed_job_run_re_executes_the_job_and_updates_its_record(
    graph, failing_session, stack: StackState
) -> None:
    block, records, session_id = failing_session
    _, _, fail_marker = graph
    jobs = records_by_name(records, session_id)
    for name in ("pre-services", "count", "study"):
        assert finished(submit_job(jobs[name].id, block)).state.is_completed()
    run_id = submit_job(jobs["first"].id, block)
    assert finished(run_id).state.is_failed()

    fail_marker.unlink()
    subprocess.run([str(Path(sys.executable).parent / "prefect"), "flow-run", "retry", str(run_id)], check=True,
                   capture_output=True, env={**os.environ, "PREFECT_API_URL": stack.api_url}, timeout=120)
    eventually(lambda: records.job(jobs["first"].id).done, timeout=180)

    record = records.job(jobs["first"].id)
    assert record.result["value"] == "first" and not record.in_progress
    assert any("told to fail" in log.message for log in read_logs(run_id))
    assert isinstance(records.database.get_job_by_id(record.id)["completedAt"], datetime)


def test_sessions_run_from_a_queue_of_their_own_three_at_once(stack: StackState) -> None:
    with get_client(sync_client=True) as client:
        session_deployment = client.read_deployment_by_name(deployment(SESSION_FLOW))
        queue = client.read_work_queue_by_name(SESSION_QUEUE, work_pool_name=PROCESS_POOL)

    assert session_deployment.work_queue_name == SESSION_QUEUE
    assert queue.concurrency_limit == DEFAULT_SESSIONS_AT_ONCE
