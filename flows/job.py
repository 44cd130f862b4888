"""`dcm-job`: one platform job as a Prefect flow run with pre-service, execute and post-service tasks.

The only parameters are the job id and the name of the database block: the job's kwargs (which
carry patient headers and the database URL) are read from the platform database inside the run
and never become a parameter, a task input Prefect stores, a log line or an artifact.
"""

from __future__ import annotations

from typing import Any

import httpx
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.context import TagsContext
from prefect.states import Cancelled, Crashed, Failed

from blocks.database import DcmDatabase
from flows.run_logs import RunLogger, line_logger
from flows.runtime.errors import AlreadyClaimed, CallbackFailed, ClaimLost, DatabaseUnavailable, RunCancelled
from flows.runtime.fast_path import say_if_started_slowly
from flows.runtime.job_run import JobRun, Outcome, PreparedJob
from flows.runtime.names import DEFAULT_BLOCK, JOB_FLOW
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.process import StopCheck

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


_task_options: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
_infrastructure_retries: dict[str, Any] = {
    "retries": INFRASTRUCTURE_RETRIES,
    "retry_delay_seconds": INFRASTRUCTURE_RETRY_DELAYS,
    "retry_condition_fn": _is_infrastructure_failure,
}


@task(name="pre-service", **_task_options, **_infrastructure_retries)
def pre_service(run: JobRun) -> PreparedJob:
    """Load and check the job, service and worker records, claim the job, extract the service module."""
    logger = get_run_logger()
    prepared = run.prepare(line_logger(logger, run.redact))
    logger.info("%s prepared in %s", run.label, prepared.environment.describe())
    return prepared


def _cancellation_check(client: SyncPrefectClient, flow_run_id: str, logger: RunLogger) -> StopCheck:
    """True once the flow run is Cancelling. Prefect's runner normally delivers a cancellation as
    SIGTERM first; this check also honours it when the runner's event stream is unavailable.

    An API that does not answer is no cancellation: the callback runs on, its outcome goes to the platform
    record (which needs no Prefect), and the run's state catches up once the API answers again.
    """

    def cancelling() -> bool:
        try:
            state = client.read_flow_run(flow_run_id).state
        except (httpx.HTTPError, OSError) as error:
            logger.warning("the Prefect API did not answer the cancellation check (%s); the callback runs on",
                           type(error).__name__)
            return False
        return state is not None and state.is_cancelling()

    return cancelling


@task(name="execute", **_task_options)
def execute(run: JobRun, prepared: PreparedJob) -> Any:
    """Run the job's callback in a child process of its environment, streaming its output."""
    with get_client(sync_client=True) as client:
        logger = get_run_logger()
        if prepared.returned_earlier is not None:
            logger.warning("%s: its callback returned in an earlier run on this host whose process died before it "
                           "recorded the outcome; that value is recorded, the callback is not called again", run.label)
        on_line = line_logger(logger, run.redact)
        return run.execute(prepared, on_line, _cancellation_check(client, run.flow_run_id, logger))


@task(name="post-service", **_task_options, **_infrastructure_retries)
def post_service(run: JobRun, prepared: PreparedJob | None, failed_attempts: int, result: Any = None,
                 error: BaseException | None = None) -> Outcome:
    """Run post-scripts, write the outcome to the job record, publish the outcome artifact, clean up."""
    on_line = line_logger(get_run_logger(), run.redact)
    outcome = run.finish(prepared, on_line, failed_attempts, result=result, error=error)
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


def _final_state(run: JobRun, outcome: Outcome, result: Any) -> Any:
    """The run's final state from its outcome: the callback's value, Cancelled or Failed."""
    if outcome.succeeded:
        return result
    if outcome.cancelled:
        return Cancelled(message=f"{run.label}: {outcome.message}")
    return Failed(message=f"{run.label}: {outcome.message}")


@flow(name=JOB_FLOW, persist_result=False, log_prints=False)
def job_flow(job_id: str, database_block: str = DEFAULT_BLOCK) -> Any:
    """Run one dcm-processor job: pre-service, execute, post-service.

    Args:
        job_id: the `_id` of the job in the platform's `jobs` collection.
        database_block: name of the `dcm-database` block; without such a block the worker's
            DCM_DB_PROVIDER, DCM_DB_URL and DCM_DB_NAME are used.
    """
    say_if_started_slowly(get_run_logger())
    database = DcmDatabase.resolve(database_block)
    run = JobRun(PlatformRecords(database.open()), job_id, str(runtime.flow_run.id))
    try:
        # The run's tags (service, session) describe the run, not its tasks: Prefect turns every tag
        # of a task into a concurrency-limit request, a round trip per task that makes concurrent
        # jobs of a session queue behind each other. The execute task adds its own limit tags.
        with TagsContext(current_tags=set()):
            return _run_job(run)
    except DatabaseUnavailable as outage:
        get_run_logger().error("%s: %s; its outcome is recorded once the database answers again", run.label, outage)
        return Crashed(message=f"{run.label}: the outcome could not be recorded: {outage}")
    except ClaimLost as lost:
        get_run_logger().warning("%s: %s", run.label, lost)
        return Cancelled(name=ClaimLost.state_name, message=f"{run.label}: {lost}")
    finally:
        run.leave()


def _run_job(run: JobRun) -> Any:
    """The three steps, and the state each way out of them ends in. A database outage that outlasts
    the tasks' retries is left to the caller: the run then ends Crashed, which dcm-record-crash records.

    A failed callback is repeated only as often as the job's `max_attempts` allows; the failed attempts
    are counted here, where they are made, and each one is written to the record's `attempts`.
    """
    prepared: PreparedJob | None = None
    failed_attempts = 0
    try:
        prepared = pre_service(run)
        execute_with_limits = execute.with_options(tags=prepared.environment.concurrency_tags())
        while True:
            try:
                result = execute_with_limits(run, prepared)
                break
            except CallbackFailed as failure:
                failed_attempts += 1
                if failed_attempts >= prepared.allowed_attempts:
                    raise
                get_run_logger().warning("attempt %d of %d failed (%s); retrying",
                                         failed_attempts, prepared.allowed_attempts, failure)
    except AlreadyClaimed as duplicate:
        get_run_logger().warning("%s: %s", run.label, duplicate)
        return Cancelled(name=AlreadyClaimed.state_name, message=f"{run.label}: {duplicate}")
    except DatabaseUnavailable:
        raise
    except Exception as error:
        return _final_state(run, post_service(run, prepared, failed_attempts, error=error), None)
    except BaseException as interruption:
        run.finish(prepared, line_logger(get_run_logger(), run.redact), failed_attempts, error=RunCancelled(
            f"the flow run was cancelled or terminated ({type(interruption).__name__}); "
            "the callback's process tree was killed"
        ))
        raise
    return _final_state(run, post_service(run, prepared, failed_attempts, result=result), result)
