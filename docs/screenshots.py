"""`make screenshots`: pictures of the real Prefect UI of the embedded stack, for the README and guides.

Runs the demo when the stack has no session run yet, then has headless Chromium (Debian's `chromium`)
render four pages into `docs/images/`: a session run with its child job runs, a job run with its
three tasks and its logs (the callback's output among them), an install run's progress artifact,
and the work pools.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort

from blocks.host import home_folder
from ops.demo import run_demo
from ops.stack import LocalStack

IMAGES = Path(__file__).resolve().parent / "images"
WIDTH = 1500
RENDER_MILLISECONDS = 20000
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    f"--virtual-time-budget={RENDER_MILLISECONDS}",
]


@dataclass(frozen=True)
class Picture:
    file: str
    path: str
    height: int = 950


def latest_completed_run(client: SyncPrefectClient, flow_name: str, name_contains: str = "") -> UUID:
    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
        sort=FlowRunSort.START_TIME_DESC,
        limit=50,
    )
    for run in runs:
        if name_contains in run.name:
            return run.id
    raise LookupError(f"no completed {flow_name} run {name_contains!r} on this stack; run `make demo` first")


def progress_artifact(client: SyncPrefectClient, flow_run_id: UUID) -> UUID:
    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])
    ))
    return artifacts[0].id


def pictures(client: SyncPrefectClient) -> list[Picture]:
    session = latest_completed_run(client, "dcm-session")
    job = latest_completed_run(client, "dcm-job", "nifti-converter")
    install = latest_completed_run(client, "dcm-install-component", "series-qc")
    return [
        Picture("session-run.png", f"/runs/flow-run/{session}"),
        Picture("job-run.png", f"/runs/flow-run/{job}", height=1800),
        Picture("install-progress.png", f"/artifacts/artifact/{progress_artifact(client, install)}"),
        Picture("work-pools.png", "/work-pools"),
    ]


def render(chromium: str, url: str, output: Path, height: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--window-size={WIDTH},{height}", f"--user-data-dir={profile}",
             f"--screenshot={output}", url],
            check=True, capture_output=True, timeout=120,
        )


def main() -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not installed: `apt-get install -y chromium` (make screenshots does it as root)")
        return 1
    stack = LocalStack(home_folder())
    state = stack.start()
    with stack.connected(state), get_client(sync_client=True) as client:
        try:
            wanted = pictures(client)
        except LookupError:
            run_demo(stack)
            wanted = pictures(client)
    IMAGES.mkdir(parents=True, exist_ok=True)
    for picture in wanted:
        render(chromium, state.ui_url + picture.path, IMAGES / picture.file, picture.height)
        print(f"{IMAGES / picture.file}  <-  {state.ui_url}{picture.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
