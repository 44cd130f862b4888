"""`dcm-job`: one platform job as a Prefect flow run with pre-service, execute and post-service tasks.

The only parameters are the job id and the name of the database block: the job's kwargs (which
carry patient headers and the database URL) are read from the platform database inside the run
and never become a parameter, a task input Prefect stores, a log line or an artifact.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.context import TagsContext
from prefect.states import Cancelled, Crashed, Failed

from blocks.database import DcmDatabase
from flows.runtime.errors import AlreadyClaimed, CallbackFailed, DatabaseUnavailable, RunCancelled
from flows.runtime.job_run import JobRun, Outcome
from flows.runtime.records import PlatformRecords

INFRASTRUCTURE_RETRIES = 3
INFRASTRUCTURE_RETRY_DELAYS = [2, 10, 30]


def _is_infrastructure_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a task only when the platform database did not answer, never for a bad record."""
    try:
        state.result()
    except DatabaseUnavailable:
        return True
    except Exception:
        return False
    return False


def _line_logger(logger: logging.LoggerAdapter[logging.Logger]) -> Any:
    def log_line(stream: str, line: str) -> None:
        logger.log(logging.WARNING if stream == "stderr" else logging.INFO, line)

    return log_line


_task_options: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
_infrastructure_retries: dict[str, Any] = {
    "retries": INFRASTRUCTURE_RETRIES,
    "retry_delay_seconds": INFRASTRUCTURE_RETRY_DELAYS,
    "retry_condition_fn": _is_infrastructure_failure,
}


@task(name="pre-service", **_task_options, **_infrastructure_retries)
def pre_service(run: JobRun) -> None:
    """Load and check the job, service and worker records, claim the job, extract the service module."""
    run.on_line = _line_logger(get_run_logger())
    run.prepare()
    get_run_logger().info("%s prepared in %s", run.label, run.worker_type.describe() if run.worker_type else "-")


def _cancellation_check(client: SyncPrefectClient, flow_run_id: str) -> Any:
    """True once the flow run is Cancelling. Prefect's runner normally delivers a cancellation as
    SIGTERM first; this check also honours it when the runner's event stream is unavailable."""

    def cancelling() -> bool:
        state = client.read_flow_run(flow_run_id).state
        return state is not None and state.is_cancelling()

    return cancelling


@task(name="execute", **_task_options)
def execute(run: JobRun) -> Any:
    """Run the job's callback in a child process of its worker environment, streaming its output."""
    run.on_line = _line_logger(get_run_logger())
    with get_client(sync_client=True) as client:
        run.should_stop = _cancellation_check(client, run.flow_run_id)
        try:
            return run.execute()
        finally:
            run.should_stop = None


@task(name="post-service", **_task_options, **_infrastructure_retries)
def post_service(run: JobRun, result: Any = None, error: BaseException | None = None) -> Outcome:
    """Run post-scripts, write the outcome to the job record, publish the outcome artifact, clean up."""
    run.on_line = _line_logger(get_run_logger())
    outcome = run.finish(result=result, error=error)
    _publish(run, outcome)
    return outcome


def _publish(run: JobRun, outcome: Outcome) -> None:
    create_markdown_artifact(
        key=f"dcm-job-{run.job_id}",
        description=f"Outcome of platform job {run.job_id}",
        markdown="\n".join([
            f"### {run.label}",
            "| | |", "|---|---|",
            f"| job id | `{run.job_id}` |",
            f"| outcome | {'succeeded' if outcome.succeeded else 'failed'} |",
            f"| duration | {outcome.duration_seconds:.2f} s |",
            f"| callback attempts | {outcome.attempts} |",
            f"| environment | {outcome.environment} |",
        ]),
    )


def _run_callback(run: JobRun) -> Any:
    """Execute, repeating a failed callback only as often as the job's `max_attempts` allows."""
    attempt = 1
    execute_with_limits = execute.with_options(tags=run.worker_type.concurrency_tags() if run.worker_type else [])
    while True:
        try:
            return execute_with_limits(run)
        except CallbackFailed as failure:
            if attempt >= run.allowed_attempts:
                raise
            get_run_logger().warning(
                "attempt %d of %d failed (%s); retrying", attempt, run.allowed_attempts, failure
            )
            attempt += 1


@flow(name="dcm-job", persist_result=False, log_prints=False)
def job_flow(job_id: str, database_block: str = "default") -> Any:
    """Run one dcm-processor job: pre-service, execute, post-service.

    Args:
        job_id: the `_id` of the job in the platform's `jobs` collection.
        database_block: name of the `dcm-database` block; without such a block the worker's
            DCM_DB_PROVIDER, DCM_DB_URL and DCM_DB_NAME are used.
    """
    database = DcmDatabase.resolve(database_block)
    logger = get_run_logger()
    run = JobRun(PlatformRecords(database.open()), job_id, str(runtime.flow_run.id), _line_logger(logger))
    try:
        # The run's tags (service, session) describe the run, not its tasks: Prefect turns every tag
        # of a task into a concurrency-limit request, a round trip per task that makes concurrent
        # jobs of a session queue behind each other. The execute task adds its own limit tags.
        with TagsContext(current_tags=set()):
            return _run_job(run)
    except DatabaseUnavailable as outage:
        run.remove_workspace()
        logger.error("%s: %s; its outcome is recorded once the database answers again", run.label, outage)
        return Crashed(message=f"{run.label}: the outcome could not be recorded: {outage}")


def _run_job(run: JobRun) -> Any:
    """The three steps, and the state each way out of them ends in. A database outage that outlasts
    the tasks' retries is left to the caller: the run then ends Crashed, which dcm-record-crash records."""
    try:
        pre_service(run)
        result = _run_callback(run)
    except AlreadyClaimed as duplicate:
        run.remove_workspace()
        get_run_logger().warning("%s: %s", run.label, duplicate)
        return Cancelled(name=AlreadyClaimed.state_name, message=f"{run.label}: {duplicate}")
    except RunCancelled as cancellation:
        post_service(run, error=cancellation)
        return Cancelled(message=f"{run.label}: {cancellation}")
    except DatabaseUnavailable:
        raise
    except Exception as error:
        outcome = post_service(run, error=error)
        return Failed(message=f"{run.label}: {outcome.message}")
    except BaseException as interruption:
        run.finish(error=RunCancelled(
            f"the flow run was cancelled or terminated ({type(interruption).__name__}); "
            "the callback's process tree was killed"
        ))
        raise
    post_service(run, result=result)
    return result
