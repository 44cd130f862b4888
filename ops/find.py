"""`dcm-flows find`: a patient's sessions and jobs, read from the platform database on the operator's machine.

The search and its answer hold patient data, so neither goes to Prefect: the database is read directly, and
the only Prefect thing in the answer is each run's UI link, built here from the run id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from flows.runtime.platform_records import PlatformRecords
from flows.runtime.records import JobProgress
from ops.progress import run_link

SEARCH_FIELDS = ("patient_id", "accession", "study_uid", "session_id")
"""What a patient's work can be found by (the command's options, with dashes)."""


@dataclass(frozen=True)
class SessionWork:
    """One session of the patient and where each of its jobs stands."""

    session_id: str
    jobs: list[JobProgress]

    @property
    def state(self) -> str:
        """`failed` if a job failed, else `running`, `waiting` or `done` by its least finished job."""
        states = {job.state for job in self.jobs}
        for state in ("failed", "running", "waiting"):
            if state in states:
                return state
        return "done"

    @property
    def session_flow_run_id(self) -> str | None:
        return next((job.session_flow_run_id for job in self.jobs if job.session_flow_run_id), None)


def find_work(records: PlatformRecords, field: str, value: str) -> list[SessionWork]:
    """Every session with a job matching `field` = `value`, newest first, with all its jobs."""
    return [SessionWork(session_id, records.progress_of_session(session_id))
            for session_id in records.sessions_matching(field, value)]


def _link(ui_url: str | None, flow_run_id: str | None) -> str | None:
    return run_link(ui_url, flow_run_id) if ui_url and flow_run_id else None


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def as_text(work: list[SessionWork], ui_url: str | None) -> str:
    """A block per session: its state and run, then a line per job (state, start, duration, link, error)."""
    if not work:
        return "no session found"
    lines: list[str] = []
    for session in work:
        session_link = _link(ui_url, session.session_flow_run_id)
        lines.append(f"session {session.session_id}  {session.state}" + (f"  {session_link}" if session_link else ""))
        for job in session.jobs:
            link = _link(ui_url, job.flow_run_id) or "-"
            lines.append(f"  {job.state:8} {job.label:32} {_when(job.started_at or job.created_at):19} "
                         f"{_duration(job.seconds):>9}  {link}")
            if job.error_message:
                lines.append(f"           error: {job.error_message}")
        lines.append("")
    return "\n".join(lines).rstrip()


def as_json(work: list[SessionWork], ui_url: str | None) -> str:
    """The same answer for scripts."""
    def moment(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return json.dumps([{
        "session_id": session.session_id,
        "state": session.state,
        "session_run": _link(ui_url, session.session_flow_run_id),
        "jobs": [{
            "job_id": job.id, "job": job.label, "state": job.state, "channel": job.channel,
            "created_at": moment(job.created_at), "started_at": moment(job.started_at),
            "ended_at": moment(job.ended_at), "seconds": job.seconds, "error": job.error_message,
            "flow_run_id": job.flow_run_id, "run": _link(ui_url, job.flow_run_id),
        } for job in session.jobs],
    } for session in work], indent=2)
