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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.runtime.environments.base import (
    ContainerPolicy,
    Environment,
    InstallContext,
    JobFolders,
    WorkerSettings,
)
from flows.runtime.errors import InstallError, InvalidRecord
from flows.runtime.names import DOCKER_DEPLOYMENT, DOCKER_POOL, JOB_FLOW, deployment
from flows.runtime.redaction import SHOW_UIDS_VARIABLE, show_uids
from flows.runtime.variables import WITHHELD_PREFIXES, flow_run_variables
from flows.runtime.wheelhouse import build_wheelhouse

RUNTIME_VENV = "/opt/dcm-flows"
IN_CONTAINER_VARIABLE = "DCM_FLOWS_IN_CONTAINER"
DEFAULT_USER = "10001:10001"
WORKER_LABEL = "dcm-flows.worker"
GPU_TAG = "gpu"
CONTAINER_RUN_OPTIONS = ("shm_size", "ulimits", "ipc_mode", "cpu_shares", "cpuset_cpus")
"""The keys of the platform's `params.run_kwargs` that still make sense when the container runs a flow
(besides `environment`, which is merged into the run's variables)."""

Gpus = Literal["all"] | int | list[int | str]


class DockerParameters(BaseModel):
    """The platform's `params` of a docker worker; `command` is not used (the container runs the flow)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    run_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=f"docker run options; {', '.join(CONTAINER_RUN_OPTIONS)} and `environment` apply.",
    )


class DockerSettings(WorkerSettings):
    """A docker worker's settings: how its image is made, laid out and run. What the container may do beyond
    that (root, host IPC, another container's network) is the host's to allow (ContainerPolicy), not the
    component's."""

    image: str | None = Field(default=None, description="The worker's image (found or pulled at install); then its id.")
    build: str | None = Field(default=None, description="A Dockerfile in the worker folder, built at install.")
    build_kwargs: dict[str, Any] = Field(default_factory=dict, description="Build arguments of `build`.")
    image_built: bool = Field(default=False, description="Whether install built `image` (and removal removes it).")
    runtime_image: str | None = Field(default=None, description="`image` with this runtime added: what runs the flow.")
    params: DockerParameters = Field(default_factory=DockerParameters, description="The platform's run parameters.")
    module_dir_mount: str = Field(default="/module", description="Where the service module lies (on PYTHONPATH).")
    session_dir_mount: str = Field(default="/session", description="Where the job's fresh session folder lies.")
    data_dir_mount: str = Field(default="/data", description="Where the worker's data folder is laid out.")
    gpus: Gpus | None = Field(default=None, description='GPUs for the container: "all", a count, or device ids.')
    mem_limit: str | None = Field(default=None, description="Memory limit, in Docker's notation (2g).")
    cpus: float | None = Field(default=None, gt=0, description="CPU limit, in cores.")
    user: str = Field(default=DEFAULT_USER, description="uid:gid the container runs as; never root.")
    network_mode: str = Field(default="host", description="The container's network; host reaches what the host can.")
    python_path: str | None = Field(default=None, description="The callbacks' Python (default: the image's python3).")
    image_pull_policy: str = Field(default="IfNotPresent", description="When the pool worker pulls the image.")

    @field_validator("params")
    @classmethod
    def _no_runtime_settings(cls, params: DockerParameters) -> DockerParameters:
        """A record must not set the run's Prefect, database or runtime settings: its environment is merged into
        the container's last, and is stored with each flow run."""
        environment = params.run_kwargs.get("environment") or {}
        if not isinstance(environment, dict):
            raise ValueError("run_kwargs.environment must map names to values")
        taken = sorted(str(name) for name in environment if str(name).startswith(WITHHELD_PREFIXES))
        if taken:
            raise ValueError(f"run_kwargs.environment may not set {', '.join(taken)} (the runtime's own settings)")
        return params


def refuse_beyond_policy(policy: ContainerPolicy, name: str, settings: DockerSettings) -> None:
    """InstallError naming the first setting of a docker worker that the host's policy does not allow."""
    refused = f"docker worker '{name}': this host's policy (the dcm-worker-host block) does not allow"
    if settings.network_mode not in policy.network_modes:
        raise InstallError(f"{refused} network_mode '{settings.network_mode}' (allowed: "
                           f"{', '.join(policy.network_modes)})")
    if not policy.allow_root and settings.user.split(":", 1)[0].strip() in ("0", "root", ""):
        raise InstallError(f"{refused} user '{settings.user}' (root)")
    ipc_mode = str(settings.params.run_kwargs.get("ipc_mode") or "")
    if not policy.allow_host_ipc and ipc_mode.startswith(("host", "container:")):
        raise InstallError(f"{refused} params.run_kwargs.ipc_mode '{ipc_mode}'")


def _docker_client() -> Any:
    """A client of the host's Docker engine. `docker` is imported here, not at the top: every job run that
    starts in a fresh interpreter (each docker job's container) imports this module, and `import docker`
    costs it 0.14 s, while only installs, removals and the pool worker talk to the engine."""
    import docker

    return docker.from_env()


class DockerEnvironment(Environment):
    """A worker image whose containers run the job flow."""

    record_types = ("docker",)
    settings_model = DockerSettings
    settings: DockerSettings
    deployment = DOCKER_DEPLOYMENT
    work_pool = DOCKER_POOL
    runs_in_session = False

    inherits_whole_environment = True
    """A callback runs in the worker's container, whose environment is its image's (and the run's)."""

    def interpreter(self) -> Path:
        return Path(self.settings.python_path or shutil.which("python3") or "/usr/bin/python3")

    def check(self) -> None:
        if os.environ.get(IN_CONTAINER_VARIABLE) != "1":
            raise InvalidRecord(
                f"worker '{self.worker.name if self.worker else '?'}' is a docker worker: its jobs run in its image "
                f"on the {DOCKER_POOL} pool ({deployment(JOB_FLOW, DOCKER_DEPLOYMENT)}), not on this host"
            )
        super().check()

    def folders(self, workspace: Path) -> JobFolders:
        return JobFolders(
            module_parent=Path(self.settings.module_dir_mount),
            session=Path(self.settings.session_dir_mount),
            data=Path(self.settings.data_dir_mount),
        )

    def extra_variables(self) -> dict[str, str]:
        """The module folder first on PYTHONPATH, keeping what the image's own PYTHONPATH names."""
        image_path = os.environ.get("PYTHONPATH")
        module = self.settings.module_dir_mount
        return {"PYTHONPATH": os.pathsep.join([module, image_path]) if image_path else module}

    @classmethod
    def install(cls, context: InstallContext, settings: WorkerSettings) -> dict[str, Any]:
        """Build the worker's Dockerfile (or take its `image`), then add this runtime on top of it."""
        assert isinstance(settings, DockerSettings)
        refuse_beyond_policy(context.host.container_policy, context.name, settings)
        client = _docker_client()
        labels = {WORKER_LABEL: context.name}
        if settings.build:
            worker_image = _build_worker_image(client, context, settings, labels)
            context.made(worker_image, lambda: _remove_image(client, worker_image))
            built = True
        elif settings.image:
            worker_image, built = _local_or_pulled(client, settings.image), False
        else:
            raise InstallError(f"docker worker '{context.name}' names neither `build` nor `image`")
        context.progress("runtime layer", 55)
        wheelhouse = context.host.wheelhouse or build_wheelhouse(context.host.environments_folder / "wheelhouse")
        try:
            runtime = build_runtime_image(
                client, worker_image, wheelhouse, image_tag(context.name, "-runtime"), labels,
                installer="pip" if context.host.installer == "pip" else "uv",
            )
        except InvalidRecord as error:
            raise InstallError(str(error)) from error
        context.made(runtime, lambda: _remove_image(client, runtime))
        return {"image": worker_image, "image_built": built, "runtime_image": runtime}

    def built(self) -> set[str]:
        return set(self._built_newest_first())

    def _built_newest_first(self) -> list[str]:
        """The runtime layer, then the image it was built on (which Docker refuses to remove while its child
        is there)."""
        images = [self.settings.runtime_image, self.settings.image if self.settings.image_built else None]
        return [image for image in images if image]

    def remove(self, keep: set[str] | frozenset[str] = frozenset()) -> None:
        client = _docker_client()
        for image in self._built_newest_first():
            if image not in keep:
                _remove_image(client, image)

    def concurrency_tags(self) -> list[str]:
        """`gpu` for workers with GPUs: `prefect concurrency-limit create gpu N` caps their callbacks at N."""
        return [GPU_TAG] if self.settings.gpus is not None else []

    def job_variables(self) -> dict[str, Any]:
        """Per-run settings of the docker pool worker, from the worker record."""
        settings = self.settings
        image = settings.runtime_image or settings.image
        if not image:
            name = self.worker.name if self.worker else "?"
            raise InvalidRecord(f"docker worker '{name}' has no image; install it first")
        run_options = settings.params.run_kwargs
        create: dict[str, Any] = {key: value for key, value in run_options.items() if key in CONTAINER_RUN_OPTIONS}
        create.update(user=settings.user, cap_drop=["ALL"], security_opt=["no-new-privileges"])
        if settings.cpus:
            create["nano_cpus"] = int(settings.cpus * 1e9)
        if settings.gpus is not None:
            create["device_requests"] = [gpu_request(settings.gpus)]
        variables: dict[str, Any] = {
            "image": image,
            "command": f"{RUNTIME_VENV}/bin/python -m prefect.engine",
            "image_pull_policy": settings.image_pull_policy,
            "network_mode": settings.network_mode,
            "env": {
                **(run_options.get("environment") or {}), **flow_run_variables(),
                **({SHOW_UIDS_VARIABLE: "1"} if show_uids() else {}),
                "HOME": "/tmp", "PREFECT_HOME": "/tmp/prefect",
            },
            "container_create_kwargs": create,
        }
        if settings.mem_limit:
            variables["mem_limit"] = settings.mem_limit
        return variables


def image_tag(worker_name: str, suffix: str = "") -> str:
    """The tag of a worker's image: Docker repository names are lower case (the installer refuses two workers
    whose names differ only in case)."""
    return f"dcm-worker/{worker_name.lower()}{suffix}:latest"


def _build_worker_image(client: Any, context: InstallContext, settings: DockerSettings, labels: dict[str, str]) -> str:
    """Build the worker's Dockerfile, its output streamed to the run's logs; return the image id."""
    from docker.errors import BuildError  # deferred, as in _docker_client

    assert settings.build is not None
    try:
        image, log = client.images.build(
            path=str(context.folder), dockerfile=settings.build, tag=image_tag(context.name),
            rm=True, forcerm=True, labels=labels,
            buildargs={key: str(value) for key, value in settings.build_kwargs.items()},
        )
    except BuildError as error:
        for entry in error.build_log:
            context.on_line("stdout", str(entry.get("stream", entry.get("error", ""))).rstrip())
        raise InstallError(f"the Dockerfile of worker '{context.name}' failed to build: {error.msg}") from error
    for entry in log:
        if entry.get("stream", "").strip():
            context.on_line("stdout", entry["stream"].rstrip())
    return image.id


def _local_or_pulled(client: Any, image: str) -> str:
    """The id of `image` on this engine, pulled first when it is not there."""
    from docker.errors import APIError, ImageNotFound  # deferred, as in _docker_client

    try:
        return client.images.get(image).id
    except ImageNotFound:
        try:
            return client.images.pull(image).id
        except APIError as error:
            raise InstallError(f"image '{image}' is not on this engine and cannot be pulled: {error}") from error


def gpu_request(gpus: str | int | list[Any]) -> dict[str, Any]:
    """A Docker device request from the worker setting `gpus`: "all", a count, or a list of device ids."""
    request: dict[str, Any] = {"driver": "", "capabilities": [["gpu"]]}
    if gpus == "all":
        request["count"] = -1
    elif isinstance(gpus, int) and not isinstance(gpus, bool):
        request["count"] = gpus
    else:
        request["device_ids"] = [str(gpu) for gpu in gpus]
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
    from docker.errors import ImageNotFound  # deferred, as in _docker_client

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
    from docker.errors import BuildError  # deferred, as in _docker_client

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
