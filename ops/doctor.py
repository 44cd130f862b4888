"""`dcm-flows doctor`: checks a running installation step by step and says what to fix.

Each check looks at one thing `dcm-flows setup` (ops/prefect_setup.py) sets up, or one thing the runs need
at run time, from the machine the operator runs it on: the Prefect server, the pools and their workers, the
sessions' queue, the deployments, the automations, the blocks, the platform database, the Docker engine and
the images of the installed docker workers, and the host's warm engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import docker
import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.exceptions import ObjectNotFound

from blocks.database import DcmDatabase
from flows.runtime.fast_path import answered_by_this_projects_server
from flows.runtime.names import DEFAULT_BLOCK, DOCKER_POOL, POOL_WORKER_TYPES, PROCESS_POOL, SESSION_QUEUE
from flows.runtime.platform_records import PlatformRecords
from ops.prefect_setup import CRASH_AUTOMATION, PREFECT_YAML
from ops.warm_engine import connect_to_warm_engine

WORKER_SILENT_AFTER = timedelta(seconds=90)
"""A pool worker whose last heartbeat is older than this is taken for gone (workers beat every 30 s)."""
SET_UP = "run `dcm-flows setup` against this server"
STOCK_WORKER_NAMES = ("ProcessWorker ", "DockerWorker ")
"""How Prefect names its stock process and docker workers when `--name` is not given (class name and a uuid)."""


@dataclass(frozen=True)
class Finding:
    """The outcome of one check: `problem` is None when it passed; `fix` says what to do otherwise."""

    check: str
    seen: str
    problem: str | None = None
    fix: str = ""

    def line(self) -> str:
        if self.problem is None:
            return f"ok    {self.check}: {self.seen}"
        return f"FAIL  {self.check}: {self.problem}\n      fix: {self.fix}"


class Doctor:
    """The checks, in the order a run needs what they check."""

    def __init__(self, client: SyncPrefectClient, database_block: str = DEFAULT_BLOCK,
                 warm_engine_socket: Path | None = None) -> None:
        self.client = client
        self.database_block = database_block
        self.warm_engine_socket = warm_engine_socket

    def findings(self) -> Iterator[Finding]:
        checks: list[Callable[[], Finding]] = [
            self.server, self.process_pool, self.docker_pool, self.sessions_queue, self.deployments,
            self.automations, self.database_block_saved, self.database_reachable, self.docker_images,
            self.warm_engine,
        ]
        for check in checks:
            try:
                yield check()
            except Exception as error:  # a check that cannot run is a finding, not the end of the others
                yield Finding(check.__name__.replace("_", " "), "", f"could not check: {error}", SET_UP)

    def server(self) -> Finding:
        try:
            answer = self.client.request("GET", "/health")
        except Exception as problem:
            return Finding("Prefect server", "", str(problem), "start the server (`dcm-flows stack start`, or "
                           "`python -m ops.prefect_server`) and set PREFECT_API_URL")
        if not answered_by_this_projects_server(answer.headers):
            return Finding("Prefect server", str(self.client.api_url), "a stock `prefect server start`: on SQLite it "
                           "refuses writes that meet another and runs back off 2 s or more per refusal (slower, still "
                           "correct)", "start it as `python -m ops.prefect_server` with the same options")
        return Finding("Prefect server", str(self.client.api_url))

    def pool(self, name: str, needed_for: str) -> Finding:
        """The pool exists, and a worker of this project's type polls it."""
        check = f"work pool {name}"
        try:
            pool = self.client.read_work_pool(name)
        except ObjectNotFound:
            return Finding(check, "", "missing", SET_UP)
        now = datetime.now(timezone.utc)
        workers = [worker for worker in self.client.read_workers_for_work_pool(name)
                   if worker.last_heartbeat_time and now - worker.last_heartbeat_time < WORKER_SILENT_AFTER]
        start = f"`prefect worker start --pool {name} --type {POOL_WORKER_TYPES.get(pool.type, pool.type)}`"
        if not workers:
            return Finding(check, "", f"no worker polls it: {needed_for} wait, Scheduled",
                           f"start one: {start} on each host that runs them")
        seen = f"{len(workers)} worker(s) polling" + (" (PAUSED: dcm-flows resume)" if pool.is_paused else "")
        stock = [worker.name for worker in workers if worker.name.startswith(STOCK_WORKER_NAMES)]
        if stock:
            return Finding(check, seen, f"{', '.join(stock)}: Prefect's stock worker, which finds a run only at its "
                           "next poll and starts each in a fresh interpreter (slower, still correct)",
                           f"stop it and start {start} instead")
        return Finding(check, seen)

    def process_pool(self) -> Finding:
        return self.pool(PROCESS_POOL, "sessions and venv jobs")

    def docker_pool(self) -> Finding:
        return self.pool(DOCKER_POOL, "docker jobs")

    def sessions_queue(self) -> Finding:
        check = f"work queue {SESSION_QUEUE}"
        try:
            queue = self.client.read_work_queue_by_name(SESSION_QUEUE, work_pool_name=PROCESS_POOL)
        except ObjectNotFound:
            return Finding(check, "", "missing", SET_UP)
        if queue.concurrency_limit is None:
            return Finding(check, "", "no concurrency limit: every waiting session would start at once", SET_UP)
        return Finding(check, f"at most {queue.concurrency_limit} sessions at once")

    def deployments(self) -> Finding:
        wanted = {(deployment["entrypoint"], deployment["name"])
                  for deployment in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
        present = {(deployment.entrypoint, deployment.name) for deployment in self.client.read_deployments()}
        missing = sorted(f"{entrypoint} ({name})" for entrypoint, name in wanted - present)
        if missing:
            return Finding("deployments", "", "missing: " + ", ".join(missing), SET_UP)
        return Finding("deployments", f"all {len(wanted)} of prefect.yaml")

    def automations(self) -> Finding:
        if not self.client.read_automations_by_name(CRASH_AUTOMATION):
            return Finding("automations", "", f"'{CRASH_AUTOMATION}' is missing: crashed runs are repaired only "
                           "by dcm-reconcile, a minute later", SET_UP + " (or `dcm-flows automations`)")
        return Finding("automations", f"'{CRASH_AUTOMATION}'")

    def database_block_saved(self) -> Finding:
        check = f"database block {self.database_block}"
        try:
            DcmDatabase.load(self.database_block)
        except ValueError:
            return Finding(check, "", "not saved: process jobs fall back to their worker's DCM_DB_* variables, but "
                           "docker jobs cannot (a container does not see its worker's environment) and fail with "
                           "DatabaseNotConfigured", SET_UP + " (it saves DCM_DB_URL as the block)")
        return Finding(check, "saved")

    def database_reachable(self) -> Finding:
        records = PlatformRecords(DcmDatabase.resolve(self.database_block).open())
        return Finding("platform database", f"answers ({len(records.names('services'))} services installed)")

    def docker_images(self) -> Finding:
        records = PlatformRecords(DcmDatabase.resolve(self.database_block).open())
        images = records.docker_images()
        if not images:
            return Finding("docker engine and images", "no docker worker installed")
        engine = docker.from_env(timeout=10)
        missing = [image for image in images if not engine.images.list(name=image)]
        if missing:
            return Finding("docker engine and images", "", "images missing on this host: " + ", ".join(missing),
                           "install the component again here (`dcm-flows install --force`)")
        return Finding("docker engine and images", f"{len(images)} worker image(s) present")

    def warm_engine(self) -> Finding:
        if self.warm_engine_socket is None:
            return Finding("warm engine", "not checked (no local stack here)")
        connection = connect_to_warm_engine(str(self.warm_engine_socket))
        if connection is None:
            return Finding("warm engine", "", f"nothing listens at {self.warm_engine_socket}: each run starts a "
                           "fresh Python process (slower, still correct)", "`dcm-flows stack start` restarts it")
        connection.close()
        return Finding("warm engine", f"listening at {self.warm_engine_socket}")
