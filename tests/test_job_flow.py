"""The dcm-job flow against the real stack: a process worker, SecantusDB and real virtual environments."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
)
from prefect.states import Cancelling, Pending

from blocks.database import DcmDatabase
from flows.runtime.names import JOB_FLOW, deployment
from flows.runtime.variables import SERVICE_PREFIX
from flows.submit import submit_job
from ops.stack import StackState, process_alive
from tests.conftest import SleeperRun, eventually, finished, logs_of_ended_run, read_flow_run, read_logs
from tests.platform import IDENTIFYING_METADATA, PATIENT_NAME, Platform, zip_files

pytestmark = pytest.mark.integration

PREFECT = str(Path(sys.executable).parent / "prefect")
SERVICE_VARIABLES = [
    "DB-PROVIDER", "DB-URL", "DB-NAME", "SESSION-ID", "JOB-ID", "JOB-EVENT", "JOB-NAME",
    "JOB-SERVICE-NAME", "PEER-ID",
]

ENVIRONMENT_REPORTING_SERVICE = """
import os, sys
from dcm_processor_service import set_session_data, get_session_data

def run(session_id, job_name, headers, params, added_params, **kwargs):
    set_session_data("seen", {"threshold": params["threshold"]})
    return {
        "python": sys.executable,
        "variables": {k: v for k, v in os.environ.items() if k.startswith("DCM-PROCESSOR-SERVICE-")},
        "prefect_variables": sorted(k for k in os.environ if k.startswith("PREFECT_")),
        "session_data": get_session_data("seen"),
        "headers_id": str(headers["_id"]),
        "job_name": job_name,
    }
"""


def run_job(job_id: str, timeout: float = 180):
    flow_run_id = submit_job(job_id)
    return flow_run_id, finished(flow_run_id, timeout)


def test_job_without_worker_runs_in_the_runtime_interpreter_and_records_its_value(
    platform: Platform, stack: StackState
) -> None:
    job_id = platform.service_job(platform.service("report-local", ENVIRONMENT_REPORTING_SERVICE))

    completed = subprocess.run(
        [PREFECT, "deployment", "run", "dcm-job/process", "-p", f"job_id={job_id}", "--watch"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PREFECT_API_URL": stack.api_url},
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    record = platform.job(job_id)
    assert record["done"] is True and record["inProgress"] is False and record["progress"] == 100
    assert record["completedAt"] is not None
    result = record["result"]
    assert Path(result["python"]).resolve() == Path(sys.executable).resolve()
    assert result["session_data"] == {"threshold": 3}
    assert result["job_name"] == "run"


def test_venv_worker_job_runs_with_the_worker_python_and_sees_every_service_variable(
    platform: Platform, service_venv: Path, database: DcmDatabase
) -> None:
    worker_id = platform.venv_worker("report-venv-worker", str(service_venv))
    job_id = platform.service_job(platform.service("report-venv", ENVIRONMENT_REPORTING_SERVICE), worker_id=worker_id)

    _, flow_run = run_job(job_id)

    assert flow_run.state.is_completed(), flow_run.state.message
    record = platform.job(job_id)
    result = record["result"]
    assert result["python"] == str(service_venv)
    assert sorted(result["variables"]) == sorted(SERVICE_PREFIX + name for name in SERVICE_VARIABLES)
    variables = result["variables"]
    assert variables[SERVICE_PREFIX + "JOB-ID"] == job_id
    assert variables[SERVICE_PREFIX + "SESSION-ID"] == str(record["sessionId"])
    assert variables[SERVICE_PREFIX + "DB-URL"] == database.open().dburl
    assert variables[SERVICE_PREFIX + "JOB-EVENT"] == "stable-series"
    assert variables[SERVICE_PREFIX + "JOB-SERVICE-NAME"] == "report-venv"
    assert variables[SERVICE_PREFIX + "PEER-ID"] == "test-peer"
    assert result["prefect_variables"] == [], "the worker's Prefect settings must not reach callbacks"
    assert result["session_data"] == {"threshold": 3}


def test_worker_pre_and_post_scripts_run_around_the_callback_with_a_session_dir(
    platform: Platform, service_venv: Path
) -> None:
    script = """
    import os
    from dcm_processor_service import set_session_data
    def callback(session_id, job_name, headers, params, added_params, session_dir, **kwargs):
        set_session_data("{name}", {{"session_dir_exists": os.path.isdir(session_dir)}})
    """
    worker_id = platform.venv_worker(
        "scripted-worker", str(service_venv),
        scripts={"pre.py": script.format(name="pre"), "post.py": script.format(name="post")},
        pre_scripts=["pre.py"], post_scripts=["post.py"],
    )
    service = """
    from dcm_processor_service import get_session_data
    def run(**kwargs):
        return {"pre_ran_before": get_session_data("pre")}
    """
    job_id = platform.service_job(platform.service("scripted", service), worker_id=worker_id)

    _, flow_run = run_job(job_id)

    assert flow_run.state.is_completed(), flow_run.state.message
    assert platform.job(job_id)["result"] == {"pre_ran_before": {"session_dir_exists": True}}
    post = platform.manager.get_session_data(job_id=job_id, name="post")
    assert post["value"] == {"session_dir_exists": True}


def test_pre_and_post_services_jobs_run_the_session_hooks_of_dcm_processor_service(platform: Platform) -> None:
    session_id = platform.session()
    pre_job = platform.session_hook_job(session_id, pre=True)
    post_job = platform.session_hook_job(session_id, pre=False)

    pre_run_id, pre_run = run_job(pre_job)
    _, post_run = run_job(post_job)

    assert pre_run.state.is_completed() and post_run.state.is_completed()
    assert any("PRE SERVICES CALLED!" in log.message for log in logs_of_ended_run(pre_run_id))
    assert platform.job(pre_job)["done"] and platform.job(post_job)["done"]
    assert platform.manager.get_session(session_id) is None, "post-services cleans up the session"


def test_unknown_job_fails_the_run_with_a_clear_message(stack: StackState) -> None:
    from prefect.deployments import run_deployment

    flow_run = run_deployment("dcm-job/process", parameters={"job_id": "0123456789abcdef01234567"}, timeout=0)
    final = finished(flow_run.id)

    assert final.state.is_failed()
    assert "no job with id 0123456789abcdef01234567" in final.state.message


def test_archive_entry_escaping_the_module_folder_fails_the_job_and_writes_nothing_outside(
    platform: Platform, tmp_path: Path
) -> None:
    target = Path("/tmp/dcm-escape-test-marker")
    target.unlink(missing_ok=True)
    archive = zip_files({
        "__init__.py": "def run(**kwargs):\n    return 1\n",
        "../../../../../../tmp/dcm-escape-test-marker": "x",
    })
    job_id = platform.service_job(platform.service("escaping", "", module_zip=archive))

    _, flow_run = run_job(job_id)

    assert flow_run.state.is_failed()
    record = platform.job(job_id)
    assert record["error"] is True and record["inProgress"] is False and record["attempts"] == 1
    assert "escapes the destination folder" in record["errorMessage"]
    assert not target.exists()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def run(**kwargs):\n    raise ValueError('boom')\n", "ValueError: boom"),
        ("import os\ndef run(**kwargs):\n    os._exit(3)\n", "exited with code 3"),
        ("def run(**kwargs):\n    return object()\n", "not JSON"),
    ],
    ids=["raises", "exits-3", "not-json"],
)
def test_failing_callback_leaves_run_failed_and_record_saying_why(
    platform: Platform, source: str, expected: str
) -> None:
    job_id = platform.service_job(platform.service(f"failing-{abs(hash(source))}", source))

    _, flow_run = run_job(job_id)

    assert flow_run.state.is_failed()
    record = platform.job(job_id)
    assert record["error"] is True and record["done"] is False and record["inProgress"] is False
    assert expected in record["errorMessage"]
    assert record["attempts"] == 1 and record["lastErrorAt"] is not None


def test_callback_running_past_its_timeout_is_killed_and_recorded(platform: Platform, tmp_path: Path) -> None:
    job_id, pid_file = platform.sleeper_job(tmp_path, timeout="3s")

    _, flow_run = run_job(job_id)

    assert flow_run.state.is_failed()
    assert "timed out after 3 s" in platform.job(job_id)["errorMessage"]
    assert not process_alive(int(pid_file.read_text()))


def test_cancelling_the_run_kills_the_callback_and_records_the_cancellation(
    platform: Platform, start_sleeper: Callable[..., SleeperRun]
) -> None:
    sleeper = start_sleeper()
    job_id, flow_run_id, pid = sleeper.job_id, sleeper.flow_run_id, sleeper.callback

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
    final = finished(flow_run_id)

    assert final.state.is_cancelled()
    eventually(lambda: not process_alive(pid), timeout=30)
    record = eventually(lambda: (job := platform.job(job_id))["error"] and job, timeout=30)
    assert "cancelled" in record["errorMessage"] and record["inProgress"] is False


def test_callback_output_reaches_the_prefect_logs_while_it_runs(platform: Platform, tmp_path: Path) -> None:
    job_id, _ = platform.sleeper_job(tmp_path, sleep=12)
    flow_run_id = submit_job(job_id)

    eventually(lambda: any(log.message == "first line" for log in read_logs(flow_run_id)), timeout=120)

    assert not read_flow_run(flow_run_id).state.is_final(), "the first line arrived before the run ended"
    final = finished(flow_run_id)
    assert final.state.is_completed()
    eventually(lambda: any(log.message == "second line" for log in read_logs(flow_run_id)), timeout=30)


def test_failed_callback_is_retried_only_when_the_job_allows_more_attempts(
    platform: Platform, tmp_path: Path
) -> None:
    marker = tmp_path / "first-attempt-done"
    source = f"""
import os
def run(**kwargs):
    if not os.path.exists({str(marker)!r}):
        open({str(marker)!r}, "w").close()
        raise RuntimeError("transient")
    return "second attempt"
"""
    job_id = platform.service_job(platform.service("flaky", source), max_attempts=2)

    _, flow_run = run_job(job_id)

    assert flow_run.state.is_completed(), flow_run.state.message
    assert platform.job(job_id)["result"] == "second attempt"


LEAKING_SERVICE = """
import os, sys

def run(session_id, job_name, headers, params, added_params, **kwargs):
    metadata = headers["Metadata"]
    family, given = metadata["PatientName"].split("^")
    said = [value for value in metadata.values() if isinstance(value, str)]
    said += [f"{given} {family}", f"{family.upper()}, {given}", "1970-04-12",
             os.environ["DCM-PROCESSOR-SERVICE-DB-URL"]]
    print("harmless: 42 slices checked")
    for value in said:
        print(f"processing patient{value}")
        print(f"warning about {value}", file=sys.stderr)
    raise ValueError("bad series for " + " / ".join(said))
"""


def stored_by_prefect(flow_run_id: UUID) -> dict[str, Any]:
    """What the Prefect API holds of a flow run: the run, its task runs, logs, artifacts and events."""
    with get_client(sync_client=True) as client:
        page = client.request("POST", "/events/filter", json={
            "filter": {"any_resource": {"id_prefix": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 50,
        }).json()
        events = page["events"]
        while page.get("next_page"):
            page = client._client.get(page["next_page"]).json()
            events += page["events"]
        return {
            "flow_run": client.read_flow_run(flow_run_id).model_dump(mode="json"),
            "task_runs": [run.model_dump(mode="json") for run in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), task_run_filter=TaskRunFilter()
            )],
            "logs": [log.model_dump(mode="json") for log in logs_of_ended_run(flow_run_id)],
            "artifacts": [artifact.model_dump(mode="json") for artifact in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )],
            "events": events,
        }


def sensitive_values(database: DcmDatabase) -> list[str]:
    url = database.url.get_secret_value()
    family, given = PATIENT_NAME.split("^")
    values = [value for value in IDENTIFYING_METADATA.values() if "^" not in value and "\\" not in value]
    values += ["ALT-1122", "ALT-3344", "1970-04-12", "Houseman", "Quinlan", given, f"{given} {family}",
               PATIENT_NAME, "Doe^", url, urlparse(url).netloc]
    return values


def test_no_patient_data_or_database_url_reaches_prefect(
    platform: Platform, database: DcmDatabase, stack: StackState
) -> None:
    source = "def run(session_id, job_name, headers, params, added_params, **kwargs):\n    return 'ok'\n"
    job_id = platform.service_job(platform.service("private", source))
    flow_run_id, flow_run = run_job(job_id)
    assert flow_run.state.is_completed()

    stored = stored_by_prefect(flow_run_id)
    text = json.dumps(stored)

    assert stored["artifacts"], "the outcome artifact exists"
    assert len(stored["task_runs"]) == 3
    assert stored["flow_run"]["parameters"] == {"job_id": job_id, "database_block": "default"}
    for secret in sensitive_values(database):
        assert secret not in text


def test_what_a_service_prints_and_raises_about_its_patient_reaches_prefect_redacted_and_the_record_in_full(
    platform: Platform, database: DcmDatabase, stack: StackState
) -> None:
    job_id = platform.service_job(platform.service("leaky", LEAKING_SERVICE), max_attempts=2)

    flow_run_id, flow_run = run_job(job_id)

    assert flow_run.state.is_failed()
    record = platform.job(job_id)
    assert "bad series for" in record["errorMessage"] and PATIENT_NAME in record["errorMessage"]

    def failed_event_stored() -> dict[str, Any] | None:
        found = stored_by_prefect(flow_run_id)
        return found if any(event["event"] == "prefect.flow-run.Failed" for event in found["events"]) else None

    stored = eventually(failed_event_stored)
    text = json.dumps(stored)
    logged = [log["message"] for log in stored["logs"]]
    assert "harmless: 42 slices checked" in logged
    assert any(line.startswith("attempt 1 of 2 failed") for line in logged)
    assert "bad series for [" in flow_run.state.message
    for label in ("patient name", "patient id", "other patient ids", "birth date", "accession number",
                  "institution", "referring physician", "performing physician", "study uid", "series uid",
                  "instance uid", "database url"):
        assert f"[{label}]" in text, label
    for secret in sensitive_values(database):
        assert secret.lower() not in text.lower(), secret



def test_a_package_planted_in_a_shared_folder_is_never_imported_by_a_run(
    platform: Platform, stack: StackState, tmp_path: Path
) -> None:
    marker = tmp_path / "planted-package-imported"
    planted = Path(tempfile.gettempdir()) / "blocks"
    assert not planted.exists(), f"{planted} exists already"
    planted.mkdir()
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    try:
        job_id = platform.service_job(platform.service("planted", "def run(**kwargs):\n    return 'ok'\n"))
        with get_client(sync_client=True) as client:
            job_deployment = client.read_deployment_by_name(deployment(JOB_FLOW))
            flow_run = client.create_flow_run_from_deployment(job_deployment.id, parameters={"job_id": job_id},
                                                              state=Pending())
        private = tmp_path / "run"
        private.mkdir(mode=0o700)
        # What a stock process worker does: a fresh engine process in a folder of its own.
        subprocess.run([sys.executable, "-m", "prefect.engine"], cwd=private, timeout=180, check=False,
                       env={**os.environ, "PREFECT__FLOW_RUN_ID": str(flow_run.id), "PREFECT_API_URL": stack.api_url})

        assert not marker.exists(), "the run imported a package another local user could have planted"
        assert finished(flow_run.id).state.is_completed()
    finally:
        shutil.rmtree(planted)
