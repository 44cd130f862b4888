"""The embedded local stack: SecantusDB, a Prefect server on SQLite (ops/prefect_server.py), the work pools,
deployments, pool workers and the warm engine.

This is what `dcm-flows stack start`, `make demo` and the test fixtures use, so the development set-up
and the tested set-up are the same. Each service is a separate process started in a session of its
own (it outlives the command that started it); `stack.json` in the stack's home records where
everything is, and `stop` ends it all. A hospital installation replaces these pieces by real MongoDB,
a Prefect server on PostgreSQL and workers on several hosts; nothing else changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import docker
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from pydantic import SecretStr

from blocks.database import ENVIRONMENT_NAME, ENVIRONMENT_PROVIDER, ENVIRONMENT_URL, DcmDatabase
from blocks.host import home_folder
from flows.runtime.names import DOCKER_POOL, DOCKER_POOL_WORKER_TYPE, PROCESS_POOL, PROCESS_POOL_WORKER_TYPE
from flows.runtime.process import send_signal
from flows.runtime.variables import API_CLIENT_VARIABLES
from ops.prefect_setup import set_up
from ops.warm_engine import SOCKET_VARIABLE

WORKER_STARTED = "started!"
"""What a Prefect worker prints once it polls."""
DATABASE_NAME = "dcm-processor"
START_TIMEOUT_SECONDS = 90
STOP_TIMEOUT_SECONDS = 15


def docker_engine_answers() -> bool:
    """Whether a Docker engine is reachable (the docker pool gets a worker only then)."""
    try:
        docker.from_env(timeout=5).ping()
    except Exception:
        return False
    return True


FLOW_RUN_RETENTION_DAYS = 30
EVENT_RETENTION_DAYS = 7
HEARTBEAT_RETENTION_DAYS = 1
RETENTION = {
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(FLOW_RUN_RETENTION_DAYS * 86400),
    "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": f"P{EVENT_RETENTION_DAYS}D",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_EVENT_RETENTION_OVERRIDES": json.dumps(
        {"prefect.flow-run.heartbeat": HEARTBEAT_RETENTION_DAYS * 86400}
    ),
}
"""Prefect's own retention, on for the embedded stack so that its database stays bounded over months: the
vacuum service (hourly) deletes flow runs that ended more than 30 days ago with their logs and artifacts, events
older than 7 days, and heartbeat events (two a minute per running run) older than a day. The job records in the
platform database keep each job's outcome for good."""


class StackError(RuntimeError):
    """A service of the local stack did not start."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _executable(name: str) -> str:
    """A console script of this environment (next to its Python), else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"'{name}' is not installed; run `make install` first")
    return found


def _wait(what: str, ready: Callable[[], bool], log: Path, timeout: float = START_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise StackError(f"{what} did not become ready within {timeout:g} s; see {log}")


def _port_open(port: int, address: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((address, port)) == 0


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        try:
            connection.connect(str(path))
        except OSError:
            return False
    return True


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class StackState:
    """What `stack.json` records about a running stack."""

    database_url: str
    api_url: str
    ui_url: str
    processes: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    """The ports of the services that have more than the two URLs say (the scaled stack's)."""
    kind: str = "embedded"
    """`embedded`, or `scaled` (ops/scaled_stack.py)."""
    started: dict[str, int] = field(default_factory=dict)
    """Each process's start time (clock ticks since boot): a pid alone may name anyone's process after a
    reboot, so the stack signals only a process whose start time is still the recorded one."""

    def is_ours(self, name: str) -> bool:
        """Whether the process recorded as `name` is still the one the stack started (and has not ended)."""
        pid = self.processes.get(name)
        return pid is not None and process_alive(pid) and _start_time(pid) == self.started.get(name)

    def environment(self) -> dict[str, str]:
        """Variables that point Prefect clients and flows at this stack."""
        return {
            "PREFECT_API_URL": self.api_url,
            ENVIRONMENT_PROVIDER: "mongodb",
            ENVIRONMENT_URL: self.database_url,
            ENVIRONMENT_NAME: DATABASE_NAME,
        }


class LocalStack:
    """Starts, describes and stops the embedded services below one home folder.

    Its Prefect API asks every request for the stack's secret (Prefect's own API authentication): whoever can
    create a run of `dcm-install-component` runs code as the workers' user, so another local user must not
    reach the API. The secret lives in `api-auth` in the home folder, readable by its owner only; the stack's
    server, workers, runs and this project's CLI are given it.
    """

    kind = "embedded"
    address = "127.0.0.1"
    """Where the platform database and the Prefect API listen: the loopback address on one machine."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = (home or home_folder()).resolve()
        self.state_file = self.home / "stack.json"
        self.logs = self.home / "logs"
        self.warm_engine_socket = self.home / "warm-engine.sock"
        self.api_auth_file = self.home / "api-auth"

    def api_auth(self) -> str:
        """The API's `user:password` (Prefect's auth string), made on first use; a file others could read is
        refused rather than used."""
        try:
            if self.api_auth_file.stat().st_mode & 0o077:
                raise PermissionError(f"{self.api_auth_file} is readable by others: `chmod 600` it (and consider "
                                      "the secret known: delete the file and restart the stack for a new one)")
            return self.api_auth_file.read_text().strip()
        except FileNotFoundError:
            self.home.mkdir(parents=True, exist_ok=True)
            secret = f"dcm-flows:{secrets.token_urlsafe(32)}"
            descriptor = os.open(self.api_auth_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as stream:
                stream.write(secret)
            return secret

    def state(self) -> StackState | None:
        if not self.state_file.exists():
            return None
        return StackState(**json.loads(self.state_file.read_text()))

    def is_running(self) -> bool:
        state = self.state()
        return state is not None and _http_ok(f"{state.api_url}/health")

    def _spawn(self, state: StackState, name: str, command: list[str], environment: dict[str, str],
               folder: Path | None = None) -> None:
        """Start a service in a session of its own, in `folder` (the home unless told), and record its pid and
        start time."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **environment}, start_new_session=True, cwd=folder or self.home,
            )
        state.processes[name] = process.pid
        state.started[name] = _start_time(process.pid) or 0
        self._save(state)

    def _end(self, state: StackState, name: str) -> None:
        """Stop the service `name` if it is still the process the stack started; forget it either way."""
        if state.is_ours(name):
            _terminate(state.processes[name])
        state.processes.pop(name, None)
        state.started.pop(name, None)

    def _prefect_environment(self, api_url: str | None = None) -> dict[str, str]:
        environment = {
            "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
            "PREFECT_API_AUTH_STRING": self.api_auth(),
            **API_CLIENT_VARIABLES,
        }
        if api_url:
            environment["PREFECT_API_URL"] = api_url
        return environment

    def start(self) -> StackState:
        """Start every service, register blocks, pool and deployments; return where they are."""
        if self.is_running():
            state = self.state()
            assert state is not None
            self.start_workers(state)
            return state
        self.stop()
        self.home.mkdir(parents=True, exist_ok=True)
        state = self._new_state()
        self._spawn_database(state)
        self._start_prefect_backends(state)
        self._spawn_server(state)
        self._wait_for_database(state)
        self._wait_for_server(state)
        self.configure(state)
        self.start_workers(state)
        return state

    def _new_state(self) -> StackState:
        """Where a new stack's services will listen: new free ports."""
        database_port, api_port = free_port(), free_port()
        return StackState(
            database_url=f"mongodb://{self.address}:{database_port}/?directConnection=true",
            api_url=f"http://{self.address}:{api_port}/api",
            ui_url=f"http://{self.address}:{api_port}",
        )

    def _start_prefect_backends(self, state: StackState) -> None:
        """What the Prefect server needs running before it starts: nothing for SQLite."""

    def _database_port(self, state: StackState) -> int:
        return urlsplit(state.database_url).port or 27017

    def _spawn_database(self, state: StackState) -> None:
        (self.home / "database").mkdir(parents=True, exist_ok=True)
        self._spawn(state, "database", [
            _executable("secantusd-py"), "--host", self.address, "--port", str(self._database_port(state)),
            "--storage-path", str(self.home / "database"),
        ], {})

    def _wait_for_database(self, state: StackState) -> None:
        _wait("SecantusDB", lambda: _port_open(self._database_port(state), self.address), self.logs / "database.log")

    def stop_database(self, state: StackState) -> None:
        """Stop the platform database (its data stays), as an outage or a maintenance window would."""
        self._end(state, "database")
        _wait("SecantusDB to stop", lambda: not _port_open(self._database_port(state), self.address),
              self.logs / "database.log")

    def start_database(self, state: StackState) -> None:
        """Start the platform database again, on the same port and data."""
        self._spawn_database(state)
        self._wait_for_database(state)

    def stop_warm_engine(self, state: StackState) -> None:
        """Stop the warm engine, and the runs it forked: process-pool runs then start a fresh engine
        process until `start_workers` starts it again."""
        self._end(state, "warm-engine")

    def _spawn_server(self, state: StackState) -> None:
        port = str(urlsplit(state.api_url).port)
        self._spawn(state, "prefect-server", [
            sys.executable, "-m", "ops.prefect_server", "--host", "127.0.0.1", "--port", port,
        ], {**self._prefect_environment(), **RETENTION, "PREFECT_UI_API_URL": state.api_url,
            "PREFECT_UI_URL": state.ui_url, "PREFECT_SERVER_API_AUTH_STRING": self.api_auth()})

    def _wait_for_server(self, state: StackState) -> None:
        _wait("Prefect server", lambda: _http_ok(f"{state.api_url}/health"), self.logs / "prefect-server.log")

    def restart_server(self, state: StackState) -> None:
        """Stop the Prefect server and start it again on the same port and database, as an upgrade would."""
        self.stop_server(state)
        self.start_server(state)

    def stop_server(self, state: StackState) -> None:
        """Stop the Prefect server (its database stays), as an outage would."""
        self._end(state, "prefect-server")

    def start_server(self, state: StackState) -> None:
        """Start the Prefect server again, on the same port and database."""
        self._spawn_server(state)
        self._wait_for_server(state)

    def stop_process_worker(self, state: StackState) -> None:
        """Stop the stack's process worker, where worker hosts of their own (ops/network_hosts.py) take its
        runs: it polls every queue of the pool, also theirs."""
        self._end(state, "process-worker")
        self._save(state)

    def replace_process_worker(self, state: StackState, worker_type: str = PROCESS_POOL_WORKER_TYPE) -> None:
        """Replace the process worker by one of `worker_type` (`process` is Prefect's own, which the bench
        compares with this project's); return once it has started."""
        self._end(state, "process-worker")
        log = self.logs / "process-worker.log"
        starts = log.read_text().count(WORKER_STARTED)
        self.start_workers(state, worker_type)
        _wait("the process worker", lambda: log.read_text().count(WORKER_STARTED) > starts, log)

    def worker_environment(self, state: StackState) -> dict[str, str]:
        """What the stack's workers (and their runs) are started with, beyond this process's environment:
        the stack's API and database, this environment's `bin` first on PATH, the warm engine's socket."""
        return {
            **self._prefect_environment(state.api_url), **state.environment(),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]),
            SOCKET_VARIABLE: str(self.warm_engine_socket),
        }

    def start_workers(self, state: StackState, process_worker_type: str = PROCESS_POOL_WORKER_TYPE) -> None:
        """Start the workers that are not running (all of them on a fresh stack), as a service manager
        would restart a worker that died."""
        worker_environment = self.worker_environment(state)
        worker = [_executable("prefect"), "worker", "start", "--pool"]
        commands = {
            "warm-engine": [sys.executable, "-m", "ops.warm_engine", "serve", str(self.warm_engine_socket)],
            "process-worker": [*worker, PROCESS_POOL, "--type", process_worker_type],
        }
        if docker_engine_answers():
            commands["docker-worker"] = [*worker, DOCKER_POOL, "--type", DOCKER_POOL_WORKER_TYPE]
        for name, command in commands.items():
            if not state.is_ours(name):
                self._spawn(state, name, command, worker_environment)
        self._save(state)
        _wait("the warm engine", lambda: _socket_answers(self.warm_engine_socket), self.logs / "warm-engine.log")

    def configure(self, state: StackState) -> None:
        """Set the stack's Prefect server up for this project (ops/prefect_setup.py), with the stack's
        database as the default database block."""
        with self.connected(state):
            set_up(DcmDatabase(url=SecretStr(state.database_url), database_name=DATABASE_NAME),
                   self._prefect_environment(state.api_url), self.home)

    @contextmanager
    def connected(self, state: StackState) -> Iterator[None]:
        """Point this process's Prefect client (and the database fallback) at the stack.

        Prefect reads its settings once, when it is imported, so the API URL is entered as a settings
        context; processes started from here get it through the environment, which is restored afterwards (a
        second stack connected for a while must not stay the one later processes are pointed at).
        """
        before = dict(os.environ)
        os.environ.update({**self._prefect_environment(state.api_url), **state.environment()})
        try:
            with temporary_settings(updates={PREFECT_API_URL: state.api_url,
                                             PREFECT_API_AUTH_STRING: self.api_auth()}):
                yield
        finally:
            os.environ.clear()
            os.environ.update(before)

    def _save(self, state: StackState) -> None:
        self.state_file.write_text(json.dumps(asdict(state), indent=2))

    def stop(self) -> None:
        """Stop the worker, the server and the database, in that order."""
        state = self.state()
        if state is None:
            return
        for name in reversed(list(state.processes)):
            self._end(state, name)
        self.state_file.unlink(missing_ok=True)


def _terminate(pid: int) -> None:
    """SIGTERM a service's process group, SIGKILL after STOP_TIMEOUT_SECONDS."""
    if not send_signal(pid, signal.SIGTERM, group=True):
        return
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        _reap(pid)
        if not send_signal(pid, 0, group=True):
            return
        time.sleep(0.1)
    send_signal(pid, signal.SIGKILL, group=True)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs. A zombie does not: a killed process with threads stays one, unreapable, until its
    last thread has gone, and a worker restarted only after that would leave the pool without one meanwhile."""
    _reap(pid)
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None when it is gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (the process state first), or None when it is
    gone (also when it is reaped while the file is read)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _reap(pid: int) -> None:
    """Collect the exit status when this process started `pid`, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
