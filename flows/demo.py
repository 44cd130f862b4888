"""`make demo`: the main job end to end on the embedded stack, the way the platform produces it.

The example service is registered, pydicom's bundled MR image is stored as a three-instance series
by the platform's own `DBManager.upload_dicom_dataset`, the platform's unmodified job scheduler turns
the patient into a session (pre-services, one series job, post-services), and the session runs as one
`dcm-session` flow run whose jobs are child `dcm-job` runs, triggered through the Prefect API.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from uuid import UUID

from dcm_processor_job_scheduler import JobScheduler
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from blocks.database import DcmDatabase
from flows.install import install_component_flow
from flows.runtime.records import PlatformRecords
from flows.stack import DATABASE_BLOCK, PROJECT_DIR, LocalStack, StackState
from flows.submit import submit_session, wait_for_run

EXAMPLE_COMPONENT = PROJECT_DIR / "examples" / "components" / "series-summary"
DEMO_PEER = "demo-peer"
SERIES_INSTANCES = 3
PATIENT_WAIT_SECONDS = 5


def upload_example_patient(
    database: DcmDatabase, patient_id: str = "DEMO-1", series: int = 1, instances: int = SERIES_INSTANCES
) -> None:
    """Store pydicom's MR_small as one study of `series` series with `instances` images each, through
    the platform's own `upload_dicom_dataset`, as the DICOM listener would."""
    manager = database.open()
    study_uid = generate_uid()
    for _ in range(series):
        series_uid = generate_uid()
        for number in range(1, instances + 1):
            dataset = dcmread(get_testdata_file("MR_small.dcm"))
            dataset.PatientID = patient_id
            dataset.StudyInstanceUID = study_uid
            dataset.SeriesInstanceUID = series_uid
            dataset.SOPInstanceUID = generate_uid()
            dataset.InstanceNumber = number
            manager.upload_dicom_dataset(dataset, peer_id=DEMO_PEER)


def schedule_stable_patient(database: DcmDatabase, records: PlatformRecords, device_id: str | None = None) -> str:
    """Let the platform's scheduler turn the stored patient into a session; return the session id."""
    manager = database.open()
    patient = None
    deadline = time.monotonic() + PATIENT_WAIT_SECONDS
    while patient is None and time.monotonic() < deadline:
        patient = manager.get_completed_patient(timeout=0)
        time.sleep(0 if patient else 0.1)
    if patient is None:
        raise RuntimeError("no stored patient is ready for scheduling")
    scheduler = JobScheduler(
        dburl=database.url.get_secret_value(), dbname=database.database_name, dbprovider=database.provider,
        device_id=device_id,
    )
    scheduler.process_patient(patient)
    session_id = records.latest_session_of_patient(patient["_id"])
    assert session_id is not None, "the scheduler created no session"
    return session_id


def run_demo(stack: LocalStack, say: Callable[[str], None] = print) -> list[tuple[str, str, object]]:
    """Run the demo; return (job label, final Prefect state, job record result) for each job."""
    say(f"Starting the embedded stack in {stack.home} ...")
    state: StackState = stack.start()
    say(f"  database  {state.database_url}\n  Prefect   {state.ui_url}")
    with stack.connected(state):
        return _run_session(state, say)


def _run_session(state: StackState, say: Callable[[str], None]) -> list[tuple[str, str, object]]:
    database = DcmDatabase.load(DATABASE_BLOCK)
    records = PlatformRecords(database.open())
    install_component_flow(str(EXAMPLE_COMPONENT), force=True)
    say("Installed the example component 'series-summary' (a dcm-install-component run).")
    upload_example_patient(database)
    session_id = schedule_stable_patient(database, records)
    jobs = records.session_jobs(session_id)
    say(f"The platform's scheduler created session {session_id} with {len(jobs)} jobs; running it ...")
    session_run_id: UUID = submit_session(session_id)
    session_run = wait_for_run(session_run_id)
    say(f"  session run {session_run.state.name if session_run.state else 'unknown'}: "
        f"{state.ui_url}/runs/flow-run/{session_run_id}")
    outcomes = [("session", session_run.state.name if session_run.state else "unknown", None)]
    for job in jobs:
        record = records.job(job.id)
        outcome = "done" if record.done else "failed" if record.failed else "not run"
        value = record.result if record.done else record.error_message
        say(f"  {job.label:28} {outcome:8} {value}")
        outcomes.append((job.label, "Completed" if record.done else outcome, value))
    say(f"Open {state.ui_url}/runs to see every run, its three tasks and its logs.")
    say("Stop the stack with `dcm-flows stack stop`.")
    return outcomes
