"""The job graph of one session: checking it, and deciding what may run next.

Pure bookkeeping with no I/O, so the rules are easy to read and to test:
* a job runs once every job it depends on has succeeded;
* when a job fails, every job that depends on it (directly or not) is skipped, naming the failure;
* the post-services job (the session's clean-up) runs once everything else has finished, whatever
  the outcome, unless the session keeps the data of failed sessions for debugging.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from flows.runtime.errors import InvalidRecord
from flows.runtime.records import POST_SERVICES_JOB, JobRecord


class JobState(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.SKIPPED)


@dataclass
class SessionPlan:
    """Where each job of a session stands; `ready()` says what to start next."""

    jobs: dict[str, JobRecord]
    keep_failed_session_data: bool = False
    states: dict[str, JobState] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, jobs: Iterable[JobRecord], keep_failed_session_data: bool = False) -> SessionPlan:
        """Check the graph (unknown dependency, cycle) and start from what the records say is done."""
        plan = cls({job.id: job for job in jobs}, keep_failed_session_data)
        if not plan.jobs:
            raise InvalidRecord("the session has no jobs")
        for job in plan.jobs.values():
            unknown = [dependency for dependency in job.depends_on if dependency not in plan.jobs]
            if unknown:
                raise InvalidRecord(f"job {job.id} ({job.label}) depends on unknown jobs: {', '.join(unknown)}")
        cycle = plan._cycle()
        if cycle:
            raise InvalidRecord(f"the session's jobs depend on each other in a cycle: {' -> '.join(cycle)}")
        plan.states = {
            job_id: JobState.SUCCEEDED if job.done else JobState.WAITING for job_id, job in plan.jobs.items()
        }
        return plan

    def _cycle(self) -> list[str]:
        """One dependency cycle as a list of job ids (first id repeated at the end), or []."""
        visiting: list[str] = []
        visited: set[str] = set()

        def visit(job_id: str) -> list[str]:
            if job_id in visiting:
                return [*visiting[visiting.index(job_id):], job_id]
            if job_id in visited:
                return []
            visiting.append(job_id)
            for dependency in self.jobs[job_id].depends_on:
                found = visit(dependency)
                if found:
                    return found
            visiting.pop()
            visited.add(job_id)
            return []

        for job_id in self.jobs:
            found = visit(job_id)
            if found:
                return found
        return []

    def _is_clean_up(self, job_id: str) -> bool:
        return self.jobs[job_id].function_name == POST_SERVICES_JOB

    def _others_finished(self, job_id: str) -> bool:
        return all(state.finished for other, state in self.states.items() if other != job_id)

    def ready(self) -> list[str]:
        """Waiting jobs that may start now, oldest first."""
        ready = []
        for job_id, state in self.states.items():
            if state is not JobState.WAITING:
                continue
            if self._is_clean_up(job_id):
                if self._others_finished(job_id) and not self._clean_up_withheld():
                    ready.append(job_id)
            elif all(self.states[dependency] is JobState.SUCCEEDED for dependency in self.jobs[job_id].depends_on):
                ready.append(job_id)
        return ready

    def _clean_up_withheld(self) -> bool:
        return self.keep_failed_session_data and bool(self.failed())

    def started(self, job_id: str) -> None:
        self.states[job_id] = JobState.RUNNING

    def succeeded(self, job_id: str) -> None:
        self.states[job_id] = JobState.SUCCEEDED

    def failed_job(self, job_id: str, reason: str) -> list[str]:
        """Record a failure; return the jobs skipped because of it (they now say which job failed)."""
        self.states[job_id] = JobState.FAILED
        self.reasons[job_id] = reason
        skipped = []
        for dependent in self._dependents_of(job_id):
            if self.states[dependent] is JobState.WAITING and not self._is_clean_up(dependent):
                self.states[dependent] = JobState.SKIPPED
                self.reasons[dependent] = f"skipped: dependency {job_id} ({self.jobs[job_id].label}) failed"
                skipped.append(dependent)
        return skipped

    def _dependents_of(self, job_id: str) -> list[str]:
        dependents: list[str] = []
        frontier = [job_id]
        while frontier:
            current = frontier.pop()
            for other, job in self.jobs.items():
                if current in job.depends_on and other not in dependents:
                    dependents.append(other)
                    frontier.append(other)
        return dependents

    def withheld_clean_up(self) -> list[str]:
        """The post-services jobs kept back because the session failed and keeps its data."""
        if not self._clean_up_withheld():
            return []
        return [job_id for job_id, state in self.states.items()
                if state is JobState.WAITING and self._is_clean_up(job_id) and self._others_finished(job_id)]

    def failed(self) -> list[str]:
        return [job_id for job_id, state in self.states.items() if state is JobState.FAILED]

    def skipped(self) -> list[str]:
        return [job_id for job_id, state in self.states.items() if state is JobState.SKIPPED]

    def running(self) -> list[str]:
        return [job_id for job_id, state in self.states.items() if state is JobState.RUNNING]

    @property
    def finished(self) -> bool:
        return not self.running() and not self.ready()

    def percent_finished(self) -> float:
        """How much of the session has ended (succeeded, failed or skipped), for progress displays."""
        ended = sum(1 for state in self.states.values() if state.finished)
        return 100.0 * ended / len(self.states)

    def as_markdown(self, seconds: dict[str, float | None]) -> str:
        """The job graph for people (a Prefect artifact): a row per job in the scheduler's order, with its state,
        how long it took (`seconds` by job id), the rows it waited for and, for a failed job, the rows it blocked.
        Labels and states only: no reason text, which may quote a service's message about the patient."""
        number = {job_id: str(row) for row, job_id in enumerate(self.jobs, start=1)}
        failed = self.failed()
        skipped = self.skipped()
        summary = f"{len(self.jobs)} jobs: " + ", ".join(
            f"{sum(1 for state in self.states.values() if state is kind)} {kind.value}" for kind in JobState
            if any(state is kind for state in self.states.values())
        )
        rows = ["| # | job | state | took | after | blocked |", "|---|---|---|---|---|---|"]
        for job_id, job in self.jobs.items():
            state = self.states[job_id].value
            took = seconds.get(job_id)
            blocked = [number[other] for other in skipped if self.reasons.get(other, "").startswith(
                f"skipped: dependency {job_id} ")]
            rows.append("| " + " | ".join((
                number[job_id], job.label, f"**{state}**" if job_id in failed else state,
                "" if took is None else f"{took:.1f} s", ", ".join(number[other] for other in job.depends_on),
                ", ".join(blocked),
            )) + " |")
        return f"### Job graph\n\n{summary}\n\n" + "\n".join(rows)
