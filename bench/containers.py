"""Docker jobs: a trivial callback through `dcm-job` on the docker pool against a raw `docker run`, and
the runtime layer's build with pip against uv.

Both run the same callback with the same interpreter in the same image (the worker image the installer
built, with this runtime's layer on top): once as a job (`submit_job`, the prefect-docker worker starts a
container whose flow run does pre-service, execute and post-service), once as `docker run --rm` of that
image with the service module mounted. The callback returns the time it started, which the job stores
in its record and the raw run prints, so trigger-to-callback-start needs no file shared with a container.
The runtime layer (this project installed into a worker image) is built on the base image with Docker's
build cache off, as the installer builds it for a new worker image.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

from bench.components import lone_job, service_component
from blocks.database import DcmDatabase
from flows.runtime.environments.docker import RUNTIME_VENV, DockerEnvironment, build_context, runtime_dockerfile
from flows.runtime.names import DEFAULT_BLOCK
from flows.runtime.platform_records import PlatformRecords
from flows.submit import submit_install, submit_job, submit_removal, wait_for_run

COMPONENT = "bench-container"
BASE_IMAGE = "dcm-flows/python-base:bookworm"
PYTHON = f"{RUNTIME_VENV}/bin/python"
STAMP_SERVICE = '''
import time


def stamp(session_id, job_name, headers, params, added_params, **kwargs):
    return time.time()
'''
WORKER_FILES = {
    "Dockerfile": f"FROM {BASE_IMAGE}\n",
    "settings.json": json.dumps({"name": COMPONENT, "build": "Dockerfile", "python_path": PYTHON}),
}


class ContainerBench:
    """The bench's docker component, installed through `dcm-install-component` into a database of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.block = f"bench-docker-{uuid.uuid4().hex[:8]}"
        self.database = DcmDatabase.load(DEFAULT_BLOCK).with_database_name(self.block)
        self.database.save(self.block, overwrite=True)
        self.records = PlatformRecords(self.database.open())
        self.patients = 0
        service_component(folder, COMPONENT, STAMP_SERVICE, [
            {"jobName": "stamp", "workerEntry": "stamp", "events": ["stable-series"]},
        ], worker=WORKER_FILES)

    def install(self) -> str:
        """Install the component (its image is built, the runtime layer added); return the job image."""
        run = wait_for_run(submit_install(str(self.folder), force=True, database_block=self.block), 900)
        assert run.state is not None and run.state.is_completed(), run.state
        worker = self.records.find_worker(COMPONENT)
        assert worker is not None
        return str(DockerEnvironment(worker).settings.runtime_image)

    def remove(self) -> None:
        wait_for_run(submit_removal(COMPONENT, database_block=self.block), 300)
        self.database.open().db.get_db().client.drop_database(self.block)

    def job(self) -> tuple[float, float, float]:
        """One job through `submit_job`: (trigger to callback start, flow run duration, trigger to end)."""
        self.patients += 1
        job_id = lone_job(self.database, self.records, f"BENCH-DOCKER-{self.patients}", "stamp")
        triggered = time.time()
        run = wait_for_run(submit_job(job_id, self.block), timeout_seconds=300, poll_seconds=0.05)
        assert run.state is not None and run.state.is_completed(), run.state
        assert run.start_time is not None and run.end_time is not None
        started = float(self.records.job(job_id).result)
        return (started - triggered, (run.end_time - run.start_time).total_seconds(),
                run.end_time.timestamp() - triggered)

    def raw_run(self, image: str) -> tuple[float, float]:
        """The callback in `docker run --rm` of the job's image: (trigger to callback start, trigger to end)."""
        code = ("import sys; sys.path.insert(0, '/bench'); import module; "
                "print(module.stamp(None, 'stamp', {}, {}, {}))")
        triggered = time.time()
        output = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", "-v", f"{self.folder / 'module'}:/bench/module:ro",
             image, PYTHON, "-c", code], check=True, capture_output=True, text=True,
        ).stdout
        ended = time.time()
        return float(output.strip().splitlines()[-1]) - triggered, ended - triggered

    def raw_import(self, image: str, modules: str) -> float:
        """`docker run --rm` of the job's image importing `modules`, trigger to imported: what a job's container,
        which runs `python -m prefect.engine` and loads the job flow, spends before its flow's first line."""
        triggered = time.time()
        output = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", image, PYTHON, "-c",
             f"import time; import {modules}; print(time.time())"], check=True, capture_output=True, text=True,
        ).stdout
        return float(output.strip().splitlines()[-1]) - triggered


def runtime_layer_build(wheelhouse: Path, installer: str) -> float:
    """Seconds to build the runtime layer on the base image with `installer`, without Docker's build cache."""
    import docker

    client = docker.from_env()
    started = time.perf_counter()
    image, _ = client.images.build(
        fileobj=build_context(runtime_dockerfile(installer), wheelhouse), custom_context=True, rm=True, forcerm=True,
        nocache=True, buildargs={"WORKER_IMAGE": BASE_IMAGE}, network_mode="none",
    )
    elapsed = time.perf_counter() - started
    client.images.remove(image.id, force=True)
    return elapsed
