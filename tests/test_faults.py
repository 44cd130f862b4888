"""Faults against the real stack: no job lost, none run twice, nothing left running, hostile input refused.

The processes are real: runs are submitted through the Prefect API to the stack's process worker,
processes are killed by PID, and records are read back from SecantusDB.
"""

from __future__ import annotations

import contextvars
import io
import os
import signal
import stat
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey
from prefect.client.schemas.objects import FlowRun
from prefect.states import Cancelling, Scheduled

from bench.load import in_session_target, run_load
from flows.runtime.variables import MISSED_HEARTBEATS_SECONDS
from flows.submit import submit_job, submit_session
from ops.stack import LocalStack, StackState, process_alive
from tests.conftest import (
    SleeperRun,
    database_away,
    eventually,
    finished,
    logs_of_ended_run,
    read_flow_run,
    running_callback,
    separate_database,
)
from tests.platform import Platform, job_folder_of, parent_of, zip_files

pytestmark = pytest.mark.integration

COUNTING_SERVICE = """
import os, time

def run(session_id, job_name, headers, params, added_params, **kwargs):
    with open({marker!r}, "a") as marker:
        marker.write(f"{{os.getpid()}}\\n")
    time.sleep({sleep})
    return {{"pid": os.getpid()}}
"""

LAST_STEP_SERVICE = """
import os, time

def run(session_id, job_name, headers, params, added_params, **kwargs):
    with open({pid_file!r}, "w") as pid_file:
        pid_file.write(str(os.getpid()))
    time.sleep(0.25)
    with open({marker!r}, "a") as marker:
        marker.write("side effect\\n")
    return 1
"""

PRIVILEGE_SERVICE = """
import os, stat

def run(session_id, job_name, headers, params, added_params, **kwargs):
    folder = os.getcwd()
    while not os.path.basename(folder).startswith("dcm-job-") and folder != "/":
        folder = os.path.dirname(folder)
    return {
        "job_folder": folder,
        "job_folder_mode": stat.S_IMODE(os.stat(folder).st_mode),
        "job_folder_owner": os.stat(folder).st_uid,
        "uid": os.getuid(),
        "variables": sorted(os.environ),
    }
"""


def counting_job(platform: Platform, tmp_path: Path, sleep: float = 3, session_id: str | None = None) -> str:
    marker = tmp_path / "calls"
    service = platform.service(f"counting-{tmp_path.name}", COUNTING_SERVICE.format(marker=str(marker), sleep=sleep))
    return platform.service_job(service, session_id=session_id)


def calls(tmp_path: Path) -> list[str]:
    marker = tmp_path / "calls"
    return marker.read_text().split() if marker.exists() else []


def at_once(submit: Any, *arguments: Any) -> list[Any]:
    """Call `submit` twice from two threads released at the same moment; return both results.

    Each thread runs in a copy of this context, which holds the stack's Prefect settings: a bare thread
    would see Prefect's settings from import time and start a temporary server of its own."""
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def call(index: int) -> None:
        barrier.wait()
        results[index] = submit(*arguments)

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(call, index)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_the_same_job_submitted_twice_at_once_runs_once_and_the_duplicate_says_so(
    platform: Platform, tmp_path: Path
) -> None:
    job_id = counting_job(platform, tmp_path)

    runs: list[FlowRun] = [finished(run_id) for run_id in at_once(submit_job, job_id)]

    assert len(calls(tmp_path)) == 1
    assert sorted(run.state.name for run in runs) == ["Completed", "Duplicate"]
    duplicate = next(run for run in runs if run.state.name == "Duplicate")
    assert duplicate.state.is_cancelled()
    assert "already in progress" in duplicate.state.message or "already done" in duplicate.state.message
    record = platform.job(job_id)
    assert record["done"] is True and record.get("attempts", 0) == 0


def test_submitting_a_job_that_is_done_runs_nothing(platform: Platform, tmp_path: Path) -> None:
    job_id = counting_job(platform, tmp_path, sleep=0)
    assert finished(submit_job(job_id)).state.is_completed()

    again = finished(submit_job(job_id))

    assert again.state.name == "Duplicate" and "already done" in again.state.message
    assert len(calls(tmp_path)) == 1


def test_the_same_session_submitted_twice_at_once_runs_each_job_once_and_once_done_runs_nothing(
    platform: Platform, tmp_path: Path
) -> None:
    session_id = platform.session()
    counting_job(platform, tmp_path, sleep=1, session_id=session_id)

    runs = [finished(run_id, timeout=300) for run_id in at_once(submit_session, session_id)]
    again = finished(submit_session(session_id), timeout=300)

    assert sorted(run.state.name for run in runs) == ["Completed", "Duplicate"]
    duplicate = next(run for run in runs if run.state.name == "Duplicate")
    assert "already being run by flow run" in duplicate.state.message or "already done" in duplicate.state.message
    assert again.state.name == "Duplicate" and "already done" in again.state.message
    assert len(calls(tmp_path)) == 1


def _record_without_kwargs(platform: Platform, job_id: str) -> None:
    platform.manager.db.update("jobs", job_id, {"$unset": {"data.kwargs": ""}})


def _record_with_text_max_attempts(platform: Platform, job_id: str) -> None:
    platform.manager.db.update("jobs", job_id, {"$set": {"max_attempts": "three"}})


def _record_with_bad_timeout(platform: Platform, job_id: str) -> None:
    platform.manager.db.update("jobs", job_id, {"$set": {"job_timeout": "soon"}})


def _record_with_list_headers(platform: Platform, job_id: str) -> None:
    platform.manager.db.update("jobs", job_id, {"$set": {"data.kwargs": ["not", "a", "mapping"]}})


@pytest.mark.parametrize(("spoil", "expected"), [
    (_record_without_kwargs, "kwargs"),
    (_record_with_list_headers, "kwargs"),
    (_record_with_text_max_attempts, "max_attempts"),
    (_record_with_bad_timeout, "soon"),
], ids=["missing kwargs", "kwargs not a mapping", "max_attempts not a number", "unparsable job_timeout"])
def test_a_malformed_job_record_fails_clearly_in_the_record_and_the_run(
    platform: Platform, tmp_path: Path, spoil: Any, expected: str
) -> None:
    job_id = counting_job(platform, tmp_path, sleep=0)
    spoil(platform, job_id)

    run = finished(submit_job(job_id))

    record = platform.job(job_id)
    assert run.state.is_failed() and expected in run.state.message
    assert record["error"] is True and record["inProgress"] is False and expected in record["errorMessage"]
    assert calls(tmp_path) == []


def _zip_bomb() -> bytes:
    """A few MB that expand past the default 4 GiB limit (written in chunks, never held in memory)."""
    data = io.BytesIO()
    chunk = b"\0" * (64 * 1024 * 1024)
    with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("__init__.py", "def run(**kwargs):\n    return 1\n")
        with archive.open("padding.bin", "w", force_zip64=True) as padding:
            for _ in range(4 * 1024 // 64 + 1):
                padding.write(chunk)
    return data.getvalue()


def _symlink_archive() -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("__init__.py", "def run(**kwargs):\n    return 1\n")
        link = zipfile.ZipInfo("escape")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc")
    return data.getvalue()


def _absolute_path_archive() -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("__init__.py", "def run(**kwargs):\n    return 1\n")
        archive.writestr(zipfile.ZipInfo("/tmp/dcm-flows-absolute-escape.txt"), "written outside")
    return data.getvalue()


@pytest.mark.parametrize(("archive", "expected"), [
    (_absolute_path_archive, "absolute"),
    (_symlink_archive, "link"),
    (_zip_bomb, "expands to more than"),
    (lambda: zip_files({"__init__.py": "x"})[: 40] + b"garbage", "corrupt"),
], ids=["absolute path", "symlink", "zip bomb", "corrupt archive"])
def test_a_hostile_module_archive_fails_the_job_and_writes_nothing_outside_its_folder(
    platform: Platform, tmp_path: Path, archive: Any, expected: str
) -> None:
    before = set(os.listdir("/tmp"))
    service = platform.service(f"hostile-{tmp_path.name}", "", module_zip=archive())
    job_id = platform.service_job(service)

    run = finished(submit_job(job_id))

    record = platform.job(job_id)
    assert run.state.is_failed()
    assert record["error"] is True and expected in record["errorMessage"].lower(), record["errorMessage"]
    assert not Path("/tmp/dcm-flows-absolute-escape.txt").exists()
    left = {name for name in set(os.listdir("/tmp")) - before if name.startswith(f"dcm-job-{job_id}")}
    assert left == set(), "the job's temporary folder was left behind"


def test_a_callback_gets_a_private_folder_and_none_of_the_workers_credentials(
    platform: Platform, tmp_path: Path
) -> None:
    job_id = platform.service_job(platform.service(f"privilege-{tmp_path.name}", PRIVILEGE_SERVICE))

    run = finished(submit_job(job_id))

    assert run.state.is_completed(), run.state.message
    seen = platform.job(job_id)["result"]
    assert Path(seen["job_folder"]).name.startswith(f"dcm-job-{job_id}")
    assert seen["job_folder_mode"] & 0o077 == 0, f"the job folder is open to others: {oct(seen['job_folder_mode'])}"
    assert seen["job_folder_owner"] == seen["uid"]
    assert not [name for name in seen["variables"] if name.startswith(("PREFECT_", "DCM_DB_"))]
    assert "DCM-PROCESSOR-SERVICE-DB-URL" in seen["variables"]
    assert not Path(seen["job_folder"]).exists(), "the job folder outlived the run"


CRASH_DETECTION_SECONDS = 120
WORKER_MEMORY_BOUND_MB = 400


def test_a_killed_flow_run_process_is_crashed_by_its_worker_and_recorded_on_the_job(
    platform: Platform, start_sleeper: Callable[..., SleeperRun]
) -> None:
    sleeper = start_sleeper()
    job_id, flow_run_id, callback = sleeper.job_id, sleeper.flow_run_id, sleeper.callback
    job_folder = job_folder_of(callback)

    os.kill(parent_of(callback), signal.SIGKILL)

    eventually(lambda: not process_alive(callback), timeout=15)
    eventually(lambda: not job_folder.exists(), timeout=15)
    assert finished(flow_run_id, timeout=60).state.is_crashed()
    record = eventually(lambda: (job := platform.job(job_id))["error"] and job, timeout=90)
    assert f"flow run {flow_run_id} crashed" in record["errorMessage"]
    assert record["inProgress"] is False and record["done"] is False


def test_a_job_whose_process_and_worker_are_killed_is_crashed_in_time_and_its_session_skips_dependents(
    platform: Platform, tmp_path: Path, stack: StackState, local_stack: LocalStack
) -> None:
    session_id = platform.session()
    job_id, pid_file = platform.sleeper_job(tmp_path, session_id=session_id)
    dependent_service = platform.service(f"dependent-{tmp_path.name}", "def run(**kwargs):\n    return 1\n")
    dependent = platform.service_job(dependent_service, session_id=session_id, depends_on=[job_id])
    session_run_id = submit_session(session_id, jobs_in_session=False)
    callback = running_callback(pid_file)
    job_run_id = platform.job(job_id)["flowRunId"]
    worker = stack.processes["process-worker"]
    job_folder = job_folder_of(callback)

    os.kill(worker, signal.SIGKILL)
    os.kill(parent_of(callback), signal.SIGKILL)
    killed = time.monotonic()
    eventually(lambda: not process_alive(callback), timeout=15)
    eventually(lambda: not job_folder.exists(), timeout=15)
    eventually(lambda: not process_alive(worker), timeout=15)
    local_stack.start_workers(stack)  # as a service manager restarts a worker that died

    crashed = eventually(lambda: (run := read_flow_run(job_run_id)).state.is_crashed() and run,
                         timeout=CRASH_DETECTION_SECONDS + 30, interval=1)
    assert time.monotonic() - killed < CRASH_DETECTION_SECONDS
    assert f"no heartbeat for {MISSED_HEARTBEATS_SECONDS} s" in crashed.state.message
    session_run = finished(session_run_id, timeout=120)
    assert session_run.state.is_failed()
    record = platform.job(job_id)
    assert record["error"] is True and record["inProgress"] is False and "crashed" in record["errorMessage"].lower()
    assert "skipped: dependency" in platform.job(dependent)["errorMessage"]


def test_a_killed_session_process_crashes_the_job_runs_inside_it_and_a_retry_finishes_the_session(
    platform: Platform, tmp_path: Path, stack: StackState
) -> None:
    session_id = platform.session()
    job_id, pid_file = platform.sleeper_job(tmp_path, session_id=session_id)
    dependent_service = platform.service(f"dependent-{tmp_path.name}", "def run(**kwargs):\n    return 1\n")
    dependent = platform.service_job(dependent_service, session_id=session_id, depends_on=[job_id])
    session_run_id = submit_session(session_id)
    callback = running_callback(pid_file)
    job_run_id = platform.job(job_id)["flowRunId"]
    session_process = parent_of(callback)
    assert parent_of(session_process) == stack.processes["warm-engine"]
    assert read_flow_run(job_run_id).infrastructure_pid is None, "the job ran in the session's process, no worker's"
    job_folder = job_folder_of(callback)

    os.kill(session_process, signal.SIGKILL)
    killed = time.monotonic()
    eventually(lambda: not process_alive(callback), timeout=15)
    eventually(lambda: not job_folder.exists(), timeout=15)

    assert finished(session_run_id, timeout=60).state.is_crashed()
    crashed = eventually(lambda: (run := read_flow_run(job_run_id)).state.is_crashed() and run, timeout=90, interval=1)
    assert f"its session's flow run {session_run_id} crashed" in crashed.state.message
    record = eventually(lambda: (job := platform.job(job_id))["error"] and job, timeout=90, interval=1)
    assert time.monotonic() - killed < CRASH_DETECTION_SECONDS
    assert record["inProgress"] is False and f"flow run {job_run_id} crashed" in record["errorMessage"]
    assert platform.job(dependent)["done"] is False

    platform.manager.db.update("jobs", job_id, {"$set": {"data.kwargs.params.sleep": 0}})
    with get_client(sync_client=True) as client:  # what an operator does: retry the session's run
        client.set_flow_run_state(session_run_id, Scheduled(), force=True)
    assert finished(session_run_id, timeout=300).state.is_completed()
    assert platform.job(job_id)["done"] is True and platform.job(dependent)["done"] is True


def test_a_callback_whose_session_process_is_killed_stops_at_once_and_leaves_no_side_effect_nor_folder(
    platform: Platform, tmp_path: Path
) -> None:
    session_id = platform.session()
    pid_file, marker = tmp_path / "pid", tmp_path / "side-effects"
    service = platform.service(f"last-step-{tmp_path.name}",
                               LAST_STEP_SERVICE.format(pid_file=str(pid_file), marker=str(marker)))
    platform.service_job(service, session_id=session_id)
    submit_session(session_id)
    callback = int(eventually(lambda: pid_file.exists() and pid_file.read_text(), timeout=120, interval=0.01))
    job_folder = job_folder_of(callback)

    os.kill(parent_of(callback), signal.SIGKILL)

    eventually(lambda: not process_alive(callback), timeout=5, interval=0.05)
    time.sleep(1)
    assert not marker.exists(), "the callback went on after its run's process had died"
    assert not job_folder.exists()


def test_the_folder_of_a_job_whose_run_was_killed_before_its_callback_started_is_removed_by_the_next_job(
    platform: Platform, tmp_path: Path
) -> None:
    ended = subprocess.Popen(["true"])
    ended.wait()
    abandoned = Path(tempfile.gettempdir()) / f"dcm-job-{'0' * 24}-{ended.pid}-abcd1234"
    (abandoned / "service_module").mkdir(parents=True)
    service = platform.service(f"next-{tmp_path.name}", "def run(**kwargs):\n    return 1\n")

    run = finished(submit_job(platform.service_job(service)))

    assert run.state.is_completed(), run.state.message
    assert not abandoned.exists()


def test_a_retried_session_runs_each_job_under_a_flow_run_of_its_own_whatever_order_its_jobs_start_in(
    platform: Platform, tmp_path: Path
) -> None:
    session_id = platform.session()
    quick_service = platform.service(f"quick-{tmp_path.name}", "def run(**kwargs):\n    return 1\n")
    quick = platform.service_job(quick_service, session_id=session_id)
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first, first_pid = platform.sleeper_job(tmp_path / "first", session_id=session_id)
    second, second_pid = platform.sleeper_job(tmp_path / "second", session_id=session_id)
    session_run_id = submit_session(session_id)
    callbacks = [running_callback(first_pid), running_callback(second_pid)]
    eventually(lambda: platform.job(quick)["done"], timeout=60)
    for sleeper in (first, second):
        platform.manager.db.update("jobs", sleeper, {"$set": {"data.kwargs.params.sleep": 0}})
    os.kill(parent_of(callbacks[0]), signal.SIGKILL)
    assert finished(session_run_id, timeout=60).state.is_crashed()

    retry(session_run_id)  # at once, as an operator who sees it crash does; crash repair is still at work
    final = finished(session_run_id, timeout=300)
    for _ in range(2):  # it ended Failed: a job was still held by a crashed run at its start (under load, twice)
        if final.state.is_completed():
            break
        retry(session_run_id)
        final = finished(session_run_id, timeout=300)
    assert final.state.is_completed(), final.state.message

    for job_id in (quick, first, second):
        assert platform.job(job_id)["done"] is True
        assert job_of_the_run_that_published(job_id) == job_id, "a job ran under another job's flow run"


def retry(flow_run_id: UUID) -> None:
    """What an operator's Retry in the UI does."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Scheduled(), force=True)


def job_of_the_run_that_published(job_id: str) -> str:
    """The job a flow run was started for (its parameter), for the run that published the job's newest outcome."""
    with get_client(sync_client=True) as client:
        outcome = client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(
            key=ArtifactCollectionFilterKey(any_=[f"dcm-job-{job_id}"])))[0]
        assert outcome.flow_run_id is not None
        return str(client.read_flow_run(outcome.flow_run_id).parameters["job_id"])


def test_cancelling_a_session_cancels_the_job_running_in_its_process_and_kills_the_callback(
    platform: Platform, tmp_path: Path
) -> None:
    session_id = platform.session()
    job_id, pid_file = platform.sleeper_job(tmp_path, session_id=session_id)
    session_run_id = submit_session(session_id)
    callback = running_callback(pid_file)
    job_run_id = platform.job(job_id)["flowRunId"]

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(session_run_id, Cancelling(), force=True)

    assert finished(session_run_id, timeout=90).state.is_cancelled()
    assert finished(job_run_id, timeout=30).state.is_cancelled()
    eventually(lambda: not process_alive(callback), timeout=30)
    record = eventually(lambda: (job := platform.job(job_id))["error"] and job, timeout=30)
    assert "cancelled" in record["errorMessage"] and record["inProgress"] is False


def test_a_database_outage_while_a_job_starts_and_while_it_finishes_is_ridden_out(
    platform: Platform, tmp_path: Path, stack: StackState, local_stack: LocalStack
) -> None:
    job_id, pid_file = platform.sleeper_job(tmp_path, sleep=6)
    flow_run_id = submit_job(job_id)
    with database_away(local_stack, stack):  # the run starts while the database is away ...
        time.sleep(8)
    callback = running_callback(pid_file)
    with database_away(local_stack, stack):  # ... and finishes while it is away again
        eventually(lambda: not process_alive(callback), timeout=30)
        time.sleep(4)

    run = finished(flow_run_id, timeout=180)

    assert run.state.is_completed(), run.state.message
    record = platform.job(job_id)
    assert record["done"] is True and record["inProgress"] is False and record["result"] == "slept"
    assert record.get("attempts", 0) == 0


def test_a_database_outage_that_outlasts_the_retries_crashes_the_run_and_its_retry_records_what_the_callback_returned(
    platform: Platform, start_sleeper: Callable[..., SleeperRun], stack: StackState, local_stack: LocalStack,
    tmp_path: Path,
) -> None:
    sleeper = start_sleeper(sleep=3)
    job_id, flow_run_id = sleeper.job_id, sleeper.flow_run_id
    with database_away(local_stack, stack):
        run = finished(flow_run_id, timeout=240)

    assert run.state.is_crashed()
    assert "could not be recorded: platform database unavailable" in run.state.message
    record = eventually(lambda: (job := platform.job(job_id))["error"] and job, timeout=150, interval=1)
    assert record["done"] is False and record["inProgress"] is False
    assert f"flow run {flow_run_id} crashed" in record["errorMessage"]

    (tmp_path / "callback.pid").unlink()
    other_job = platform.service_job(platform.service(f"other-{tmp_path.name}", "def run(**kwargs):\n    return 1\n"))
    assert finished(submit_job(other_job)).state.is_completed()  # it removes the folders of runs that are gone
    retry = finished(submit_job(job_id))  # what docs/operating.md tells an operator to do after a long outage

    assert retry.state.is_completed(), retry.state.message
    assert not (tmp_path / "callback.pid").exists(), "the retry called the callback again"
    record = platform.job(job_id)
    assert record["done"] is True and record["error"] is False and record["result"] == "slept"
    assert any("the callback is not called again" in log.message for log in logs_of_ended_run(retry.id))


def test_a_prefect_server_restart_in_the_middle_of_a_session_loses_no_job_and_runs_none_twice(
    platform: Platform, tmp_path: Path, stack: StackState, local_stack: LocalStack
) -> None:
    session_id = platform.session()
    jobs: list[str] = []
    for name in ("first", "second", "third"):
        (tmp_path / name).mkdir()
        jobs.append(counting_job(platform, tmp_path / name, sleep=4, session_id=session_id))
        if len(jobs) > 1:
            platform.manager.db.update("jobs", jobs[-1], {"$set": {"depends_on": [jobs[-2]]}})
    session_run_id = submit_session(session_id)
    eventually(lambda: calls(tmp_path / "second"), timeout=120)

    local_stack.restart_server(stack)

    session_run = finished(session_run_id, timeout=300)
    if not session_run.state.is_completed():  # what an operator does: retry the session's run
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(session_run_id, Scheduled(), force=True)
        session_run = finished(session_run_id, timeout=300)
    assert session_run.state.is_completed(), session_run.state.message
    assert [len(calls(tmp_path / name)) for name in ("first", "second", "third")] == [1, 1, 1]
    assert all(platform.job(job_id)["done"] for job_id in jobs)


def test_concurrent_sessions_finish_every_job_exactly_once_with_bounded_worker_memory(
    stack: StackState, database, tmp_path: Path
) -> None:
    with separate_database(database, "load") as (name, own):
        marker = tmp_path / "callbacks"
        report = run_load(in_session_target(own, name, stack.processes, tmp_path, marker), sessions=2, series=5,
                          marker=marker, timeout_seconds=600)

    assert report.sessions_completed == 2
    assert report.jobs == 2 * (5 + 2)
    assert (report.jobs_not_done, report.callbacks_run_twice, report.callbacks_missing) == (0, 0, 0)
    assert report.worker_peak_rss_mb < WORKER_MEMORY_BOUND_MB
