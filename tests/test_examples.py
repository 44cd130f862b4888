"""The example components do what the guides say, installed at once through the deployment and fed by the scheduler.

They get a database of their own, so the platform's scheduler sees only their services; each job is
submitted on its own so that the session's files can be read before post-services clears them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import nibabel
import pytest
from bson import ObjectId

from blocks.database import DcmDatabase
from blocks.host import WorkerHost
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.records import PRE_SERVICES_JOB, JobRecord
from flows.submit import submit_install, submit_job
from ops.demo import DOCKER_EXAMPLE_COMPONENT, EXAMPLE_COMPONENTS, EXAMPLES_FOLDER, schedule_stable_patient
from ops.demo import upload_example_patient as store_mr_series
from ops.stack import docker_engine_answers
from tests.conftest import finished, separate_database

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def example_database(database: DcmDatabase) -> Iterator[tuple[str, DcmDatabase]]:
    with separate_database(database, "examples") as own:
        yield own


@pytest.fixture(scope="module")
def example_jobs(
    example_database: tuple[str, DcmDatabase], wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, JobRecord]:
    """Every example installed (the docker one when an engine answers) and one MR series scheduled."""
    block, database = example_database
    WorkerHost(environments_folder=str(tmp_path_factory.mktemp("example-environments")),
               wheelhouse=str(wheelhouse)).save("default", overwrite=True)
    names = [*EXAMPLE_COMPONENTS, *([DOCKER_EXAMPLE_COMPONENT] if docker_engine_answers() else [])]
    installs = {name: submit_install(str(EXAMPLES_FOLDER / name), database_block=block) for name in names}
    for name, run_id in installs.items():
        run = finished(run_id, timeout=600)
        assert run.state.is_completed(), f"installing {name}: {run.state.message}"
    records = PlatformRecords(database.open())
    store_mr_series(database, patient_id=f"EXAMPLE-{uuid.uuid4().hex[:6]}")
    session_id = schedule_stable_patient(database, records)
    session_jobs = records.session_jobs(session_id)
    pre_services = next(job for job in session_jobs if job.function_name == PRE_SERVICES_JOB)
    assert finished(submit_job(pre_services.id, database_block=block)).state.is_completed()
    jobs = {job.service_name: job for job in session_jobs if job.service_name}
    runs = {name: submit_job(job.id, database_block=block) for name, job in jobs.items()}
    for name, run_id in runs.items():
        assert finished(run_id, timeout=300).state.is_completed(), name
    return {name: records.job(job.id) for name, job in jobs.items()}


def test_the_summary_service_reads_the_series_through_the_service_helpers(example_jobs) -> None:
    assert example_jobs["series-summary"].result == {
        "instances": 3, "modality": "MR", "shape": [3, 64, 64], "mean_intensity": pytest.approx(518.88, abs=0.01)
    }


def test_the_converter_stores_a_three_slice_nifti_made_by_dcm2niix_as_a_session_file(
    example_jobs, example_database, tmp_path: Path
) -> None:
    _, database = example_database
    job = example_jobs["nifti-converter"]
    assert job.done and job.result["slices"] == 3

    # Looked up by hand: the provider stores the session and job ids as ObjectIds but its own
    # `get_session_file` queries them as the job record holds them (strings), and finds nothing.
    files = database.open().db
    stored = files.find_one_file("sessionfiles", {"query": {"job_id": ObjectId(job.id), "name": "nifti"}})
    assert stored is not None, "no session file 'nifti' was stored"
    files.download_file("sessionfiles", id=stored["_id"], params={"filename": str(tmp_path / "series.nii.gz")})

    assert nibabel.load(tmp_path / "series.nii.gz").shape == (64, 64, 3)


@pytest.mark.docker
def test_the_docker_example_checks_the_geometry_in_its_own_image(example_jobs, example_database) -> None:
    if DOCKER_EXAMPLE_COMPONENT not in example_jobs:
        pytest.skip("no Docker engine could be reached")
    _, database = example_database
    job = example_jobs["series-qc"]

    assert job.result == {"instances": 3, "slice_spacing_mm": 0.8, "regular": True, "rows": 64, "columns": 64}
    assert database.open().get_session_data(job_id=job.id, name="geometry")["value"]["regular"] is True
