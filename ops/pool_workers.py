"""The pool workers of the platform's two work pools: Prefect's own, with three changes.

* **Both wake up for new runs.** A stock worker finds a new flow run at its next poll, on average half
  a poll interval after the run was created. These workers also listen to the server's event stream
  for `prefect.flow-run.Scheduled` events of their pool and poll at once; the regular polls go on, so a
  run is still found if the stream is down.
* **The docker worker removes each container itself**, after reading its exit code. prefect-docker reads
  a run's outcome from that code, and with Docker's auto-remove a container that exits at once (its
  runtime cannot start, say) can be gone before the worker looks: prefect-docker then reports the code
  of the container as created, 0, and the run stays Pending for good. At its start it removes the
  stopped containers of ended runs that an earlier worker, killed mid-run, left behind.
* **Their runs know who started them.** Each run's environment names the worker's type, so that the runs a
  stock worker started say so (flows/runtime/fast_path.py).
* **The process worker says why a run never started.** A run whose process dies before its flow starts
  (a mistyped command, a broken interpreter) is Crashed with its exit code only; each run's standard error
  goes to a file of the worker's, whose end goes into the run's logs when that happens (and which is passed
  on to the worker's own once the run ends, where `stream_output` is on).

Prefect finds them by worker type, through this project's `prefect.collections` entry point:
`prefect worker start --pool dcm-process --type dcm-process` and `--pool dcm-docker --type dcm-docker`.
The pools keep their types, `process` and `docker`, and the same job templates.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
from docker.errors import NotFound
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration, DockerWorkerResult

from flows.runtime.names import DOCKER_POOL_WORKER_TYPE, POOL_WORKER_VARIABLE, PROCESS_POOL_WORKER_TYPE
from flows.runtime.process import folder_of_this_process, remove_abandoned_folders

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from prefect.workers.base import BaseWorker

    _Worker = BaseWorker[Any, Any, Any]
else:
    _Worker = object

NEW_RUN_EVENT = "prefect.flow-run.Scheduled"
LISTEN_RETRY_SECONDS = 5.0
FLOW_RUN_LABEL = "io.prefect.flow-run-id"
STOPPED_STATUSES = ("created", "exited", "dead")
KEPT_ERROR_CHARACTERS = 4000
RUN_FOLDER_PREFIX = "dcm-run-"
FINAL_STATE_TYPES = [StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED]


class WakesOnNewRuns(_Worker):
    """Mixed into a Prefect worker class: poll as soon as a run is scheduled in the worker's pool.

    Events that arrive while a poll is under way ask for one more poll after it, so a burst of new
    runs (a session's jobs) costs a poll or two, not one per run.
    """

    async def setup(self) -> None:
        await super().setup()
        self._new_runs = anyio.Event()
        self._listening = anyio.create_task_group()
        await self._listening.__aenter__()
        self._listening.start_soon(self._listen_for_new_runs)
        self._listening.start_soon(self._poll_when_woken)

    async def teardown(self, *exc_info: Any) -> None:
        self._listening.cancel_scope.cancel()
        await self._listening.__aexit__(None, None, None)
        await super().teardown(*exc_info)

    async def _listen_for_new_runs(self) -> None:
        while True:
            try:
                async with get_events_subscriber(filter=self._new_runs_of_this_pool()) as subscriber:
                    async for _ in subscriber:
                        self._new_runs.set()
            except Exception as error:  # the regular polls carry on meanwhile
                self._logger.warning(
                    "not listening for new flow runs (%s: %s); polling only, trying again in %s s",
                    type(error).__name__, error, LISTEN_RETRY_SECONDS,
                )
            await anyio.sleep(LISTEN_RETRY_SECONDS)

    def _new_runs_of_this_pool(self) -> EventFilter:
        """Scheduled-run events related to this worker's pool (known once the worker has synced)."""
        pool_id = self.work_pool.id
        return EventFilter(
            event=EventNameFilter(name=[NEW_RUN_EVENT]),
            any_resource=EventAnyResourceFilter(id=[f"prefect.work-pool.{pool_id}"]),
        )

    async def _poll_when_woken(self) -> None:
        while True:
            await self._new_runs.wait()
            self._new_runs = anyio.Event()
            try:
                await self.get_and_submit_flow_runs()
            except Exception:  # as after a failed regular poll, the next one tries again
                self._logger.exception("polling for new flow runs failed")


class ProcessPoolWorker(WakesOnNewRuns, ProcessWorker):
    """Prefect's process worker, woken by new runs; a run's `python` is the worker's own interpreter."""

    _display_name = "Process (dcm-processor)"

    @classmethod
    def __dispatch_key__(cls) -> str:
        """Registered apart from Prefect's process worker, whose key is its `type`, which this one keeps."""
        return PROCESS_POOL_WORKER_TYPE

    async def setup(self) -> None:
        await super().setup()
        remove_abandoned_folders(RUN_FOLDER_PREFIX)

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        folder = folder_of_this_process(RUN_FOLDER_PREFIX)
        errors = folder / "stderr"
        configuration.env = {**configuration.env, POOL_WORKER_VARIABLE: PROCESS_POOL_WORKER_TYPE}
        try:
            configuration.command = with_errors_to(errors, with_own_interpreter(configuration.command))
            result = await super().run(flow_run, configuration, task_status)
            if configuration.stream_output and errors.exists():
                with errors.open("rb") as output:
                    shutil.copyfileobj(output, sys.stderr.buffer)
                sys.stderr.flush()
            if result.status_code != 0 and (tail := _tail(errors)):
                await self._say_why_it_never_started(flow_run, tail)
            return result
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def _say_why_it_never_started(self, flow_run: FlowRun, tail: str) -> None:
        """Put the end of the error output of a run whose process died before its flow started into its logs.

        Prefect marks such a run Crashed with its exit code only, and what the process printed (a command that
        names no module, an interpreter that cannot start) is nowhere else. Once the flow has started, its own
        logs say what happened, and its output is not copied: it is the service's.
        """
        async with get_client() as client:
            states = await client.read_flow_run_states(flow_run.id)
        if not any(state.is_running() for state in states):
            self.get_flow_run_logger(flow_run).error(
                "The flow run's process ended before its flow started; the end of its error output:\n%s", tail,
            )


def with_errors_to(path: Path, command: str | None) -> str | None:
    """The run's command with its standard error written to the file `path`.

    A file, not a pipe to the worker: a run outlives a worker that dies (it is the session's process, with
    its jobs in it), and writes into the pipe of a dead worker would fail.
    """
    if command is None:
        return None
    return shlex.join(["sh", "-c", 'exec "$@" 2>"$0"', str(path), *shlex.split(command)])


def _tail(path: Path) -> str:
    """The last KEPT_ERROR_CHARACTERS characters of the file (bytes, as the run wrote them), or ''."""
    try:
        with path.open("rb") as stream:
            stream.seek(max(0, path.stat().st_size - KEPT_ERROR_CHARACTERS))
            return stream.read().decode(errors="replace").strip()
    except OSError:
        return ""


def with_own_interpreter(command: str | None) -> str | None:
    """The run's command with a leading `python` (or `python3`) replaced by this worker's interpreter.

    The deployments start runs with `python -m ops.warm_engine`. Looked up on the worker's PATH, `python` is
    whatever the PATH holds: a worker started as `.venv/bin/prefect worker start` without its environment
    activated started the system's Python, which cannot import this project, and every run died at once.
    """
    if command is None:
        return None
    words = shlex.split(command)
    if words[:1] in (["python"], ["python3"]):
        words[0] = sys.executable
    return shlex.join(words)


class DockerPoolWorker(WakesOnNewRuns, DockerWorker):
    """prefect-docker's worker, woken by new runs; it removes each container once its exit code is read."""

    _display_name = "Docker (dcm-processor)"

    @classmethod
    def __dispatch_key__(cls) -> str:
        """Registered apart from prefect-docker's worker, whose key is its `type`, which this one keeps."""
        return DOCKER_POOL_WORKER_TYPE

    async def setup(self) -> None:
        """Also remove what a worker before this one left: it removes containers after their runs, so one
        that died (or was killed) mid-run leaves its containers behind once they stop."""
        await super().setup()
        try:
            await self._remove_containers_of_ended_runs()
        except Exception:  # the engine or the API not answering yet is no reason not to start
            self._logger.exception("could not remove the containers earlier workers left")

    async def _remove_containers_of_ended_runs(self) -> None:
        left = await run_sync_in_worker_thread(self._runs_with_stopped_containers)
        if not left:
            return
        ended = await self.client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[UUID(flow_run_id) for flow_run_id in left]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=FINAL_STATE_TYPES)),
        ))
        for flow_run in ended:
            await run_sync_in_worker_thread(self._remove_containers_of, str(flow_run.id))

    def _runs_with_stopped_containers(self) -> set[str]:
        """The flow run ids of every stopped container a docker worker started on this engine."""
        client = self._get_client()
        try:
            containers = client.containers.list(all=True, ignore_removed=True, filters={
                "label": FLOW_RUN_LABEL, "status": list(STOPPED_STATUSES),
            })
        finally:
            client.close()
        return {container.labels[FLOW_RUN_LABEL] for container in containers}

    async def run(
        self,
        flow_run: FlowRun,
        configuration: DockerWorkerJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> DockerWorkerResult:
        configuration.auto_remove = False
        configuration.env = {**configuration.env, POOL_WORKER_VARIABLE: DOCKER_POOL_WORKER_TYPE}
        try:
            return await super().run(flow_run, configuration, task_status)
        finally:
            await run_sync_in_worker_thread(self._remove_containers_of, str(flow_run.id))

    def _remove_containers_of(self, flow_run_id: str) -> None:
        """Remove the run's containers that are not running: also one that was created but failed to start.

        A running one is left alone: the worker stopping is no reason to end its job.
        """
        client = self._get_client()
        filters = {"label": f"{FLOW_RUN_LABEL}={flow_run_id}", "status": list(STOPPED_STATUSES)}
        try:
            for container in client.containers.list(all=True, filters=filters):
                with contextlib.suppress(NotFound):
                    container.remove(force=True)
        finally:
            client.close()
