"""Faults against the real stack: no job lost, none run twice, nothing left running, hostile input refused.

The processes are real: runs are submitted through the Prefect API to the stack's process worker,
processes are killed by PID, and records are read back from SecantusDB.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
from prefect.client.schemas.objects import FlowRun

from flows.submit import submit_job, submit_session
from tests.conftest import finished
from tests.platform import Platform, zip_files

pytestmark = pytest.mark.integration

COUNTING_SERVICE = """
import os, time

def run(session_id, job_name, headers, params, added_params, **kwargs):
    with open({marker!r}, "a") as marker:
        marker.write(f"{{os.getpid()}}\\n")
    time.sleep({sleep})
    return {{"pid": os.getpid()}}
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
    """Call `submit` twice from two threads released at the same moment; return both results."""
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def call(index: int) -> None:
        barrier.wait()
        results[index] = submit(*arguments)

    threads = [threading.Thread(target=call, args=(index,)) for index in range(2)]
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


def test_the_same_session_submitted_twice_at_once_runs_each_job_once(platform: Platform, tmp_path: Path) -> None:
    session_id = platform.session()
    counting_job(platform, tmp_path, sleep=1, session_id=session_id)

    runs = [finished(run_id, timeout=300) for run_id in at_once(submit_session, session_id)]

    assert sorted(run.state.name for run in runs) == ["Completed", "Duplicate"]
    duplicate = next(run for run in runs if run.state.name == "Duplicate")
    assert "already being run by flow run" in duplicate.state.message
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
