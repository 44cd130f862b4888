"""docker workers on the dcm-docker pool, against a real Docker engine and a prefect-docker worker."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import zipfile

import pytest
from docker.errors import NotFound
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.states import Cancelled, Cancelling, Running

from flows.runtime.environments.docker import DockerEnvironment
from flows.runtime.records import WorkerRecord
from flows.submit import submit_job, submit_session
from ops.pool_workers import FLOW_RUN_LABEL
from ops.stack import LocalStack, StackState, process_alive
from tests.conftest import BASE_IMAGE, containers_matching, eventually, finished, logs_of_ended_run, read_logs
from tests.platform import Platform

pytestmark = [pytest.mark.integration, pytest.mark.docker]

CONTAINER_SERVICE = """
import os, sys, time
from dcm_processor_service import get_session_data, set_session_data

def run(session_id, job_name, headers, params, added_params, **kwargs):
    print("inside the container", flush=True)
    time.sleep(params.get("sleep", 0))
    return {
        "module_file": __file__,
        "python": sys.executable,
        "uid": os.getuid(),
        "session_dir": os.path.isdir("/session"),
        "data": open("/data/weights.txt").read(),
        "variables": sorted(k for k in os.environ if k.startswith("DCM-PROCESSOR-SERVICE-")),
        "pre": get_session_data("pre"),
        "docker_socket": os.path.exists("/var/run/docker.sock"),
    }
"""

SCRIPT = """
import os
from dcm_processor_service import set_session_data
def callback(session_id, job_name, headers, params, added_params, session_dir, **kwargs):
    set_session_data("{name}", {{"session_dir": session_dir, "exists": os.path.isdir(session_dir)}})
"""


def docker_worker(platform: Platform, image: str, name: str, **settings) -> str:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("weights.txt", "model weights v1")
    files = {
        "pre.py": platform.upload(SCRIPT.format(name="pre").encode(), "pre.py"),
        "post.py": platform.upload(SCRIPT.format(name="post").encode(), "post.py"),
        "data_dir": platform.upload(data.getvalue(), "data.zip"),
    }
    return platform.manager.db.create("workers", {
        "name": name, "type": "docker", "version": "0.0.1", "image": image, "worker_files": files,
        "pre_scripts": ["pre.py"], "post_scripts": ["post.py"], "data_dir": "data",
        "module_dir_mount": "/module", "data_dir_mount": "/data", "session_dir_mount": "/session",
        "params": {"command": [], "run_kwargs": {"shm_size": "64m"}}, **settings,
    })


def docker_job(platform: Platform, image: str, name: str, source: str = CONTAINER_SERVICE, timeout=None,
               params: dict | None = None) -> str:
    worker_id = docker_worker(platform, image, f"{name}-worker")
    job_id = platform.service_job(platform.service(name, source), worker_id=worker_id, timeout=timeout)
    platform.manager.db.update("jobs", job_id, {"$set": {"data.kwargs.worker_type": "docker",
                                                        "data.kwargs.params": params or {}}})
    return job_id


def containers_of(docker_client, flow_run_id) -> list:
    return containers_matching(docker_client, {"label": f"io.prefect.flow-run-id={flow_run_id}"})


def test_docker_job_runs_in_the_worker_image_with_the_platform_layout(
    platform: Platform, runtime_image: str, docker_client
) -> None:
    job_id = docker_job(platform, runtime_image, "in-container")

    flow_run_id = submit_job(job_id)
    flow_run = finished(flow_run_id, timeout=300)

    assert flow_run.state.is_completed(), flow_run.state.message
    result = platform.job(job_id)["result"]
    assert result["module_file"] == "/module/service_module/__init__.py"
    assert result["python"] == "/opt/service/bin/python3", "callbacks use the image's Python, not the runtime's"
    assert result["session_dir"] and result["data"] == "model weights v1"
    assert len(result["variables"]) == 9
    assert result["pre"] == {"session_dir": "/session", "exists": True}
    post = platform.manager.get_session_data(job_id=job_id, name="post")
    assert post["value"] == {"session_dir": "/session", "exists": True}
    assert result["uid"] != 0 and result["docker_socket"] is False
    assert any(log.message == "inside the container" for log in logs_of_ended_run(flow_run_id))
    eventually(lambda: containers_of(docker_client, flow_run_id) == [], timeout=60)


@pytest.mark.parametrize("ending", ["timeout", "cancel"])
def test_a_timed_out_or_cancelled_docker_job_leaves_no_container(
    platform: Platform, runtime_image: str, docker_client, ending: str
) -> None:
    job_id = docker_job(platform, runtime_image, f"stopped-{ending}", timeout="5s" if ending == "timeout" else None,
                        params={"sleep": 300})
    flow_run_id = submit_job(job_id)
    eventually(lambda: any(log.message == "inside the container" for log in read_logs(flow_run_id)), timeout=240)
    if ending == "cancel":
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Cancelling(), force=True)

    final = finished(flow_run_id, timeout=180)

    assert final.state.is_cancelled() if ending == "cancel" else final.state.is_failed()
    record = platform.job(job_id)
    assert record["error"] and ("timed out after 5 s" if ending == "timeout" else "cancelled") in record["errorMessage"]
    eventually(lambda: containers_of(docker_client, flow_run_id) == [], timeout=60)


def test_a_failing_callback_in_a_container_fails_the_run_and_the_record(
    platform: Platform, runtime_image: str
) -> None:
    job_id = docker_job(platform, runtime_image, "failing-in-container",
                        source="def run(**kwargs):\n    raise ValueError('bad voxel')\n")

    flow_run = finished(submit_job(job_id), timeout=300)

    assert flow_run.state.is_failed()
    assert "ValueError: bad voxel" in platform.job(job_id)["errorMessage"]


# The broken runtime fails a second after it starts, as a Python that cannot import the runtime does: a
# container that exits at once can be auto-removed before prefect-docker reads its exit code, and the run
# then stays Pending (prefect-docker 0.7.4).
BROKEN_RUNTIME_DOCKERFILE = f"""\
FROM {BASE_IMAGE}
RUN mkdir -p /opt/dcm-flows/bin \\
 && printf '#!/bin/sh\\necho the runtime is broken >&2\\nexit 3\\n' > /opt/dcm-flows/bin/python \\
 && chmod +x /opt/dcm-flows/bin/python
"""


def test_a_container_that_exits_non_zero_crashes_the_run_and_its_session_records_it(
    platform: Platform, docker_client
) -> None:
    image, _ = docker_client.images.build(fileobj=io.BytesIO(BROKEN_RUNTIME_DOCKERFILE.encode()),
                                          tag="dcm-flows-test/broken-runtime:latest", rm=True)
    job_id = docker_job(platform, image.id, "broken-runtime")
    session_id = str(platform.job(job_id)["sessionId"])

    session_run = finished(submit_session(session_id), timeout=300)

    assert session_run.state.is_failed() and job_id in session_run.state.message
    job_runs = platform_runs_of_job(job_id)
    assert len(job_runs) == 1 and job_runs[0].state.is_crashed()
    record = platform.job(job_id)
    # written by the session or by dcm-record-crash, whichever comes first; both quote the run's state
    assert record["error"] and "status code 3" in record["errorMessage"]
    eventually(lambda: containers_of(docker_client, job_runs[0].id) == [], timeout=60)


def platform_runs_of_job(job_id: str) -> list:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=job_id)))
    return [run for run in runs if run.name.endswith(job_id)]


def test_a_restarted_docker_worker_removes_the_stopped_containers_of_ended_runs_that_a_killed_one_left(
    local_stack: LocalStack, stack: StackState, docker_client
) -> None:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("dcm-job/docker")
        ended, unfinished = (client.create_flow_run_from_deployment(deployment.id, state=state, parameters={
            "job_id": "0123456789abcdef01234567"}) for state in (Cancelled(), Running()))
    left = {run.id: docker_client.containers.run(BASE_IMAGE, "true", detach=True,
                                                 labels={FLOW_RUN_LABEL: str(run.id)}) for run in (ended, unfinished)}
    try:
        for container in left.values():
            container.wait()
        worker = stack.processes["docker-worker"]
        os.kill(worker, signal.SIGKILL)
        eventually(lambda: not process_alive(worker), timeout=15)
        local_stack.start_workers(stack)  # as a service manager restarts a worker that died

        eventually(lambda: containers_of(docker_client, ended.id) == [], timeout=90)
        assert [container.id for container in containers_of(docker_client, unfinished.id)] == [left[unfinished.id].id]
    finally:
        for container in left.values():
            with contextlib.suppress(NotFound):
                container.remove(force=True)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(unfinished.id, Cancelled(), force=True)


def test_gpu_and_resource_settings_become_the_containers_configuration(docker_client) -> None:
    worker = WorkerRecord(id="w", name="gpu", type="docker", worker_files={},
                          settings={"image": "x", "gpus": [0, 1], "mem_limit": "2g", "cpus": 1.5})
    variables = DockerEnvironment(worker).job_variables()
    create = variables["container_create_kwargs"]

    container = docker_client.containers.create(
        BASE_IMAGE, "true", mem_limit=variables["mem_limit"], **create
    )
    try:
        host_config = docker_client.api.inspect_container(container.id)["HostConfig"]
    finally:
        container.remove(force=True)

    assert host_config["DeviceRequests"] == [
        {"Driver": "", "Count": 0, "DeviceIDs": ["0", "1"], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert host_config["Memory"] == 2 * 1024**3 and host_config["NanoCpus"] == 1_500_000_000
    assert host_config["CapDrop"] == ["ALL"] and host_config["Privileged"] is False


def test_callbacks_of_gpu_workers_carry_the_gpu_concurrency_tag() -> None:
    def worker(**settings) -> DockerEnvironment:
        return DockerEnvironment(WorkerRecord(id="w", name="n", type="docker",
                                         worker_files={}, settings={"image": "x", **settings}))

    assert worker(gpus="all").concurrency_tags() == ["gpu"]
    assert worker(gpus=2).job_variables()["container_create_kwargs"]["device_requests"][0]["count"] == 2
    assert worker().concurrency_tags() == [] and "device_requests" not in worker().job_variables()[
        "container_create_kwargs"]
