"""The bridge: a drop-in for installations whose unmodified scheduler writes jobs for mongo-qas.

It watches the `jobs` collection for sessions the scheduler has finished creating (their
post-services job exists), starts one `dcm-session` run per session and takes the session's queued
jobs away from mongo-qas consumers. The session run is created with an idempotency key made from
the session id, so a bridge restarted at any point never starts a session twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect import flow, get_run_logger

from blocks.database import DcmDatabase
from flows.runtime.errors import DatabaseUnavailable, JobError
from flows.runtime.intake import IntakeWatch
from flows.runtime.names import BRIDGE_FLOW, DEFAULT_BLOCK
from flows.runtime.platform_records import PlatformRecords
from flows.submit import submit_session

CONSUMER = "dcm-processor-flows"
POLL_SECONDS = 2.0


def session_idempotency_key(session_id: str) -> str:
    return f"dcm-session-{session_id}"


class SessionBridge:
    """One pass (`poll_once`) or a loop (`run`) of watching for new sessions.

    A session whose jobs cannot be read is reported (by id) and left to the platform, once: it does not
    stop the sessions after it. A database outage ends a pass; the next pass tries again.
    """

    def __init__(self, records: PlatformRecords, database_block: str = DEFAULT_BLOCK,
                 say: Callable[[str], None] = print) -> None:
        self.records = records
        self.database_block = database_block
        self.say = say
        self.refused: set[str] = set()
        self.intake = IntakeWatch()
        self.said_paused = False

    def poll_once(self) -> list[str]:
        """Submit every session that is ready, unless intake is paused; return their ids."""
        submitted: list[str] = []
        if self.intake.paused():
            if not self.said_paused:
                self.say("intake is paused (dcm-flows resume): no new session is submitted")
            self.said_paused = True
            return submitted
        self.said_paused = False
        for session_id in self.records.sessions_ready_for_bridge():
            if session_id in self.refused:
                continue
            try:
                self.records.session_jobs(session_id)
            except JobError as invalid:
                self.refused.add(session_id)
                self.say(f"session {session_id}: not submitted, its jobs cannot be run: {invalid}")
                continue
            flow_run_id = submit_session(
                session_id, self.database_block, idempotency_key=session_idempotency_key(session_id)
            )
            taken = self.records.take_over_session(session_id, CONSUMER)
            self.say(f"session {session_id}: flow run {flow_run_id} ({len(taken)} jobs taken over)")
            submitted.append(session_id)
        return submitted

    def run(self, poll_seconds: float = POLL_SECONDS, run_for_seconds: float | None = None) -> None:
        deadline = None if run_for_seconds is None else time.monotonic() + run_for_seconds
        while deadline is None or time.monotonic() < deadline:
            try:
                self.poll_once()
            except DatabaseUnavailable as outage:
                self.say(f"{outage}; trying again in {poll_seconds:g} s")
            time.sleep(poll_seconds)


@flow(name=BRIDGE_FLOW, persist_result=False, log_prints=False)
def bridge_flow(
    database_block: str = DEFAULT_BLOCK,
    poll_seconds: float = POLL_SECONDS,
    run_for_seconds: float | None = None,
) -> None:
    """Watch for sessions of the platform's scheduler and run each as one `dcm-session` flow run.

    Args:
        database_block: name of the `dcm-database` block.
        poll_seconds: pause between two looks at the jobs collection.
        run_for_seconds: stop after this long (None: run until cancelled).
    """
    logger = get_run_logger()
    records = PlatformRecords(DcmDatabase.resolve(database_block).open())
    SessionBridge(records, database_block, say=logger.info).run(poll_seconds, run_for_seconds)
