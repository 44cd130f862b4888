"""Everything that sets a Prefect server up for this project, in one place: block types, work pools, the
deployments of prefect.yaml, the sessions' queue limit, the crash automations and the database block.

Each step is idempotent (an existing pool, deployment or automation is updated), so running them all
again against a configured server changes nothing. The embedded stack runs them at its start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from uuid import UUID

from prefect.automations import Automation
from prefect.blocks.webhook import Webhook
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.events.actions import CallWebhook, ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound

from blocks.database import DcmDatabase
from blocks.host import WorkerHost
from flows.runtime.names import (
    DEFAULT_BLOCK,
    DOCKER_POOL,
    JOB_FLOW,
    PROCESS_POOL,
    SESSION_FLOW,
    SESSION_QUEUE,
)
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.variables import MISSED_HEARTBEATS_SECONDS, SILENT_RUN_CRASHED
from ops.pool_workers import DockerPoolWorker, ProcessPoolWorker

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")
"""The deployments (the repository's top-level prefect.yaml, shipped inside the package)."""
FLOW_RUN_ENDED = ["Completed", "Failed", "Cancelled", "Crashed"]
CRASH_AUTOMATION = "dcm: crash runs without heartbeat"
DEFAULT_SESSIONS_AT_ONCE = 3


class SetupError(RuntimeError):
    """A set-up step failed; the message says which and why."""


def register_block_types() -> None:
    """The `dcm-database` and `dcm-worker-host` block types (`prefect block register -m blocks` does the same)."""
    for block_type in (DcmDatabase, WorkerHost):
        block_type.register_type_and_schema()


def create_work_pools() -> None:
    """The `dcm-process` and `dcm-docker` work pools, with their pool workers' default job templates
    (an existing pool is updated, as `prefect work-pool create --overwrite` does)."""
    with get_client(sync_client=True) as client:
        for name, worker in ((PROCESS_POOL, ProcessPoolWorker), (DOCKER_POOL, DockerPoolWorker)):
            client.create_work_pool(WorkPoolCreate(
                name=name, type=worker.type, base_job_template=worker.get_default_base_job_template(),
            ), overwrite=True)


def deploy(environment: Mapping[str, str], folder: Path) -> None:
    """`prefect deploy --all` of the packaged prefect.yaml, run in `folder` with `environment` (the API URL)."""
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect), "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML)]
    completed = subprocess.run(command, cwd=folder, env={**os.environ, **environment}, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SetupError(f"`prefect deploy --all` failed:\n{completed.stdout}\n{completed.stderr}")


def limit_sessions_at_once(pool: str = PROCESS_POOL, limit: int = DEFAULT_SESSIONS_AT_ONCE) -> None:
    """Cap how many session runs the pool runs at once (the concurrency limit of their work queue).

    Each session runs up to `max_parallel_jobs` jobs; more sessions at once than the hosts and the
    Prefect server's database can serve only slows every one of them, so the rest wait, Scheduled.
    """
    with get_client(sync_client=True) as client:
        try:
            queue_id = client.read_work_queue_by_name(SESSION_QUEUE, work_pool_name=pool).id
        except ObjectNotFound:
            queue_id = client.create_work_queue(name=SESSION_QUEUE, work_pool_name=pool).id
        client.update_work_queue(queue_id, concurrency_limit=limit)


def crash_automation() -> Automation:
    """Prefect's recipe for zombie runs, the fast path of crash repair: a run whose process and pool worker are
    gone sends no heartbeat, and after MISSED_HEARTBEATS_SECONDS it is set Crashed; its Crashed event then
    starts `dcm-record-crash` (a trigger of that deployment, prefect.yaml). Without it `dcm-reconcile` finds
    such runs within a minute more."""
    return Automation(
        name=CRASH_AUTOMATION,
        description="A flow run whose heartbeats stop (its process and its worker are gone) is set Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in FLOW_RUN_ENDED)},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=MISSED_HEARTBEATS_SECONDS),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=SILENT_RUN_CRASHED,
        )],
    )


def ensure_crash_automations() -> list[str]:
    """Create the crash automation, replacing an earlier version of the same name; return its name."""
    automation = crash_automation()
    with get_client(sync_client=True) as prefect:
        for existing in prefect.read_automations_by_name(automation.name):
            prefect.delete_automation(existing.id)
    automation.create()
    return [automation.name]


NOTIFY_BLOCK = "dcm-failure-webhook"
"""The Webhook block the failure notifications post to (its URL is a secret: it may carry a token)."""
NOTIFY_PAYLOAD = """{
  "event": "{{ event.event }}",
  "flow": "{{ flow.name }}",
  "flow_run_id": "{{ flow_run.id }}",
  "run_name": {{ flow_run.name | tojson }},
  "parameters": {{ flow_run.parameters | tojson }},
  "state": "{{ flow_run.state.name }}",
  "message": {{ flow_run.state.message | tojson }},
  "ui_url": {{ flow_run | ui_url | tojson }}
}"""
"""What a notification says: ids, names, the state and its message, and the run's UI link. Parameters are ids
and state messages pass the redaction of every message this runtime writes, so no patient data is in it."""
NOTIFICATIONS = {
    "dcm: notify when a session fails": (SESSION_FLOW, ("Failed", "Crashed")),
    "dcm: notify when a job crashes": (JOB_FLOW, ("Crashed",)),
}


def failure_notification(name: str, flow_name: str, states: tuple[str, ...], webhook_id: UUID) -> Automation:
    """Post NOTIFY_PAYLOAD to the webhook block each time a run of `flow_name` enters one of `states`."""
    return Automation(
        name=name,
        description=f"Posts to the {NOTIFY_BLOCK} block when a {flow_name} run ends {' or '.join(states)}.",
        trigger=EventTrigger(
            expect={f"prefect.flow-run.{state}" for state in states},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": flow_name}),
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[CallWebhook(block_document_id=webhook_id, payload=NOTIFY_PAYLOAD)],
    )


def ensure_failure_notifications(url: str) -> list[str]:
    """Save `url` as the webhook block and create the notifications, replacing earlier ones; their names."""
    webhook_id = Webhook(url=url, headers={"Content-Type": "application/json"}).save(NOTIFY_BLOCK, overwrite=True)
    with get_client(sync_client=True) as prefect:
        for name in NOTIFICATIONS:
            for existing in prefect.read_automations_by_name(name):
                prefect.delete_automation(existing.id)
    for name, (flow_name, states) in NOTIFICATIONS.items():
        failure_notification(name, flow_name, states, webhook_id).create()
    return list(NOTIFICATIONS)


def set_up(database: DcmDatabase, environment: Mapping[str, str], folder: Path,
           say: Callable[[str], None] = lambda _step: None) -> None:
    """Every step, in order, against the Prefect API this process is connected to (`environment` points the
    `prefect deploy` command at the same one); `database` is saved as the `default` database block. `say` hears
    each step once it is done."""
    register_block_types()
    say("block types dcm-database and dcm-worker-host registered")
    create_work_pools()
    say(f"work pools {PROCESS_POOL} and {DOCKER_POOL} ready")
    deploy(environment, folder)
    say("deployments of prefect.yaml deployed")
    database.save(DEFAULT_BLOCK, overwrite=True)
    say(f"database block {DEFAULT_BLOCK} saved (docker jobs read the database from it)")
    PlatformRecords(database.open()).ensure_indexes()
    say("indexes of the jobs collection ready")
    ensure_crash_automations()
    say(f"automation ready: {CRASH_AUTOMATION}")
    limit_sessions_at_once()
    say(f"work queue {SESSION_QUEUE}: at most {DEFAULT_SESSIONS_AT_ONCE} sessions at once")
