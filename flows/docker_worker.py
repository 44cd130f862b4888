"""The worker of the `dcm-docker` pool: prefect-docker's worker, removing each container itself.

prefect-docker reads a run's outcome from its container's exit code, and with Docker's auto-remove a
container that exits at once (its runtime cannot start, say) can be gone before the worker looks:
prefect-docker then reports the exit code of the container as created, 0, and the run stays Pending
for good. This worker starts containers without auto-remove and removes every container of the run
once the run is over, whatever its outcome; the pool's type stays `docker`.

Prefect finds it by its worker type, `dcm-docker` (`prefect worker start --pool dcm-docker --type
dcm-docker`), through this project's `prefect.collections` entry point.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import anyio.abc
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration, DockerWorkerResult

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

WORKER_TYPE = "dcm-docker"
FLOW_RUN_LABEL = "io.prefect.flow-run-id"
STOPPED_STATUSES = ("created", "exited", "dead")


class PlatformDockerWorker(DockerWorker):
    """Runs each flow run in a container that is removed after its exit code has been read."""

    _display_name = "Docker (dcm-processor)"
    _description = "prefect-docker's worker; each container is removed once its run's outcome is known."

    @classmethod
    def __dispatch_key__(cls) -> str:
        """Registered apart from prefect-docker's worker, whose key is its `type`, which this one keeps."""
        return WORKER_TYPE

    async def run(
        self,
        flow_run: FlowRun,
        configuration: DockerWorkerJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> DockerWorkerResult:
        configuration.auto_remove = False
        try:
            return await super().run(flow_run, configuration, task_status)
        finally:
            await run_sync_in_worker_thread(self._remove_containers_of, str(flow_run.id))

    def _remove_containers_of(self, flow_run_id: str) -> None:
        """Remove the run's containers that are not running: also one that was created but failed to start.

        A running one is left alone: the worker stopping is no reason to end its job.
        """
        from docker.errors import NotFound

        client = self._get_client()
        filters = {"label": f"{FLOW_RUN_LABEL}={flow_run_id}", "status": list(STOPPED_STATUSES)}
        try:
            for container in client.containers.list(all=True, filters=filters):
                with contextlib.suppress(NotFound):
                    container.remove(force=True)
        finally:
            client.close()
