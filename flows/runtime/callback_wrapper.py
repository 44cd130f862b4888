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
PARENT_CHECK_SECONDS = 0.5


def end_with_parent(parent, workspace):
    """Once the flow run's process that started this one is gone, kill this process group (the callback
    and whatever it started) and remove the job's temporary folder: a crashed or killed run must not
    leave its callback running, nor its files behind, and nothing else is left to clean up."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    for pid in others_in_process_group():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if workspace:
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
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        message = f"callback returned a {type(value).__name__}, which is not JSON: {error}"
        return {"error": {"message": message, "traceback": ""}}
    return {"result": value}


def main():
    parent = os.getppid()
    with open(os.path.join(FOLDER, "invocation.json")) as stream:
        invocation = json.load(stream)
    threading.Thread(target=end_with_parent, args=(parent, invocation.get("workspace")), daemon=True).start()
    outcome = outcome_of(invocation)
    partial = os.path.join(FOLDER, "result.json.partial")
    with open(partial, "w") as stream:
        json.dump(outcome, stream)
    os.replace(partial, os.path.join(FOLDER, "result.json"))


if __name__ == "__main__":
    main()
