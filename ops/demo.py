"""`make demo` and `dcm-flows try`: components run end to end on the embedded stack, as the platform runs them.

The components are installed through the `dcm-install-component` deployment, pydicom's bundled MR
image is stored as a three-slice series by the platform's own `DBManager.upload_dicom_dataset`, the
platform's unmodified job scheduler turns the patient into a session (pre-services, the series jobs,
post-services), and the session runs as one `dcm-session` flow run whose jobs are child `dcm-job` runs.
The demo does this with the example components; `dcm-flows try` with the ones a service author is
writing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dcm_processor_job_scheduler import JobScheduler
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from rich.console import Console

from blocks.database import DcmDatabase
from flows.runtime.names import DEFAULT_BLOCK
from flows.runtime.platform_records import PlatformRecords
from flows.submit import submit_install, submit_session
from ops.progress import follow_run, run_link
from ops.stack import LocalStack, StackState, docker_engine_answers

EXAMPLES_FOLDER = Path(__file__).resolve().parents[1] / "examples" / "components"
"""The example components of a checkout (they are not part of the installed package)."""
EXAMPLE_COMPONENTS = ("series-summary", "nifti-converter")
DOCKER_EXAMPLE_COMPONENT = "series-qc"
DEMO_PEER = "demo-peer"
SERIES_INSTANCES = 3
PATIENT_WAIT_SECONDS = 5

Outcome = tuple[str, str, object]


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
            _place_slice(dataset, number - 1)
            manager.upload_dicom_dataset(dataset, peer_id=DEMO_PEER)


def _place_slice(dataset, index: int) -> None:
    """Move the image `index` slice thicknesses along its normal, so the series is a real volume."""
    row = [float(value) for value in dataset.ImageOrientationPatient[:3]]
    column = [float(value) for value in dataset.ImageOrientationPatient[3:]]
    normal = [row[1] * column[2] - row[2] * column[1], row[2] * column[0] - row[0] * column[2],
              row[0] * column[1] - row[1] * column[0]]
    step = index * float(dataset.SliceThickness)
    dataset.ImagePositionPatient = [float(value) + step * axis
                                    for value, axis in zip(dataset.ImagePositionPatient, normal, strict=True)]
    dataset.SliceLocation = float(dataset.get("SliceLocation", 0.0)) + step


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


def demo_components(say: Callable[[str], None]) -> list[Path]:
    """The example components; the docker one only when a Docker engine answers."""
    if not EXAMPLES_FOLDER.is_dir():
        raise FileNotFoundError(f"the demo runs the example components of a checkout; {EXAMPLES_FOLDER} is missing "
                                "(use `dcm-flows try FOLDER` with a component of your own)")
    components = [EXAMPLES_FOLDER / name for name in EXAMPLE_COMPONENTS]
    if docker_engine_answers():
        components.append(EXAMPLES_FOLDER / DOCKER_EXAMPLE_COMPONENT)
    else:
        say(f"No Docker engine answers: the docker example '{DOCKER_EXAMPLE_COMPONENT}' is left out "
            "(start one with `sudo bash .ci/docker-engine.sh`).")
    return components


def run_demo(stack: LocalStack, say: Callable[[str], None] = print, console: Console | None = None) -> list[Outcome]:
    """Run the example components on pydicom's MR series; return (job label, final state, result) per job."""
    return try_components(stack, demo_components(say), say, console)


def try_components(
    stack: LocalStack, components: Sequence[Path], say: Callable[[str], None] = print, console: Console | None = None
) -> list[Outcome]:
    """Install `components` (replacing installed versions), then run a session of pydicom's MR series.

    The stack is started when it is not running. Returns (job label, final state, result) for the
    session and each of its jobs; the scheduler gives the session every installed service's jobs.
    """
    say(f"Starting the embedded stack in {stack.home} ...")
    state: StackState = stack.start()
    say(f"  database  {state.database_url}\n  Prefect   {state.ui_url}")
    with stack.connected(state):
        for component in components:
            install_run = follow_run(submit_install(str(component.resolve()), force=True), f"install {component.name}",
                                     console)
            if install_run.state is None or not install_run.state.is_completed():
                message = install_run.state.message if install_run.state else "no state"
                raise RuntimeError(f"installing {component.name} failed: {message} "
                                   f"({run_link(state.ui_url, install_run.id)})")
            say(f"  installed {component.name}: {run_link(state.ui_url, install_run.id)}")
        return _run_session(state, say, console)


def _run_session(state: StackState, say: Callable[[str], None], console: Console | None) -> list[Outcome]:
    database = DcmDatabase.load(DEFAULT_BLOCK)
    records = PlatformRecords(database.open())
    upload_example_patient(database)
    session_id = schedule_stable_patient(database, records)
    jobs = records.session_jobs(session_id)
    say(f"The platform's scheduler created session {session_id} with {len(jobs)} jobs; running it ...")
    session_run = follow_run(submit_session(session_id), "session", console)
    session_state = session_run.state.name if session_run.state else "unknown"
    say(f"  session run {session_state}: {run_link(state.ui_url, session_run.id)}")
    outcomes: list[Outcome] = [("session", session_state, None)]
    for job in jobs:
        record = records.job(job.id)
        outcome = "done" if record.done else "failed" if record.failed else "not run"
        value = record.result if record.done else record.error_message
        say(f"  {job.label:32} {outcome:8} {value}")
        outcomes.append((job.label, "Completed" if record.done else outcome, value))
    say(f"Open {state.ui_url}/runs to see every run, its three tasks and its logs.")
    say("Stop the stack with `.venv/bin/dcm-flows stack stop`.")
    return outcomes
