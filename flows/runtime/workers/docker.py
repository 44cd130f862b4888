"""docker workers: the job's flow run is a container of the worker's image, on the `dcm-docker` pool.

Two sides of one type:
* on the submitting host, `job_variables()` turns the worker record into the per-run settings of the
  prefect-docker worker (image, network, user, limits, GPUs);
* inside the container, the three tasks run as for any worker, with the platform's container layout:
  the service module under `module_dir_mount` (/module, also on PYTHONPATH), a fresh session folder
  at `session_dir_mount` (/session) and the worker's data at `data_dir_mount` (/data). Callbacks run
  with the image's own Python; this runtime lives apart in `RUNTIME_VENV`.

`build_runtime_image` adds that runtime layer on top of a worker image, offline, from a wheelhouse.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.runtime.environment import flow_run_variables
from flows.runtime.errors import InvalidRecord
from flows.runtime.workers.base import JobFolders, WorkerType

if TYPE_CHECKING:
    from flows.runtime.installer import InstallContext

RUNTIME_VENV = "/opt/dcm-flows"
IN_CONTAINER_VARIABLE = "DCM_FLOWS_IN_CONTAINER"
DEFAULT_USER = "10001:10001"
WORKER_LABEL = "dcm-flows.worker"
GPU_TAG = "gpu"
CONTAINER_RUN_OPTIONS = ("shm_size", "ulimits", "ipc_mode", "cpu_shares", "cpuset_cpus", "environment")
"""The keys of the platform's `params.run_kwargs` that still make sense when the container runs a flow."""


class DockerWorker(WorkerType):
    """A worker image whose containers run the job flow."""

    record_types = ("docker",)
    deployment = "docker"
    work_pool = "dcm-docker"
    runs_in_session = False

    def _mount(self, key: str, default: str) -> Path:
        assert self.worker is not None
        return Path(self.worker.setting(key, str, default=default))

    def interpreter(self) -> Path:
        assert self.worker is not None
        configured = self.worker.setting("python_path", str)
        found = configured or shutil.which("python3") or "/usr/bin/python3"
        return Path(found)

    def check(self) -> None:
        if os.environ.get(IN_CONTAINER_VARIABLE) != "1":
            raise InvalidRecord(
                f"worker '{self.worker.name if self.worker else '?'}' is a docker worker: its jobs run in its image "
                "on the dcm-docker pool (dcm-job/docker), not on this host"
            )
        super().check()

    def folders(self, workspace: Path) -> JobFolders:
        return JobFolders(
            module_parent=self._mount("module_dir_mount", "/module"),
            session=self._mount("session_dir_mount", "/session"),
            data=self._mount("data_dir_mount", "/data"),
        )

    def extra_environment(self) -> dict[str, str]:
        """The module folder first on PYTHONPATH, keeping what the image's own PYTHONPATH names."""
        image_path = os.environ.get("PYTHONPATH")
        module = str(self._mount("module_dir_mount", "/module"))
        return {"PYTHONPATH": os.pathsep.join([module, image_path]) if image_path else module}

    @classmethod
    def install(cls, context: InstallContext) -> dict[str, Any]:
        """Build the worker's Dockerfile (or take its `image`), then add this runtime on top of it."""
        import docker
        from docker.errors import APIError, BuildError, ImageNotFound

        from flows.runtime.installer import InstallError
        from flows.runtime.wheelhouse import build_wheelhouse

        client = docker.from_env()
        settings = context.settings
        labels = {WORKER_LABEL: context.name}
        if settings.get("build"):
            tag = f"dcm-worker/{context.name}:latest"
            try:
                image, log = client.images.build(
                    path=str(context.folder), dockerfile=settings["build"], tag=tag, rm=True, forcerm=True,
                    buildargs={key: str(value) for key, value in (settings.get("build_kwargs") or {}).items()},
                    labels=labels,
                )
            except BuildError as error:
                for entry in error.build_log:
                    context.on_line("stdout", str(entry.get("stream", entry.get("error", ""))).rstrip())
                raise InstallError(f"the Dockerfile of worker '{context.name}' failed to build: {error.msg}") from error
            for entry in log:
                if entry.get("stream", "").strip():
                    context.on_line("stdout", entry["stream"].rstrip())
            context.cleanups.append(lambda: _remove_image(client, image.id))
            worker_image, built = image.id, True
        elif settings.get("image"):
            try:
                worker_image = client.images.get(settings["image"]).id
            except ImageNotFound:
                try:
                    worker_image = client.images.pull(settings["image"]).id
                except APIError as error:
                    raise InstallError(
                        f"image '{settings['image']}' is not on this engine and cannot be pulled: {error}"
                    ) from error
            built = False
        else:
            raise InstallError(f"docker worker '{context.name}' names neither `build` nor `image`")
        context.progress("runtime layer", 55)
        wheelhouse = context.host.wheelhouse or build_wheelhouse(context.host.environments_folder / "wheelhouse")
        try:
            runtime = build_runtime_image(
                client, worker_image, wheelhouse, f"dcm-worker/{context.name}-runtime:latest", labels,
                installer="pip" if context.host.installer == "pip" else "uv",
            )
        except InvalidRecord as error:
            raise InstallError(str(error)) from error
        context.cleanups.append(lambda: _remove_image(client, runtime))
        return {"image": worker_image, "image_built": built, "runtime_image": runtime}

    def remove(self) -> None:
        import docker

        assert self.worker is not None
        client = docker.from_env()
        runtime = self.worker.setting("runtime_image", str)
        if runtime:
            _remove_image(client, runtime)
        if self.worker.setting("image_built", bool, default=False):
            _remove_image(client, self.worker.setting("image", str))

    def concurrency_tags(self) -> list[str]:
        """`gpu` for workers with GPUs: `prefect concurrency-limit create gpu N` caps their callbacks at N."""
        assert self.worker is not None
        return [GPU_TAG] if self.worker.setting("gpus", (str, int, list)) is not None else []

    def job_variables(self) -> dict[str, Any]:
        """Per-run settings of the prefect-docker worker, from the worker record."""
        assert self.worker is not None
        worker = self.worker
        image = worker.setting("runtime_image", str) or worker.setting("image", str)
        if not image:
            raise InvalidRecord(f"docker worker '{worker.name}' has no image; install it first")
        params = worker.setting("params", dict, default={})
        run_options = params.get("run_kwargs") or {}
        create: dict[str, Any] = {
            key: value for key, value in run_options.items() if key in CONTAINER_RUN_OPTIONS and key != "environment"
        }
        create.update(
            user=worker.setting("user", str, default=DEFAULT_USER),
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
        )
        cpus = worker.setting("cpus", (int, float))
        if cpus:
            create["nano_cpus"] = int(float(cpus) * 1e9)
        gpus = worker.setting("gpus", (str, int, list))
        if gpus is not None:
            create["device_requests"] = [gpu_request(gpus)]
        variables: dict[str, Any] = {
            "image": image,
            "command": f"{RUNTIME_VENV}/bin/python -m prefect.engine",
            "image_pull_policy": worker.setting("image_pull_policy", str, default="IfNotPresent"),
            "network_mode": worker.setting("network_mode", str, default="host"),
            "env": {
                **(run_options.get("environment") or {}), **flow_run_variables(),
                "HOME": "/tmp", "PREFECT_HOME": "/tmp/prefect",
            },
            "container_create_kwargs": create,
        }
        if worker.setting("mem_limit", str):
            variables["mem_limit"] = worker.setting("mem_limit", str)
        return variables


def gpu_request(gpus: str | int | list[Any]) -> dict[str, Any]:
    """A Docker device request from the worker setting `gpus`: "all", a count, or a list of device ids."""
    request: dict[str, Any] = {"driver": "", "capabilities": [["gpu"]]}
    if gpus == "all":
        request["count"] = -1
    elif isinstance(gpus, int) and not isinstance(gpus, bool):
        request["count"] = gpus
    elif isinstance(gpus, list):
        request["device_ids"] = [str(gpu) for gpu in gpus]
    else:
        raise InvalidRecord(f"gpus must be 'all', a count or a list of device ids, not {gpus!r}")
    return request


RUNTIME_INSTALLS = {
    "uv": f"""{RUNTIME_VENV}/bin/python -m pip install --quiet --no-cache-dir --no-index \\
      --find-links /tmp/dcm-flows-wheelhouse uv \\
 && {RUNTIME_VENV}/bin/python -m uv pip install --quiet --no-cache --compile-bytecode --no-index \\
      --find-links /tmp/dcm-flows-wheelhouse --python {RUNTIME_VENV}/bin/python dcm-processor-flows""",
    "pip": f"""{RUNTIME_VENV}/bin/python -m pip install --quiet --no-cache-dir --no-index \\
      --find-links /tmp/dcm-flows-wheelhouse dcm-processor-flows""",
}
"""How the runtime layer installs this project from the wheelhouse: uv (about twice as fast, bench/containers.py),
or pip when the host's `installer` setting asks for it. Both compile bytecode: containers run as a user that
cannot write it, so without it every run would compile Prefect again."""


def runtime_dockerfile(installer: str = "uv") -> str:
    """The Dockerfile of the runtime layer: this project in its own venv, folders for the job's mounts."""
    return f"""\
ARG WORKER_IMAGE
FROM $WORKER_IMAGE
USER root
COPY wheelhouse /tmp/dcm-flows-wheelhouse
RUN python3 -m venv {RUNTIME_VENV} \\
 && {RUNTIME_INSTALLS[installer]} \\
 && rm -rf /tmp/dcm-flows-wheelhouse \\
 && mkdir -p /module /session /data /tmp/prefect && chmod 1777 /module /session /data /tmp/prefect
ENV {IN_CONTAINER_VARIABLE}=1
"""


def build_context(dockerfile: str, wheelhouse: Path) -> io.BytesIO:
    """A docker build context (tar) with a Dockerfile and the wheelhouse as `wheelhouse/`."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as archive:
        content = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
        archive.add(str(wheelhouse), arcname="wheelhouse")
    context.seek(0)
    return context


def _remove_image(client: Any, image: str | None) -> None:
    """Remove an image that may already be gone; one still used by a running container is an error."""
    from docker.errors import ImageNotFound

    if image:
        with contextlib.suppress(ImageNotFound):
            client.images.remove(image, force=True)


def build_runtime_image(
    client: Any, worker_image: str, wheelhouse: Path, tag: str, labels: dict[str, str] | None = None,
    installer: str = "uv",
) -> str:
    """Add this runtime (from `wheelhouse`, offline) on top of `worker_image`; return the image id.

    Fails with the build log's last lines when the image's Python cannot host the runtime.
    """
    from docker.errors import BuildError

    try:
        image, _ = client.images.build(
            fileobj=build_context(runtime_dockerfile(installer), wheelhouse), custom_context=True, tag=tag, rm=True,
            forcerm=True,
            buildargs={"WORKER_IMAGE": worker_image}, network_mode="none", labels=labels or {},
        )
    except BuildError as error:
        lines = [str(entry.get("stream", entry.get("error", ""))).rstrip() for entry in error.build_log]
        tail = "\n".join(line for line in lines if line)[-2000:]
        raise InvalidRecord(f"the runtime layer cannot be added to image {worker_image}:\n{tail}") from error
    return image.id
