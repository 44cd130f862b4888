"""Runs one callback in the worker's interpreter; copied next to `invocation.json` in the job folder.

It needs nothing but the standard library (and uses bson, or dcm_processor_db_provider, when the
environment has them, to restore ObjectIds and datetimes exactly as the platform encodes them). It must stay
compatible with every Python a worker may use, so it avoids newer syntax.
"""

import contextlib
import importlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback

FOLDER = os.path.dirname(os.path.abspath(__file__))
RESULT_NAME = "result.json"
PARENT_CHECK_SECONDS = 0.5
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
PARENT_DEATH_SIGNAL = getattr(signal, "SIGRTMIN", None)
"""A signal nothing else sends the callback: SIGTERM is the run's own request to stop, with a grace period."""
FINISHING = threading.RLock()
"""Held while the outcome is written: the run's death, noticed by the signal's handler or by the thread that
watches the parent, waits for the file, and the handler may interrupt the writing in the same thread."""
RETURNED = []
"""What the callback returned, once it has."""


def become_subreaper():
    """Adopt every orphaned descendant (a daemon that double-forks, a process that calls setsid), so that the
    whole tree the callback starts stays below this process, where `descendants` finds it (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def descendants(pid):
    """Every process below `pid` by parent links in /proc, whatever session or group it moved to (none where
    there is no /proc)."""
    children = {}
    try:
        names = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    for name in names:
        try:
            with open("/proc/" + name + "/stat") as stream:
                parent = int(stream.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(name))
    found, waiting = [], [pid]
    while waiting:
        for child in children.get(waiting.pop(), []):
            found.append(child)
            waiting.append(child)
    return found


def kill_descendants():
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def apply_limits(limits):
    """The worker's resource limits (`resource` names such as RLIMIT_AS), set before the callback is imported."""
    if not limits:
        return
    import resource

    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def die_with_parent(parent, workspace):
    """Have the kernel signal this process the moment the flow run's process that started it dies (Linux), and
    end then: a callback that went on would finish side effects that the job's retry repeats. The thread that
    watches the parent stays as the fallback (a callback busy in C code holds the signal's handler off).

    `parent` is the pid the run's process wrote into the invocation, not this process's parent as found now:
    a run's process killed while this interpreter started has already handed it to a reaper by then."""
    if PARENT_DEATH_SIGNAL is not None:
        signal.signal(PARENT_DEATH_SIGNAL, lambda *_: end_now(workspace))
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        end_now(workspace)


def end_with_parent(parent, workspace):
    """Wait for the flow run's process that started this one to be gone, then end."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    end_now(workspace)


def end_now(workspace):
    """Kill this process group (the callback and whatever it started) and remove the job's temporary folder:
    the run that started the callback is gone, and nothing else is left to clean up. A callback that has
    returned has run to its end: what it returned is written and the folder stays, for the job's next run to
    record instead of calling it again."""
    with FINISHING:
        for pid in others_in_process_group():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        kill_descendants()
        if RETURNED:
            write_outcome(outcome_of_value(RETURNED[0]))
        elif workspace and not os.path.exists(os.path.join(FOLDER, RESULT_NAME)):
            shutil.rmtree(workspace, ignore_errors=True)
        os.killpg(os.getpgrp(), signal.SIGKILL)


def others_in_process_group():
    """The other processes of this process group (Linux: from /proc; elsewhere none are known, and the
    group is killed as a whole after the folder is removed)."""
    group, found = os.getpgrp(), []
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            if pid != os.getpid() and os.getpgid(pid) == group:
                found.append(pid)
        except OSError:
            pass
    return found


def decoder(provider):
    """The platform's JSON decoding for `provider`, which restores ObjectIds and datetimes. For MongoDB
    that is bson's json_util, imported alone: dcm_processor_db_provider itself imports pydicom and
    numpy, which would cost every callback more than a second."""
    if provider == "mongodb":
        try:
            from bson import json_util
        except ImportError:
            pass
        else:
            return json_util.loads
    try:
        from dcm_processor_db_provider import DBManager
    except ImportError:
        return json.loads
    return lambda text: DBManager.from_json(text, provider)


def call(invocation):
    apply_limits(invocation.get("limits"))
    for folder in reversed(invocation["search_path"]):
        sys.path.insert(0, folder)
    decode = decoder(invocation["provider"])
    args = decode(invocation["args"])
    kwargs = decode(invocation["kwargs"])
    module = importlib.import_module(invocation["module"])
    function = getattr(module, invocation["function"])
    return function(*args, **kwargs)


def outcome_of(invocation):
    try:
        value = call(invocation)
    except BaseException as error:
        traceback.print_exc()
        message = f"{type(error).__name__}: {error}"
        return {"error": {"message": message, "traceback": traceback.format_exc()}}
    RETURNED.append(value)
    return outcome_of_value(value)


def outcome_of_value(value):
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        message = f"callback returned a {type(value).__name__}, which is not JSON: {error}"
        return {"error": {"message": message, "traceback": ""}}
    return {"result": value}


def write_outcome(outcome):
    partial = os.path.join(FOLDER, RESULT_NAME + ".partial")
    with open(partial, "w") as stream:
        json.dump(outcome, stream)
    os.replace(partial, os.path.join(FOLDER, RESULT_NAME))


def main():
    become_subreaper()
    with open(os.path.join(FOLDER, "invocation.json")) as stream:
        invocation = json.load(stream)
    parent, workspace = invocation.get("parent") or os.getppid(), invocation.get("workspace")
    die_with_parent(parent, workspace)
    threading.Thread(target=end_with_parent, args=(parent, workspace), daemon=True).start()
    outcome = outcome_of(invocation)
    with FINISHING:
        write_outcome(outcome)
    kill_descendants()


if __name__ == "__main__":
    main()
