"""Child processes for callbacks: live line streaming, a timeout, and killing the whole process tree.

The child is started in a session of its own so that the timeout (or a cancelled flow run, which
raises in the flow's main thread) can signal every process the callback started, not only the one
this runtime started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flows.runtime.callback_wrapper import descendants

LineHandler = Callable[[str, str], None]
"""Called with the stream name ("stdout" or "stderr") and one line, as soon as the line is written."""

StopCheck = Callable[[], bool]
"""Asked every few seconds while the child runs; True means "stop it now" (e.g. the run was cancelled)."""

STOP_CHECK_SECONDS = 2.0
GRACE_SECONDS = 3.0
READER_JOIN_SECONDS = 5.0


@dataclass(frozen=True)
class ChildExit:
    """How a child process ended."""

    returncode: int
    timed_out_after: float | None = None
    stopped: bool = False

    @property
    def signal_name(self) -> str | None:
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"


def _stream_lines(stream: IO[bytes], name: str, on_line: LineHandler) -> None:
    with stream:
        for raw in iter(stream.readline, b""):
            on_line(name, raw.decode("utf-8", errors="replace").rstrip("\r\n"))


def send_signal(pid: int, signal_number: int, *, group: bool = False) -> bool:
    """Send a signal to a process, or with `group` to its process group; False when it is gone (or is no
    longer ours: its pid was reused by another user's process). Signal 0 only asks whether it is there."""
    try:
        (os.killpg if group else os.kill)(pid, signal_number)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def folder_of_this_process(prefix: str) -> Path:
    """A new private temporary folder named `<prefix><pid>-<random>`: the pid says whose it is, so that
    `remove_abandoned_folders` can tell one whose process was killed before it could remove it."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def abandoned_folders(prefix: str) -> list[Path]:
    """This user's temporary folders named by `folder_of_this_process(prefix + ...)` whose process is gone (a
    run killed while it prepared or ran a job, a pool worker killed mid-run) and in which no process works any
    more (a callback ends with its run's process, but not in the same instant), newest first. A folder another
    user made under such a name is not one of ours."""
    found = []
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        owner = folder.name.rsplit("-", 2)[-2] if folder.name.count("-") >= 2 else ""
        try:
            status = folder.lstat()
        except OSError:
            continue
        ours = stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid()
        if ours and owner.isdigit() and not _exists(int(owner)):
            found.append((status.st_mtime, folder))
    if found:
        working = _working_folders()
        found = [(moment, folder) for moment, folder in found if not _works_in(working, folder)]
    return [folder for _, folder in sorted(found, reverse=True)]


def _working_folders() -> set[str]:
    """The working folder of every process this user may look into."""
    working = set()
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            working.add(os.readlink(entry / "cwd"))
    return working


def _works_in(working: set[str], folder: Path) -> bool:
    inside = str(folder.resolve())
    return any(path == inside or path.startswith(f"{inside}/") for path in working)


def is_private(folder: Path) -> bool:
    """Whether only this user can have written into `folder` (what `folder_of_this_process` makes)."""
    try:
        status = folder.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid() and not status.st_mode & 0o077


def remove_abandoned_folders(prefix: str, keep: Callable[[Path], bool] | None = None) -> None:
    """Remove this host's `abandoned_folders(prefix)`, but those `keep` says still serve."""
    for folder in abandoned_folders(prefix):
        if keep is None or not keep(folder):
            shutil.rmtree(folder, ignore_errors=True)


def _exists(pid: int) -> bool:
    """Whether any process (this user's or another's) has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_escaped(pid: int) -> set[int]:
    """Stop (SIGSTOP) every process below `pid` that left its process group (setsid, a daemon's double fork),
    until no new one appears: a stopped process cannot start another, and is killed by pid after the group."""
    stopped: set[int] = set()
    while True:
        escaped = {child for child in descendants(pid) if _group_of(child) not in (pid, None)} - stopped
        if not escaped:
            return stopped
        for child in escaped:
            send_signal(child, signal.SIGSTOP)
        stopped |= escaped


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def kill_process_tree(process: subprocess.Popen[bytes], grace_seconds: float = GRACE_SECONDS) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is still alive after the grace period; the
    processes that left the group are found below the child (the callback wrapper adopts orphans) and killed."""
    # A child that has exited has nothing below it any more (its orphans went to its own subreaper or init, and
    # the callback wrapper kills them before it exits): the /proc walk is only for a child still running.
    escaped = _stop_escaped(process.pid) if process.poll() is None else set()
    try:
        if not send_signal(process.pid, signal.SIGTERM, group=True):
            process.wait()
            return
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            if process.poll() is not None and not send_signal(process.pid, 0, group=True):
                return
            time.sleep(0.05)
        send_signal(process.pid, signal.SIGKILL, group=True)
        process.wait()
    finally:
        for child in escaped:
            send_signal(child, signal.SIGKILL)


def run_child(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    timeout_seconds: float | None,
    on_line: LineHandler,
    should_stop: StopCheck | None = None,
) -> ChildExit:
    """Run `command`, hand each output line to `on_line`, enforce the timeout, never leave it running."""
    process = subprocess.Popen(
        list(command), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    readers = [
        threading.Thread(target=_stream_lines, args=(stream, name, on_line), daemon=True)
        for stream, name in ((process.stdout, "stdout"), (process.stderr, "stderr"))
    ]
    for reader in readers:
        reader.start()
    timed_out_after = None
    stopped = False
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    try:
        while process.poll() is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                timed_out_after = timeout_seconds
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_CHECK_SECONDS if remaining is None else min(remaining, STOP_CHECK_SECONDS))
            # Asked only once the callback has run a while: most end before that, and each check is an API call.
            if process.poll() is None and should_stop is not None and should_stop():
                stopped = True
                break
    finally:
        # Also reached when the flow run is cancelled: Prefect raises in this thread.
        kill_process_tree(process)
        for reader in readers:
            reader.join(READER_JOIN_SECONDS)
    return ChildExit(returncode=process.returncode, timed_out_after=timed_out_after, stopped=stopped)
