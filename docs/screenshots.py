"""`make screenshots`: pictures of the real Prefect UI of the embedded stack, for the README and guides.

Runs the demo when the stack has no session run yet, then has headless Chromium (Debian's `chromium`)
render five pages into `docs/images/`: a session run with its child job runs, a job run with its
three tasks and its logs (the callback's output among them), an install run's progress artifact,
a session run's job graph artifact, and the work pools.
"""

from __future__ import annotations

import base64
import http.server
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
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


def artifact_of(client: SyncPrefectClient, flow_run_id: UUID, kind: str) -> UUID:
    """The run's artifact of type `kind` (progress, markdown, table)."""
    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=[kind])
    ))
    return artifacts[0].id


def pictures(client: SyncPrefectClient) -> list[Picture]:
    session = latest_completed_run(client, "dcm-session")
    job = latest_completed_run(client, "dcm-job", "nifti-converter")
    install = latest_completed_run(client, "dcm-install-component", "series-qc")
    return [
        Picture("session-run.png", f"/runs/flow-run/{session}"),
        Picture("job-run.png", f"/runs/flow-run/{job}", height=1800),
        Picture("install-progress.png", f"/artifacts/artifact/{artifact_of(client, install, 'progress')}"),
        Picture("session-graph.png", f"/artifacts/artifact/{artifact_of(client, session, 'markdown')}"),
        Picture("work-pools.png", "/work-pools"),
    ]


def render(chromium: str, url: str, output: Path, height: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--window-size={WIDTH},{height}", f"--user-data-dir={profile}",
             f"--screenshot={output}", url],
            check=True, capture_output=True, timeout=120,
        )


class SignedInProxy(http.server.ThreadingHTTPServer):
    """The stack's UI and API as a signed-in browser sees them: each request gets the stack's credentials, and
    the UI's settings point its API calls here and ask for no login (headless Chromium cannot type one in)."""

    def __init__(self, server_url: str, auth: str) -> None:
        self.server_url = server_url.rstrip("/")
        self.authorization = "Basic " + base64.b64encode(auth.encode()).decode()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: SignedInProxy

    def do_GET(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def do_PATCH(self) -> None:
        self._forward()

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        request = urllib.request.Request(self.server.server_url + self.path, data=body, method=self.command)
        for name in ("Content-Type", "Accept"):
            if self.headers.get(name):
                request.add_header(name, self.headers[name])
        request.add_header("Authorization", self.server.authorization)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, headers, content = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            status, headers, content = error.code, error.headers, error.read()
        if self.path.split("?")[0].endswith("/ui-settings"):
            settings = {**json.loads(content), "auth": None, "api_url": f"{self.server.url}/api"}
            content = json.dumps(settings).encode()
        self.send_response(status)
        self.send_header("Content-Type", headers.get("Content-Type", "application/octet-stream"))
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: Chromium loads many files."""


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
    with SignedInProxy(state.ui_url, stack.api_auth()) as proxy:
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        for picture in wanted:
            render(chromium, proxy.url + picture.path, IMAGES / picture.file, picture.height)
            print(f"{IMAGES / picture.file}  <-  {state.ui_url}{picture.path}")
        proxy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
