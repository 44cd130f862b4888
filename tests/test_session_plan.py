"""The rules of a session's job graph, without any service running."""

from __future__ import annotations

import pytest
from bson import ObjectId

from flows.runtime.errors import InvalidRecord
from flows.runtime.records import POST_SERVICES_JOB, PRE_SERVICES_JOB, SERVICE_JOB, JobRecord
from flows.runtime.session_plan import JobState, SessionPlan


def job(job_id: str, depends_on: list[str] = (), function: str = SERVICE_JOB, done: bool = False) -> JobRecord:
    document = {
        "_id": job_id, "depends_on": list(depends_on), "done": done, "job_name": job_id,
        "service_name": "s", "job_worker_entry": "run",
        "data": {"function_name": function, "kwargs": {"service_id": ObjectId()}},
    }
    return JobRecord.from_document(document)


def session(**options) -> SessionPlan:
    return SessionPlan.of([
        job("pre", function=PRE_SERVICES_JOB),
        job("a", ["pre"]), job("b", ["pre"]), job("c", ["a"]), job("d", ["c"]),
        job("post", ["b", "d"], function=POST_SERVICES_JOB),
    ], **options)


def test_jobs_start_when_their_dependencies_succeeded_and_independent_ones_together() -> None:
    plan = session()
    assert plan.ready() == ["pre"]
    plan.started("pre")
    plan.succeeded("pre")
    assert plan.ready() == ["a", "b"]


def test_a_failure_skips_every_dependent_but_the_clean_up_still_runs_last() -> None:
    plan = session()
    for name in ("pre", "a", "b"):
        plan.started(name)
    plan.succeeded("pre")
    plan.succeeded("b")

    skipped = plan.failed_job("a", "boom")

    assert skipped == ["c", "d"] and plan.reasons["d"] == "skipped: dependency a (s/a) failed"
    assert plan.ready() == ["post"] and plan.states["post"] is JobState.WAITING


def test_a_session_that_keeps_its_data_withholds_the_clean_up_after_a_failure() -> None:
    plan = session(keep_failed_session_data=True)
    plan.succeeded("pre")
    plan.succeeded("b")
    plan.failed_job("a", "boom")

    assert plan.ready() == [] and plan.withheld_clean_up() == ["post"] and plan.finished


def test_jobs_already_done_are_not_run_again() -> None:
    plan = SessionPlan.of([job("pre", function=PRE_SERVICES_JOB, done=True), job("a", ["pre"])])

    assert plan.ready() == ["a"]


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ([job("a", ["b"]), job("b", ["a"])], "cycle: a -> b -> a"),
        ([job("a", ["ghost"])], "depends on unknown jobs: ghost"),
        ([], "no jobs"),
    ],
)
def test_a_broken_graph_is_refused(jobs: list[JobRecord], message: str) -> None:
    with pytest.raises(InvalidRecord, match=message):
        SessionPlan.of(jobs)
