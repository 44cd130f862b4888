"""`dcm-backlog`: the platform's backlog at a glance, as a table artifact kept current by a scheduled run.

The same table is what `dcm-flows status` prints: sessions waiting and running, jobs running per host queue,
jobs failed in the last 24 h by service, the age of the oldest waiting job, and installs in progress. It holds
counts, queue and service names only, so it may live in Prefect.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from blocks.database import DcmDatabase
from flows.runtime.names import BACKLOG_ARTIFACT, BACKLOG_FLOW, DEFAULT_BLOCK, INSTALL_FLOW
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.records import Backlog

FAILED_WITHIN = timedelta(hours=24)
UNFINISHED = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]


def installs_in_progress(client: SyncPrefectClient) -> int:
    """Install runs not finished yet (waiting for a worker or running)."""
    return client.count_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[INSTALL_FLOW])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED))),
    )


def _age(since: datetime | None, now: datetime) -> str:
    if since is None:
        return "none waiting"
    minutes = max(0.0, (now - since).total_seconds()) / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def backlog_rows(backlog: Backlog, installs: int, now: datetime) -> list[dict[str, str]]:
    """The backlog as rows of (what, count)."""
    rows = [
        ("sessions waiting (work left, nothing running)", str(backlog.sessions_waiting)),
        ("sessions running", str(backlog.sessions_running)),
        ("oldest waiting job", _age(backlog.oldest_waiting_since, now)),
        ("jobs running", str(sum(backlog.running_by_queue.values()))),
        *((f"jobs running on queue {queue}", str(count)) for queue, count in sorted(backlog.running_by_queue.items())),
        ("jobs failed in the last 24 h", str(sum(backlog.failed_by_service.values()))),
        *((f"failed in the last 24 h: {service}", str(count))
          for service, count in sorted(backlog.failed_by_service.items())),
        ("installs in progress", str(installs)),
    ]
    return [{"what": what, "count": count} for what, count in rows]


def current_backlog(records: PlatformRecords, client: SyncPrefectClient) -> list[dict[str, str]]:
    now = datetime.now(timezone.utc)
    return backlog_rows(records.backlog(now - FAILED_WITHIN), installs_in_progress(client), now)


@flow(name=BACKLOG_FLOW, persist_result=False, log_prints=False)
def backlog_flow(database_block: str = DEFAULT_BLOCK) -> None:
    """Publish the backlog table as the `dcm-backlog` artifact.

    Args:
        database_block: name of the `dcm-database` block.
    """
    records = PlatformRecords(DcmDatabase.resolve(database_block).open())
    with get_client(sync_client=True) as client:
        rows = current_backlog(records, client)
    create_table_artifact(rows, key=BACKLOG_ARTIFACT, description="the platform's backlog (dcm-flows status)")
