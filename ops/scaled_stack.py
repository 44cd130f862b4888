"""The scaled stack: Prefect shaped as its guide "How to scale self-hosted Prefect" says, on one machine.

PostgreSQL (a cluster of the stack's own), Redis (Prefect's messaging and its cache, the events' causal
ordering, the concurrency leases and docket's background tasks), two API servers started with `--no-services`
behind haproxy, and one process of Prefect's background services; beside them, as in the embedded stack,
SecantusDB, the pool workers and the warm engine, which reach the API through haproxy only. Prefect's database
migrations run once, before the API servers start, which do not run them. `dcm-flows stack start --scaled`
starts it; the production recipe in docs/operating.md is this shape.

PostgreSQL refuses to run as root: started by root, the cluster belongs to the `postgres` user of Debian's
package and lives in /var/lib/dcm-flows (a folder that user can reach), not in the stack's home.
"""

from __future__ import annotations

import csv
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flows.runtime.process import send_signal
from ops.stack import (
    LocalStack,
    StackError,
    StackState,
    _executable,
    _http_ok,
    _port_open,
    _wait,
    free_port,
    process_alive,
)

API_SERVERS = ("api-server-1", "api-server-2")
POSTGRES_OWNER = "postgres"
"""The system user of Debian's PostgreSQL package, which runs the cluster when the stack is started by root."""
ROOTS_CLUSTERS = Path("/var/lib/dcm-flows")
PREFECT_DATABASE = "prefect"
PREFECT_ROLE = "prefect"
HAPROXY_CONFIGURATION = """global
    maxconn 4096
    stats socket {stats} mode 600 level user

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout tunnel 1h

frontend prefect_api
    bind {address}:{port}
    default_backend prefect_api_servers

backend prefect_api_servers
    option httpchk GET /api/health
    {servers}
"""
"""Round robin over the API servers; one that fails two health checks a second apart gets no requests until
it answers again. The tunnel timeout keeps the workers' event-stream websockets open."""


def postgres_program(name: str) -> str:
    """A PostgreSQL program (initdb, postgres, createdb) of the newest version installed."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda path: int(path.parts[-3]))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    if path is None:
        raise StackError(f"PostgreSQL's {name} is not installed: `apt-get install postgresql`")
    return path


def _program(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        raise StackError(f"{name} is not installed: `apt-get install {package}`")
    return path


class ScaledStack(LocalStack):
    """The embedded stack's services, with the Prefect server replaced by the scaled shape."""

    kind = "scaled"

    def __init__(self, home: Path | None = None, address: str = "127.0.0.1") -> None:
        """`address`: where the load balancer, the platform database and Redis listen, for workers on other
        hosts (an address of this machine they reach; ops/network_hosts.py makes one on a bridge)."""
        super().__init__(home)
        self.address = address

    @property
    def cluster(self) -> Path:
        """The PostgreSQL cluster's folder (also its socket's)."""
        if os.geteuid() != 0:
            return self.home / "postgres"
        return ROOTS_CLUSTERS / f"postgres-{hashlib.sha256(str(self.home).encode()).hexdigest()[:16]}"

    def _secret(self, name: str) -> str:
        """A password of the stack's, made on first use, in a file of the home readable by its owner only."""
        path = self.home / f"{name}-password"
        if not path.exists():
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as stream:
                stream.write(secrets.token_hex(24))
        return path.read_text().strip()

    def _as_cluster_owner(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", POSTGRES_OWNER, "--", *command] if os.geteuid() == 0 else command

    def _prefect_database_url(self, state: StackState) -> str:
        return (f"postgresql+asyncpg://{PREFECT_ROLE}:{self._secret('postgres')}@127.0.0.1:"
                f"{state.ports['postgres']}/{PREFECT_DATABASE}")

    def _redis_url(self, state: StackState) -> str:
        return f"redis://:{self._secret('redis')}@{self.address}:{state.ports['redis']}/0"

    def _scaled_prefect_environment(self, state: StackState) -> dict[str, str]:
        """The settings Prefect's scaling guide names, for the API servers, the services and the migrations."""
        redis = self._redis_url(state)
        return {
            **self._prefect_environment(),
            "PREFECT_API_DATABASE_CONNECTION_URL": self._prefect_database_url(state),
            "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_SERVER_DOCKET_URL": redis,
            "PREFECT_REDIS_MESSAGING_URL": redis,
            "PREFECT_SERVER_API_AUTH_STRING": self.api_auth(),
            "PREFECT_UI_API_URL": state.api_url,
            "PREFECT_UI_URL": state.ui_url,
        }

    def _new_state(self) -> StackState:
        ports = {name: free_port() for name in ("database", "postgres", "redis", "load-balancer", *API_SERVERS)}
        return StackState(
            database_url=f"mongodb://{self.address}:{ports['database']}/?directConnection=true",
            api_url=f"http://{self.address}:{ports['load-balancer']}/api",
            ui_url=f"http://{self.address}:{ports['load-balancer']}",
            ports=ports, kind=self.kind,
        )

    def _start_prefect_backends(self, state: StackState) -> None:
        """PostgreSQL and Redis, then Prefect's migrations, once."""
        self._start_postgres(state)
        self._start_redis(state)
        self._migrate(state)

    def _start_postgres(self, state: StackState) -> None:
        cluster = self.cluster
        if not (cluster / "PG_VERSION").exists():
            self._make_cluster(cluster)
        self._spawn(state, "postgres", self._as_cluster_owner([
            postgres_program("postgres"), "-D", str(cluster), "-p", str(state.ports["postgres"]),
            "-h", "127.0.0.1", "-k", str(cluster), "-c", "max_connections=200",
        ]), {}, folder=cluster)
        _wait("PostgreSQL", lambda: _port_open(state.ports["postgres"]), self.logs / "postgres.log")
        created = subprocess.run(
            [postgres_program("createdb"), "-h", "127.0.0.1", "-p", str(state.ports["postgres"]), "-U", PREFECT_ROLE,
             PREFECT_DATABASE], env={**os.environ, "PGPASSWORD": self._secret("postgres")},
            capture_output=True, text=True, check=False,
        )
        if created.returncode != 0 and "already exists" not in created.stderr:
            raise StackError(f"could not create Prefect's database: {created.stderr.strip()}")

    def _make_cluster(self, cluster: Path) -> None:
        """initdb a cluster whose superuser is Prefect's role, with its password (scram) on every connection."""
        cluster.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        cluster.mkdir(mode=0o700, exist_ok=True)
        password_file = cluster.parent / f".{cluster.name}-password"
        password_file.write_text(self._secret("postgres"))
        if os.geteuid() == 0:
            shutil.chown(cluster, POSTGRES_OWNER, POSTGRES_OWNER)
            shutil.chown(password_file, POSTGRES_OWNER, POSTGRES_OWNER)
        password_file.chmod(0o600)
        try:
            subprocess.run(self._as_cluster_owner([
                postgres_program("initdb"), "-D", str(cluster), "-U", PREFECT_ROLE, f"--pwfile={password_file}",
                "--auth=scram-sha-256", "-E", "UTF8", "--locale=C",
            ]), check=True, capture_output=True, cwd=cluster)
        finally:
            password_file.unlink(missing_ok=True)

    def _start_redis(self, state: StackState) -> None:
        (self.home / "redis").mkdir(exist_ok=True)
        self._spawn(state, "redis", [
            _program("redis-server", "redis-server"), "--bind", self.address, "--port", str(state.ports["redis"]),
            "--requirepass", self._secret("redis"), "--dir", str(self.home / "redis"), "--save", "",
            "--appendonly", "no",
        ], {})
        _wait("Redis", lambda: _port_open(state.ports["redis"], self.address), self.logs / "redis.log")

    def _migrate(self, state: StackState) -> None:
        """Prefect's migrations, once for the stack (its API servers do not run them)."""
        migrated = subprocess.run([_executable("prefect"), "server", "database", "upgrade", "-y"],
                                  env={**os.environ, **self._scaled_prefect_environment(state)},
                                  capture_output=True, text=True, check=False)
        if migrated.returncode != 0:
            raise StackError(f"Prefect's migrations failed: {migrated.stdout[-2000:]}{migrated.stderr[-2000:]}")

    def _spawn_server(self, state: StackState) -> None:
        """The API servers, the background services and the load balancer in front of the API servers."""
        for name in API_SERVERS:
            self.start_api_server(state, name)
        self._spawn(state, "prefect-services", [_executable("prefect"), "server", "services", "start"],
                    self._scaled_prefect_environment(state))
        configuration = self.home / "haproxy.cfg"
        configuration.write_text(HAPROXY_CONFIGURATION.format(
            address=self.address, port=state.ports["load-balancer"], stats=self.load_balancer_socket,
            servers="\n    ".join(f"server {name} 127.0.0.1:{state.ports[name]} check inter 1s fall 2 rise 1"
                                  for name in API_SERVERS),
        ))
        self._spawn(state, "load-balancer", [_program("haproxy", "haproxy"), "-db", "-f", str(configuration)], {})

    @property
    def load_balancer_socket(self) -> Path:
        return self.home / "haproxy.sock"

    def connections_per_api_server(self) -> dict[str, int]:
        """How many connections the load balancer has passed to each API server since it started."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(str(self.load_balancer_socket))
            connection.sendall(b"show stat\n")
            answer = b"".join(iter(lambda: connection.recv(65536), b"")).decode()
        rows = list(csv.reader(answer.lstrip("# ").splitlines()))
        header, lines = rows[0], [row for row in rows[1:] if row]
        name, total = header.index("svname"), header.index("stot")
        return {line[name]: int(line[total]) for line in lines if line[name] in API_SERVERS}

    def _wait_for_server(self, state: StackState) -> None:
        for name in API_SERVERS:
            self._wait_for_api_server(state, name)
        super()._wait_for_server(state)

    def _wait_for_api_server(self, state: StackState, name: str) -> None:
        _wait(f"Prefect {name}", lambda: _http_ok(f"http://127.0.0.1:{state.ports[name]}/api/health"),
              self.logs / f"{name}.log")

    def start_api_server(self, state: StackState, name: str, wait: bool = True) -> None:
        """Start one API server (again), on its port."""
        self._spawn(state, name, [
            sys.executable, "-m", "ops.prefect_server", "--no-services", "--host", "127.0.0.1",
            "--port", str(state.ports[name]),
        ], self._scaled_prefect_environment(state))
        if wait:
            self._wait_for_api_server(state, name)

    def stop_api_server(self, state: StackState, name: str) -> None:
        """Stop one API server, as its host's failure would: the load balancer sends everything to the other."""
        self._end(state, name)
        self._save(state)

    def restart_postgres(self, state: StackState, down_seconds: float = 0.0) -> None:
        """Stop PostgreSQL the fast way (open transactions are rolled back), leave it stopped `down_seconds` (as a
        failover would) and start it again on its port, as a maintenance restart would."""
        pid = state.processes.get("postgres")
        if pid is not None and state.is_ours("postgres"):
            send_signal(pid, signal.SIGINT, group=True)
            _wait("PostgreSQL to stop", lambda: not process_alive(pid), self.logs / "postgres.log")
        self._end(state, "postgres")
        time.sleep(down_seconds)
        self._start_postgres(state)

    def restart_redis(self, state: StackState) -> None:
        """Stop Redis and start it again on its port, empty: what it held was Prefect's messages in flight."""
        self._end(state, "redis")
        _wait("Redis to stop", lambda: not _port_open(state.ports["redis"], self.address), self.logs / "redis.log")
        self._start_redis(state)

    def stop_server(self, state: StackState) -> None:
        for name in ("load-balancer", "prefect-services", *API_SERVERS):
            self._end(state, name)
        self._save(state)

    def start_server(self, state: StackState) -> None:
        self._spawn_server(state)
        self._wait_for_server(state)

    def purge(self) -> None:
        """Remove the stack's PostgreSQL cluster (stopped first), which may live outside its home."""
        self.stop()
        shutil.rmtree(self.cluster, ignore_errors=True)
