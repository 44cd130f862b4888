"""The one source of the names Prefect knows this project by: pools, queues, flows, deployments, blocks, and
the parameters of a `dcm-job` run.

prefect.yaml spells the same names (tests/test_deployments.py checks that it does); every Python module
imports them from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

PROCESS_POOL = "dcm-process"
"""Runs venv jobs, jobs without a worker, sessions, installs, the bridge and crash repair."""
DOCKER_POOL = "dcm-docker"
"""Runs docker jobs, each in a container of its worker's image."""

DEFAULT_QUEUE = "default"
SESSION_QUEUE = "sessions"
"""The process pool's queue of session runs; its concurrency limit caps the sessions run at once."""

PROCESS_POOL_WORKER_TYPE = "dcm-process"
DOCKER_POOL_WORKER_TYPE = "dcm-docker"
"""`prefect worker start --type ...` of this project's pool workers (ops/pool_workers.py)."""
POOL_WORKER_TYPES = {"process": PROCESS_POOL_WORKER_TYPE, "docker": DOCKER_POOL_WORKER_TYPE}
"""This project's worker type for each of Prefect's pool types (the pools keep Prefect's types)."""
POOL_WORKER_VARIABLE = "DCM_FLOWS_POOL_WORKER"
"""This project's pool workers set it in each run's environment, to their type: a run started without it was
started by Prefect's stock worker."""
FRESH_ENGINE_VARIABLE = "DCM_FLOWS_FRESH_ENGINE"
"""The job command sets it, to the reason, when the run starts in a fresh interpreter instead of the warm engine."""
WARM_ENGINE_SOCKET_VARIABLE = "DCM_FLOWS_WARM_ENGINE"
"""Where the warm engine of the worker's host listens, in the worker's environment (ops/warm_engine.py)."""
SERVER_HEADER = "X-Dcm-Flows-Server"
"""Every answer of this project's Prefect server (ops/prefect_server.py) carries it; a stock server's do not."""

DEFAULT_BLOCK = "default"
"""The name of the `dcm-database` and `dcm-worker-host` blocks a run uses unless told otherwise."""

JOB_FLOW = "dcm-job"
SESSION_FLOW = "dcm-session"
INSTALL_FLOW = "dcm-install-component"
REMOVE_FLOW = "dcm-remove-component"
BRIDGE_FLOW = "dcm-bridge"
RECORD_CRASH_FLOW = "dcm-record-crash"
RECONCILE_FLOW = "dcm-reconcile"
BACKLOG_FLOW = "dcm-backlog"
BACKLOG_ARTIFACT = "dcm-backlog"
"""The key of the backlog table artifact: the Artifacts page shows its latest version."""

PROCESS_DEPLOYMENT = "process"
DOCKER_DEPLOYMENT = "docker"


def deployment(flow: str, name: str = PROCESS_DEPLOYMENT) -> str:
    """The `flow/deployment` name that `run_deployment` and `prefect deployment run` take."""
    return f"{flow}/{name}"


@dataclass(frozen=True)
class JobParameters:
    """The parameters of a `dcm-job` flow run: ids and names only, never the job's data."""

    job_id: str
    database_block: str = DEFAULT_BLOCK

    def as_parameters(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of_run(cls, parameters: Mapping[str, Any]) -> JobParameters | None:
        """The job parameters of a flow run's parameters; None for a run that is not a job's."""
        if not parameters.get("job_id"):
            return None
        return cls(str(parameters["job_id"]), str(parameters.get("database_block") or DEFAULT_BLOCK))
