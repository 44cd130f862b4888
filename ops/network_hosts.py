"""Worker hosts as network peers on one machine: Linux network namespaces on a bridge (needs root).

Each host is a network namespace with one veth link into a bridge of this machine (`ip netns`, `ip link`:
Debian's iproute2). A host's processes see their own interfaces only: they reach the stack's services at the
bridge's address, never over loopback (the namespace's loopback is its own and empty), and
dcm_processor_utils' `get_device_id()` answers differently in each host, since the MAC address it reads is
the host's own. Each host has its own home folder (its environments, its logs), its own process worker
polling the work queue of its device id and its own warm engine, as a real worker host would run them.
`remove` kills every process in the namespace and deletes it, however far `create` got. `worker_hosts` starts a
scaled stack with two such hosts, as the tests and `make load` use them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectAlreadyExists

from blocks.host import HOME_VARIABLE
from flows.runtime.names import (
    DEFAULT_QUEUE,
    PROCESS_POOL,
    PROCESS_POOL_WORKER_TYPE,
    SESSION_QUEUE,
    WARM_ENGINE_SOCKET_VARIABLE,
)
from ops.scaled_stack import ScaledStack
from ops.stack import WORKER_STARTED, LocalStack, StackState, _executable, _socket_answers, _wait

BRIDGE = "dcm-flows0"
NETWORK = "10.88.0"
"""The bridge's /24: this machine is .1 on it, host number n is .(10 + n)."""
BRIDGE_ADDRESS = f"{NETWORK}.1"
KILL_ROUNDS = 20
"""A process forked while the others are killed is found in the next round."""


def _ip(*arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *arguments], capture_output=True, text=True, check=check)


class Bridge:
    """The bridge the hosts' links join, with this machine's address on it."""

    def create(self) -> None:
        self.remove()
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")

    def remove(self) -> None:
        _ip("link", "del", BRIDGE, check=False)


@dataclass
class NetworkHost:
    """One worker host: a network namespace, its address on the bridge, its home and its processes."""

    number: int
    home: Path
    settings: dict[str, str] = field(default_factory=dict)
    """Environment variables of the host's processes beyond the stack's (DCM_FLOWS_WHEELHOUSE, say)."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"dcm-host-{self.number}"

    @property
    def address(self) -> str:
        return f"{NETWORK}.{10 + self.number}"

    def create(self) -> None:
        """The namespace, its link into the bridge (the bridge's end named `dcm-host-<n>`), its address and its
        route to the bridge's address."""
        self.remove()
        self.home.mkdir(parents=True, exist_ok=True)
        _ip("netns", "add", self.name)
        _ip("link", "add", self.name, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        _ip("link", "set", self.name, "master", BRIDGE)
        _ip("link", "set", self.name, "up")
        _ip("-n", self.name, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _ip("-n", self.name, "link", "set", "eth0", "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    def command(self, command: list[str]) -> list[str]:
        """`command`, run inside the host."""
        return ["ip", "netns", "exec", self.name, *command]

    def device_id(self) -> str:
        """The platform's device id, as `get_device_id()` answers inside the host."""
        return subprocess.run(
            self.command([sys.executable, "-c", "import dcm_processor_utils as u; print(u.get_device_id())"]),
            capture_output=True, text=True, check=True,
        ).stdout.strip()

    def environment(self, stack: LocalStack, state: StackState) -> dict[str, str]:
        """The stack's worker environment (its API and database at the bridge's address), with the host's own
        home (its environments) and warm engine."""
        return {**os.environ, **stack.worker_environment(state), HOME_VARIABLE: str(self.home),
                "PREFECT_HOME": str(self.home / "prefect"), WARM_ENGINE_SOCKET_VARIABLE: str(self.warm_engine_socket),
                **self.settings}

    @property
    def warm_engine_socket(self) -> Path:
        return self.home / "warm-engine.sock"

    def start_workers(self, stack: LocalStack, state: StackState, other_queues: tuple[str, ...] = ()) -> str:
        """Start the host's warm engine and its process worker on the work queue of its device id (made if
        missing) and `other_queues`; return the device id."""
        device_id = self.device_id()
        with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
            client.create_work_queue(name=device_id, work_pool_name=PROCESS_POOL)
        environment = self.environment(stack, state)
        self._spawn("warm-engine", [sys.executable, "-m", "ops.warm_engine", "serve", str(self.warm_engine_socket)],
                    environment)
        _wait(f"{self.name}'s warm engine", lambda: _socket_answers(self.warm_engine_socket), self._log("warm-engine"))
        self._spawn("process-worker", [_executable("prefect"), "worker", "start", "--pool", PROCESS_POOL,
                                       "--type", PROCESS_POOL_WORKER_TYPE, "--work-queue", device_id,
                                       *(argument for queue in other_queues for argument in ("--work-queue", queue))],
                    environment)
        _wait(f"{self.name}'s process worker", lambda: WORKER_STARTED in self._log("process-worker").read_text(),
              self._log("process-worker"))
        return device_id

    def _log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def _spawn(self, name: str, command: list[str], environment: dict[str, str]) -> None:
        self._log(name).parent.mkdir(parents=True, exist_ok=True)
        with self._log(name).open("ab") as log:
            self.processes[name] = subprocess.Popen(
                self.command(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=environment, start_new_session=True, cwd=self.home,
            )

    def kill_everything(self) -> None:
        """SIGKILL every process in the host, as its power cut would: its worker, warm engine, runs, callbacks."""
        for _ in range(KILL_ROUNDS):
            pids = _ip("netns", "pids", self.name, check=False).stdout.split()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
            for process in self.processes.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=1)
        self.processes.clear()

    def remove(self) -> None:
        self.kill_everything()
        _ip("netns", "del", self.name, check=False)
        _ip("link", "del", self.name, check=False)


@dataclass
class WorkerHosts:
    """A scaled stack and its worker hosts, with each host's device id."""

    stack: ScaledStack
    state: StackState
    hosts: list[NetworkHost]
    device_ids: list[str]


@contextmanager
def worker_hosts(home: Path, wheelhouse: Path, sessions_on: tuple[int, ...] = (1, 2)) -> Iterator[WorkerHosts]:
    """The scaled stack on a bridge's address and two worker hosts on the bridge, connected; hosts numbered in
    `sessions_on` also take sessions (and the `default` queue). The stack's own process worker is stopped,
    so every process run is on a host. Everything is removed afterwards, however the block ends."""
    bridge = Bridge()
    stack = ScaledStack(home / "stack", address=BRIDGE_ADDRESS)
    hosts = [NetworkHost(number, home / f"host-{number}", {"DCM_FLOWS_WHEELHOUSE": str(wheelhouse)})
             for number in (1, 2)]
    try:
        bridge.create()
        state = stack.start()
        with stack.connected(state):
            stack.stop_process_worker(state)
            device_ids = []
            for host in hosts:
                host.create()
                takes_sessions = host.number in sessions_on
                device_ids.append(host.start_workers(
                    stack, state, other_queues=(SESSION_QUEUE, DEFAULT_QUEUE) if takes_sessions else ()))
            yield WorkerHosts(stack, state, hosts, device_ids)
    finally:
        for host in hosts:
            host.remove()
        stack.purge()
        bridge.remove()
