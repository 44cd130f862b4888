"""Following a flow run at the terminal: a progress bar, its newest log line, and where to see it in the UI.

Long work (building an environment or an image, a session's jobs) runs on a worker, not in the
command that asked for it. The command follows the run through the Prefect API: the run's progress
artifact (which `dcm-install-component` and `dcm-session` keep up to date) drives the bar, and the
newest log line says what is happening.
"""

from __future__ import annotations

import time
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import ArtifactSort, LogSort
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn

POLL_SECONDS = 0.5
LINE_WIDTH = 70


def run_link(ui_url: str, flow_run_id: UUID | str) -> str:
    return f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"


def _percent(client: SyncPrefectClient, flow_run_id: UUID) -> float | None:
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])
        ),
        sort=ArtifactSort.UPDATED_DESC,
        limit=1,
    )
    return float(artifacts[0].data) if artifacts and isinstance(artifacts[0].data, (int, float)) else None


def _newest_line(client: SyncPrefectClient, flow_run_id: UUID) -> str:
    logs = client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=1, sort=LogSort.TIMESTAMP_DESC
    )
    line = logs[0].message.splitlines()[0] if logs and logs[0].message else ""
    return line if len(line) <= LINE_WIDTH else line[: LINE_WIDTH - 1] + "…"


def follow_run(
    flow_run_id: UUID, title: str, console: Console | None = None, timeout_seconds: float = 24 * 3600
) -> FlowRun:
    """Show the run's progress until it reaches a final state (or the timeout passes); return the run."""
    deadline = time.monotonic() + timeout_seconds
    columns = (SpinnerColumn(), TextColumn(title, markup=False), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[line]}", markup=False))
    with get_client(sync_client=True) as client, Progress(*columns, console=console) as progress:
        bar = progress.add_task(title, total=100, line="")
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            state = flow_run.state
            progress.update(bar, completed=_percent(client, flow_run_id) or 0, line=_newest_line(client, flow_run_id))
            if (state is not None and state.is_final()) or time.monotonic() > deadline:
                if state is not None and state.is_completed():
                    progress.update(bar, completed=100)
                return flow_run
            time.sleep(POLL_SECONDS)
