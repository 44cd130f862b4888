"""The operator's views on a big platform database: `dcm-flows status` (the backlog) and `dcm-flows find` over
100,000 job records on the embedded stack's SecantusDB, each beside a count of every record from the same run
(the cheapest question the database can be asked about the whole collection)."""

from __future__ import annotations

import random
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from bench.figures import Figure
from blocks.database import DcmDatabase
from flows.runtime.names import DEFAULT_BLOCK
from flows.runtime.platform_records import JOBS, PlatformRecords
from flows.runtime.records import SERVICE_JOB

RECORDS = 100_000
JOBS_PER_SESSION = 10
INSERT_BATCH = 5_000


def job_documents(count: int, seed: int = 1) -> list[dict[str, Any]]:
    """`count` job records as the scheduler and the runtime leave them over a month: 90% done, 3% failed,
    1% running, the rest waiting, on three hosts and ten services."""
    chance = random.Random(seed)
    now = datetime.now(timezone.utc)
    documents = []
    for number in range(count):
        session = number // JOBS_PER_SESSION
        outcome = chance.random()
        documents.append({
            "sessionId": f"{session:024x}", "channel": f"host-{session % 3}", "service_name": f"service-{number % 10}",
            "job_name": "run", "data": {"function_name": SERVICE_JOB, "kwargs": {"headers": {
                "StudyInstanceUID": f"1.2.3.{session}", "Metadata": {"PatientID": f"PATIENT-{session}"},
            }}},
            "createdAt": now - timedelta(minutes=chance.randint(0, 30 * 24 * 60)),
            "done": outcome < 0.90, "error": 0.90 <= outcome < 0.93, "inProgress": 0.93 <= outcome < 0.94,
            "lastErrorAt": now - timedelta(hours=chance.randint(0, 72)),
        })
    return documents


def _timed(action: Any, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        action()
        samples.append(time.perf_counter() - began)
    return samples


def measure_operator_views(repeats: int) -> str:
    """Fill a database of the bench's own on the connected stack's server, measure, drop it."""
    name = f"bench-views-{uuid.uuid4().hex[:8]}"
    database = DcmDatabase.load(DEFAULT_BLOCK).with_database_name(name)
    records = PlatformRecords(database.open())
    collection = database.open().db.get_db()[JOBS]
    try:
        documents = job_documents(RECORDS)
        for start in range(0, len(documents), INSERT_BATCH):
            collection.insert_many(documents[start:start + INSERT_BATCH])
        began = time.perf_counter()
        records.ensure_indexes()
        indexing = time.perf_counter() - began
        since = datetime.now(timezone.utc) - timedelta(hours=24)
        figures = [
            Figure("count every job record (baseline)", _timed(lambda: collection.count_documents({}), repeats)),
            Figure("`dcm-flows status`: the backlog", _timed(lambda: records.backlog(since), repeats)),
            Figure("`dcm-flows find --patient-id`: sessions and jobs of one patient",
                   _timed(lambda: [records.progress_of_session(session) for session in
                                   records.sessions_matching("patient_id", "PATIENT-4711")], repeats)),
        ]
    finally:
        database.open().db.get_db().client.drop_database(name)
    header = "| | median s | min s | max s | runs | ratio |\n|---|---|---|---|---|---|\n"
    return (
        "<!-- operator -->\n## The operator's views on 100,000 job records\n\n"
        f"bench/operator_views.py: {RECORDS:,} job records ({JOBS_PER_SESSION} per session, a month of them) in "
        "the embedded stack's SecantusDB, with the indexes `dcm-flows setup` creates (built in "
        f"{indexing:.1f} s here); the ratio is to counting every record.\n\n"
        + header + "\n".join(figure.row(figures[0]) for figure in figures) + "\n<!-- /operator -->"
    )
