"""Whether a run got the fast path, and what to start where it did not.

Prefect's stock process and docker workers run this project's deployments correctly, only slower: they find a
new run at their next poll, and a stock process worker starts every run in a fresh interpreter, about 3 s of
imports (docs/benchmarks.md). An operator who follows Prefect's own docs gets them and nothing says so, so the
session and job runs a worker started say it once, in their logs, with the command to use instead. So they do
when the Prefect server is a stock `prefect server start`, which on SQLite makes concurrent runs back off for
seconds at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext

from flows.runtime.names import (
    FRESH_ENGINE_VARIABLE,
    POOL_WORKER_TYPES,
    POOL_WORKER_VARIABLE,
    PROCESS_POOL_WORKER_TYPE,
    SERVER_HEADER,
    WARM_ENGINE_SOCKET_VARIABLE,
)

FLOW_RUN_VARIABLE = "PREFECT__FLOW_RUN_ID"
"""Set by every Prefect worker (and runner) to the run it started the process for."""
WARM_ENGINE_SOCKET = "/run/dcm-flows/engine.sock"


def slow_start_advice(environment: Mapping[str, str], work_pool: str, pool_type: str) -> str | None:
    """What to start instead, when the run whose process has `environment` was started the slow way."""
    worker = environment.get(POOL_WORKER_VARIABLE)
    if worker is None:
        return (f"this run was started by Prefect's stock worker, which finds a run only at its next poll and "
                f"starts each in a fresh interpreter: start `prefect worker start --pool {work_pool} --type "
                f"{POOL_WORKER_TYPES.get(pool_type, pool_type)}` instead (`dcm-flows stack start` does on one "
                "machine)")
    reason = environment.get(FRESH_ENGINE_VARIABLE)
    if worker == PROCESS_POOL_WORKER_TYPE and reason:
        return (f"this run started in a fresh interpreter, about 3 s of imports, because {reason}: run "
                f"`python -m ops.warm_engine serve {WARM_ENGINE_SOCKET}` beside the worker and start the worker "
                f"with {WARM_ENGINE_SOCKET_VARIABLE}={WARM_ENGINE_SOCKET} (`dcm-flows stack start` does both)")
    return None


def answered_by_this_projects_server(answer_headers: Mapping[str, str]) -> bool:
    """Whether the Prefect server that gave an answer with these headers is `python -m ops.prefect_server`."""
    return any(name.lower() == SERVER_HEADER.lower() for name in answer_headers)


def stock_server_advice(answer_headers: Mapping[str, str]) -> str | None:
    """What to start instead, when the Prefect server that gave an answer with these headers is a stock one."""
    if answered_by_this_projects_server(answer_headers):
        return None
    return ("this run's Prefect server is a stock `prefect server start`: on SQLite it refuses a write that meets "
            "another instead of queueing it, and each refusal costs a run 2 s or more of Prefect's back-off (a 22-job "
            "session about 7x slower, docs/benchmarks.md): start it as `python -m ops.prefect_server` with the same "
            "options (`dcm-flows stack start` does on one machine)")


def say_if_started_slowly(logger: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> None:
    """Log `slow_start_advice` and `stock_server_advice` for the current flow run if a worker started this process
    for it (not for a child flow run of a session, nor a flow called directly), once."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None or context.flow_run.work_pool_name is None:
        return
    if os.environ.get(FLOW_RUN_VARIABLE) != str(context.flow_run.id):
        return
    pool = context.flow_run.work_pool_name
    pool_type = ""
    try:
        with get_client(sync_client=True) as client:
            if POOL_WORKER_VARIABLE not in os.environ:
                pool_type = client.read_work_pool(pool).type
            server_headers = client.request("GET", "/health").headers
    except Exception:  # advice is not worth failing the run for
        return
    for advice in (slow_start_advice(os.environ, pool, pool_type), stock_server_advice(server_headers)):
        if advice is not None:
            logger.warning(advice)
