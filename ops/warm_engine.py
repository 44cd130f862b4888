"""The warm engine: process-pool flow runs start in a copy of a process that has already imported Prefect
and the flows, instead of in a new interpreter that imports them again.

A process worker starts each flow run with its job's command. As `python -m prefect.engine` that is a new
Python process which spends about 3 s importing Prefect, this project and the database provider before
the run begins (docs/benchmarks.md). The warm engine is one process per worker host that has done those
imports once and forks itself for each run, which then starts in milliseconds.

The job command is `python -m ops.warm_engine`: a client that imports nothing but the standard library.
It hands its environment, working folder and standard streams to the warm engine over a Unix socket,
forwards the signals the worker sends it (cancellation) to the forked run, and exits as the run exited,
so the worker sees the process it started live and end as before. A forked run whose client dies (killed
with its worker's process group, say) kills itself. Where no warm engine answers (none started, started
from another interpreter, a docker container) the client becomes `python -m prefect.engine` itself, so
the same command works on every host.

Run one beside each process worker, from the same environment, and give the worker its socket:

    python -m ops.warm_engine serve /run/dcm-flows/engine.sock &
    DCM_FLOWS_WARM_ENGINE=/run/dcm-flows/engine.sock prefect worker start --pool dcm-process --type dcm-process

`dcm-flows stack start` does both. The warm engine runs the code it imported when it started: restart it
with the worker after upgrading this project. The socket is made readable by its owner only; whoever can
connect to it runs code as the warm engine's user.

Imports that only the serving side or a forked run needs (Prefect, ssl, selectors, runpy) are made in the
functions that use them, on purpose: the job command imports this module once per run, and with the standard
library alone it starts in about 25 ms, where Prefect alone takes 1.2 s.
"""

from __future__ import annotations

import array
import contextlib
import functools
import gc
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from flows.runtime.names import FRESH_ENGINE_VARIABLE, WARM_ENGINE_SOCKET_VARIABLE
from flows.runtime.process import send_signal

if TYPE_CHECKING:
    import ssl

SOCKET_VARIABLE = WARM_ENGINE_SOCKET_VARIABLE
"""The environment variable that tells the job command where the warm engine of its host listens."""

PRELOADED_MODULES = (
    "prefect.engine", "prefect.flow_engine", "prefect.task_engine", "prefect.runner", "prefect.deployments.steps",
    "prefect.utilities.visualization", "prefect._internal.observers", "anyio._backends._asyncio", "rich._emoji_codes",
    "fastapi.encoders",
    "flows.job", "flows.session", "flows.bridge", "flows.install", "flows.crash", "flows.reconcile", "flows.backlog",
)
"""Imported once by the warm engine: the flows of the process pool's deployments, and what else a run of
them imported when it started in a fresh engine process or later (Prefect imports `fastapi.encoders` to
serialize a child flow run's parameters: 0.17 s in each session run, which creates its jobs' runs)."""

STANDARD_STREAMS = (0, 1, 2)
LENGTH = struct.Struct("!I")
PEER_CREDENTIALS = struct.Struct("3i")
"""struct ucred: pid, uid, gid."""
MAX_REQUEST_BYTES = 16 * 1024 * 1024
CLIENT_GONE_CHECK_SECONDS = 1.0
REQUEST_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class RunRequest:
    """What a client hands over: the interpreter it would run, and the process it would have been."""

    executable: str
    working_folder: str
    environment: dict[str, str]

    def encode(self) -> bytes:
        payload = json.dumps({"executable": self.executable, "working_folder": self.working_folder,
                              "environment": self.environment}).encode()
        return LENGTH.pack(len(payload)) + payload



class PendingRequest:
    """A client's request as it arrives: read whenever the socket has data, so a slow or silent client holds up
    nobody (the warm engine serves every connection from one loop)."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.deadline = time.monotonic() + REQUEST_TIMEOUT_SECONDS
        self.data = b""
        self.streams: list[int] = []

    def read(self) -> RunRequest | None:
        """Take what has arrived; the request once it is whole. ValueError for a malformed or cut-off one."""
        descriptors = array.array("i")
        room = socket.CMSG_SPACE(len(STANDARD_STREAMS) * descriptors.itemsize)
        data, ancillary, _, _ = self.connection.recvmsg(65536, room)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                descriptors.frombytes(payload[: len(payload) - len(payload) % descriptors.itemsize])
        self.streams += list(descriptors)
        if not data:
            raise ValueError("the request ended early")
        self.data += data
        if len(self.data) < LENGTH.size:
            return None
        (length,) = LENGTH.unpack_from(self.data)
        if length > MAX_REQUEST_BYTES:
            raise ValueError("the request is too long")
        if len(self.data) < LENGTH.size + length:
            return None
        if len(self.streams) != len(STANDARD_STREAMS):
            raise ValueError("a request carries the three standard streams")
        try:
            fields = json.loads(self.data[LENGTH.size:LENGTH.size + length])
            return RunRequest(fields["executable"], fields["working_folder"], dict(fields["environment"]))
        except (KeyError, TypeError) as error:
            raise ValueError(f"the request lacks {error}") from error

    def give_up(self, reason: str) -> None:
        """Tell the client to start a fresh engine itself, and let go of what it handed over."""
        _refuse(self.connection, reason, self.streams)


def peer_user(connection: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket, as the kernel saw it connect (SO_PEERCRED)."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size)
    _, uid, _ = PEER_CREDENTIALS.unpack(credentials)
    return int(uid)


def run_flow_run() -> NoReturn:
    """The job command: run this process's flow run in the warm engine, or be `python -m prefect.engine`."""
    path = os.environ.get(SOCKET_VARIABLE, "")
    if not path:
        _become_a_fresh_engine(f"the worker has no {SOCKET_VARIABLE}")
    connection = connect_to_warm_engine(path)
    if connection is None:
        _become_a_fresh_engine(f"no warm engine answers at {path}")
    replies = connection.makefile("r")
    pid = _hand_over(connection, replies)
    if pid is None:
        _become_a_fresh_engine("the warm engine refused the run")
    for forwarded in (signal.SIGTERM, signal.SIGINT):
        signal.signal(forwarded, lambda signal_number, _frame: send_signal(pid, signal_number))
    _exit_as(_wait_for_exit(replies, pid))


def _become_a_fresh_engine(reason: str) -> NoReturn:
    """Become `python -m prefect.engine`, telling the run why (flows/runtime/fast_path.py)."""
    os.environ[FRESH_ENGINE_VARIABLE] = reason
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine"])


def connect_to_warm_engine(path: str) -> socket.socket | None:
    """A connection to the warm engine at `path`, when one of this user listens there: the request hands over
    the run's environment (its Prefect credentials) and standard streams."""
    if not path:
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
        if peer_user(connection) == os.getuid():
            return connection
    except OSError:
        pass
    connection.close()
    return None


def _hand_over(connection: socket.socket, replies: TextIO) -> int | None:
    """Send the request with this process's standard streams; the forked run's pid, or None if refused."""
    request = RunRequest(sys.executable, os.getcwd(), dict(os.environ)).encode()
    streams = array.array("i", STANDARD_STREAMS)
    try:
        sent = connection.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, streams.tobytes())])
        connection.sendall(request[sent:])
        answer = replies.readline().split()
    except OSError:
        return None
    if answer[:1] != ["started"]:
        return None
    return int(answer[1])


def _wait_for_exit(replies: TextIO, pid: int) -> int:
    """The run's exit code as the warm engine reports it (negative: killed by that signal)."""
    try:
        answer = replies.readline().split()
    except OSError:
        answer = []
    if answer[:1] == ["exited"]:
        return int(answer[1])
    while send_signal(pid, 0):  # the warm engine itself died: wait for the run it forked
        time.sleep(CLIENT_GONE_CHECK_SECONDS)
    return 1


def _exit_as(code: int) -> NoReturn:
    """Exit with `code`, or die of the signal that killed the run, as the run's own process would have."""
    if code < 0:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code if code >= 0 else 128 - code)


class SharedTlsContexts:
    """What Prefect's client module finds as `ssl`: a verifying TLS context is built once per CA file and
    shared by every client.

    Prefect builds one for each API client it creates, loading certifi's CA certificates (20-40 ms here),
    even when the API is plain http, and a flow run creates about eight clients. A context built without a
    CA file (Prefect's insecure mode) is changed after it is built, so it is still built anew each time.
    """

    def __getattr__(self, name: str) -> Any:
        import ssl

        return getattr(ssl, name)

    def create_default_context(self, *arguments: Any, **keywords: Any) -> ssl.SSLContext:
        import ssl

        if not arguments and set(keywords) == {"cafile"} and keywords["cafile"]:
            return _verifying_context(str(keywords["cafile"]))
        return ssl.create_default_context(*arguments, **keywords)


@functools.cache
def _verifying_context(ca_file: str) -> ssl.SSLContext:
    import ssl

    return ssl.create_default_context(cafile=ca_file)


def share_tls_contexts_between_prefect_clients() -> None:
    """Give Prefect's client module the shared contexts (in this process and the runs it forks)."""
    import prefect.client.orchestration as orchestration

    if not isinstance(orchestration.ssl, SharedTlsContexts):
        orchestration.ssl = SharedTlsContexts()  # type: ignore[assignment]


class WarmEngine:
    """Listens on one Unix socket, forks a flow-run process per request and reports how each exited."""

    def __init__(self, socket_path: Path) -> None:
        import selectors

        self.socket_path = socket_path
        self.runs: dict[int, socket.socket] = {}
        self.pending: dict[socket.socket, PendingRequest] = {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.wakeup_reader, self.wakeup_writer = os.pipe()
        self.selector = selectors.DefaultSelector()

    def serve_forever(self) -> None:
        """Serve until killed. A forked run leaves this method by raising SystemExit when it ends."""
        import selectors

        gc.disable()  # what is imported is kept for good: no collection should leave holes in its pages
        for module in PRELOADED_MODULES:
            __import__(module)
        share_tls_contexts_between_prefect_clients()
        gc.freeze()  # the runs' collections then skip the imported objects, and leave their pages shared
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        previous_mask = os.umask(0o177)  # the socket is born private: a chmod after bind would leave a window
        try:
            self.listener.bind(str(self.socket_path))
        finally:
            os.umask(previous_mask)
        self.listener.listen(64)
        os.set_blocking(self.wakeup_writer, False)
        signal.set_wakeup_fd(self.wakeup_writer)
        signal.signal(signal.SIGCHLD, lambda _signal_number, _frame: None)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wakeup_reader, selectors.EVENT_READ)
        while True:
            for key, _ in self.selector.select(timeout=REQUEST_TIMEOUT_SECONDS / 5):
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj == self.wakeup_reader:
                    os.read(self.wakeup_reader, 4096)
                    self._reap()
                else:
                    self._read(self.pending[key.fileobj])  # type: ignore[index]
            self._drop_late_requests()

    def _accept(self) -> None:
        """Take a connection of this user's (another user's would hand over its own identity to run as ours),
        and read its request as it arrives."""
        import selectors

        connection, _ = self.listener.accept()
        if peer_user(connection) != os.getuid():
            _refuse(connection, "another-user", [])
            return
        connection.setblocking(False)
        self.pending[connection] = PendingRequest(connection)
        self.selector.register(connection, selectors.EVENT_READ)

    def _read(self, pending: PendingRequest) -> None:
        try:
            request = pending.read()
        except (OSError, ValueError) as error:
            self._forget(pending).give_up(type(error).__name__)
            return
        if request is None:
            return
        self._forget(pending)
        if request.executable != sys.executable:
            pending.give_up("another-interpreter")
            return
        self._start(pending.connection, request, pending.streams)

    def _forget(self, pending: PendingRequest) -> PendingRequest:
        self.selector.unregister(pending.connection)
        del self.pending[pending.connection]
        return pending

    def _drop_late_requests(self) -> None:
        now = time.monotonic()
        for pending in [pending for pending in self.pending.values() if pending.deadline < now]:
            self._forget(pending).give_up("timeout")

    def _start(self, connection: socket.socket, request: RunRequest, streams: list[int]) -> None:
        connection.setblocking(True)
        pid = os.fork()
        if pid == 0:
            self._become_the_run(connection, request, streams)
        for stream in streams:
            os.close(stream)
        self.runs[pid] = connection
        _answer(connection, f"started {pid}")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            connection = self.runs.pop(pid, None)
            if connection is not None:
                _answer(connection, f"exited {os.waitstatus_to_exitcode(status)}")
                connection.close()

    def _become_the_run(self, connection: socket.socket, request: RunRequest, streams: list[int]) -> NoReturn:
        """In the forked child: drop the server's resources, take the client's process identity, run."""
        gc.enable()
        signal.set_wakeup_fd(-1)
        self.selector.close()
        for resource in (self.listener, *self.runs.values(), *self.pending):
            resource.close()
        for pending in self.pending.values():
            for stream in pending.streams:
                os.close(stream)
        os.close(self.wakeup_reader)
        os.close(self.wakeup_writer)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, stream in zip(STANDARD_STREAMS, streams, strict=True):
            os.dup2(stream, target)
            os.close(stream)
        os.chdir(request.working_folder)
        logging_configured = _logging_variables(os.environ)
        os.environ.clear()
        os.environ.update(request.environment)
        threading.Thread(target=_die_with_the_client, args=(connection,), daemon=True).start()
        _run_the_engine(configure_logging=_logging_variables(os.environ) != logging_configured)


def _refuse(connection: socket.socket, reason: str, streams: list[int]) -> None:
    """Tell the client to start a fresh engine itself, and let go of what it handed over."""
    _answer(connection, f"refused {reason}")
    connection.close()
    for stream in streams:
        os.close(stream)


def _answer(connection: socket.socket, line: str) -> None:
    with contextlib.suppress(OSError):  # a client that is gone needs no answer
        connection.sendall(f"{line}\n".encode())


def _die_with_the_client(connection: socket.socket) -> None:
    """The client sends nothing after its request, so the end of the stream means it is gone."""
    with contextlib.suppress(OSError):
        while connection.recv(1):
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def _logging_variables(environment: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in environment.items() if name.startswith("PREFECT_LOGGING_")}


def _run_the_engine(configure_logging: bool) -> NoReturn:
    """Run `python -m prefect.engine` in this process, with Prefect's settings read from the new environment
    (and its logging configured again where the run's logging settings differ from the warm engine's)."""
    import random
    import runpy

    from prefect.context import refresh_global_settings_context
    from prefect.logging.configuration import setup_logging

    random.seed()  # a fork copies the random state; retry jitter should differ between runs
    refresh_global_settings_context()
    if configure_logging:
        setup_logging()
    sys.argv = ["prefect.engine"]
    runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
    sys.exit(0)


def main(arguments: list[str]) -> None:
    if arguments[:1] == ["serve"] and len(arguments) == 2:
        WarmEngine(Path(arguments[1])).serve_forever()
    elif not arguments:
        run_flow_run()
    else:
        sys.exit("usage: python -m ops.warm_engine [serve SOCKET_PATH]")


if __name__ == "__main__":
    main(sys.argv[1:])
