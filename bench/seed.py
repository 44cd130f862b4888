"""The seed's runtime, as the baseline of the stock row: dcm-processor-worker under one mongo-qas worker.

This is what dcm-processor 2.0.1 starts on a host: one `python-mqas worker <device id>` with the flags its
WorkerWrapper passes, which claims one job at a time from the platform's jobs collection (the job's `channel`
must be the host's device id), runs its callback in a thread of its own process, records the outcome, and sleeps
its heartbeat (whole seconds, 1 by default) between claims. The packages come from the machine's configured
package index, into a virtual environment of their own kept in the runtime's home (built once).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from bson import ObjectId

from blocks.database import DcmDatabase
from blocks.host import home_folder

SEED_PACKAGES = ["dcm-processor-worker==0.0.1", "mongo-qas==0.5.0", "dcm-processor-service==0.0.1"]
"""The seed's runtime; pre- and post-services import the service helpers from its Python."""
SEED_DEVICE = "seed-baseline"
"""The device id the seed's sessions are scheduled for: their jobs' channel, which the worker watches."""
WORKER_FLAGS = ["--heartbeat=1", "--logger=dcm_processor_worker.logger", "--verbosity=errorcompletedprogress",
                "--no-sub-process"]
"""dcm-processor 2.0.1's WorkerWrapper's flags: jobs run in threads of the worker's own process."""
WORKER_READY = "Started worker to monitor channels"


def seed_environment(folder: Path | None = None) -> Path:
    """The seed's virtual environment (built on first use); return its `python-mqas`."""
    folder = folder or home_folder() / "seed-runtime"
    program = folder / "bin" / "python-mqas"
    wanted = "\n".join(SEED_PACKAGES)
    if program.exists() and (folder / "packages.txt").exists() and (folder / "packages.txt").read_text() == wanted:
        return program
    subprocess.run([sys.executable, "-m", "uv", "venv", "--quiet", "--python", sys.executable, str(folder)], check=True)
    subprocess.run([sys.executable, "-m", "uv", "pip", "install", "--quiet", "--python", str(folder / "bin" / "python"),
                    *SEED_PACKAGES], check=True)
    (folder / "packages.txt").write_text(wanted)
    return program


def _seconds(moment: datetime) -> float:
    """A record's time as seconds since the epoch (pymongo reads naive UTC datetimes)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


class SeedWorker:
    """One running mongo-qas worker of the seed's runtime, on one platform database."""

    def __init__(self, database: DcmDatabase, log: Path) -> None:
        self.database = database
        self.log = log

    def session_seconds(self, session_id: str, since: float, timeout_seconds: float = 600) -> float:
        """Wait for every job of the session to be done; return the seconds from `since` to the last one's
        completion, as recorded. A job that fails, or a callback whose error the seed stored as its result
        (it still marks such a job done), is an error."""
        jobs = self.database.open().db.get_db()["jobs"]
        of_session = {"sessionId": {"$in": [session_id, ObjectId(session_id)]}}
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            documents = list(jobs.find(of_session, ["done", "error", "result", "completedAt"]))
            failed = [document["_id"] for document in documents if document.get("error")
                      or (isinstance(document.get("result"), dict) and "error" in document["result"])]
            if failed:
                raise RuntimeError(f"the seed's runtime failed jobs {failed}: see {self.log}")
            if documents and all(document.get("done") for document in documents):
                return max(_seconds(document["completedAt"]) for document in documents) - since
            time.sleep(0.2)
        raise TimeoutError(f"the seed's runtime did not finish session {session_id} in {timeout_seconds} s")


@contextmanager
def seed_worker(program: Path, database: DcmDatabase, folder: Path) -> Iterator[SeedWorker]:
    """A mongo-qas worker of the seed's runtime on `database`'s jobs, started and ready to claim, stopped
    afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "seed-worker.log"
    command = [str(program), "worker", SEED_DEVICE, f"--conn={database.url.get_secret_value()}",
               f"--dbname={database.database_name}", "--colname=jobs", *WORKER_FLAGS]
    with log.open("w") as output:
        worker = subprocess.Popen(command, cwd=folder, stdout=output, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while WORKER_READY not in log.read_text():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the seed's worker did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield SeedWorker(database, log)
    finally:
        worker.terminate()
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
