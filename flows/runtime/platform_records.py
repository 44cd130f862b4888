"""The platform database as this runtime reads and writes it: the only code that names collections and fields.

Everything goes through the unmodified `DBManager`. The writes are the ones the platform expects: a job is
claimed with the condition mongo-qas uses (so the two never run the same job) and its outcome is written
with mongo-qas' fields. Connection errors become `DatabaseUnavailable`, which the tasks retry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, ParamSpec, TypeVar

from bson.errors import InvalidId
from dcm_processor_db_provider import DBManager
from gridfs.errors import NoFile
from pymongo.errors import ConnectionFailure

from flows.runtime.errors import AlreadyClaimed, ClaimLost, DatabaseUnavailable, InvalidRecord, JobNotFound
from flows.runtime.records import (
    LABELS,
    POST_SERVICES_JOB,
    Backlog,
    JobProgress,
    JobRecord,
    ServiceRecord,
    WorkerRecord,
    moment_of,
)

JOBS = "jobs"
SERVICES = "services"
SESSIONS = "sessions"
WORKERS = "workers"
SESSION_HOLDER = "sessionFlowRunId"
"""The field of a session's oldest job that names the flow run holding the session."""
LAST_RUN = "lastFlowRunId"
"""The flow run that claimed the job last: kept after the outcome (unlike `flowRunId`, the fencing token), so
that the operator's views can link a finished job to its run."""
PATIENT_WORK_FIELDS = {
    "patient_id": "data.kwargs.headers.Metadata.PatientID",
    "accession": "data.kwargs.headers.Metadata.AccessionNumber",
    "study_uid": "data.kwargs.headers.StudyInstanceUID",
}
"""Where a job record keeps what an operator searches a patient's work by (the listener's header documents)."""
PROGRESS_FIELDS = ["_id", "sessionId", "data.function_name", "service_name", "job_name", "channel", "done",
                   "inProgress", "error", "errorMessage", "createdAt", "startedAt", "completedAt", "lastErrorAt",
                   "flowRunId", LAST_RUN, "sessionFlowRunId"]
"""What the operator's views read of a job: never `data.kwargs` (patient data) beyond the fields searched."""
OPERATOR_INDEXES = (
    ("sessionId",), ("inProgress",), ("done", "error"), ("error", "lastErrorAt"),
    *((field,) for field in PATIENT_WORK_FIELDS.values()),
)
"""The indexes that keep a session's jobs, the backlog and `dcm-flows find` fast on a jobs collection of
100,000 records and more (without them each is a scan of the whole collection)."""
PLATFORM_CONSUMER = "default-customer-id"
"""The `consumer_id` DBManager.create_job gives every job; mongo-qas workers claim only jobs that have it."""

Parameters = ParamSpec("Parameters")
Returned = TypeVar("Returned")


def database_call(function: Callable[Parameters, Returned]) -> Callable[Parameters, Returned]:
    """Turn the driver's connection errors into DatabaseUnavailable, which the tasks retry."""

    @functools.wraps(function)
    def call(*args: Parameters.args, **kwargs: Parameters.kwargs) -> Returned:
        try:
            return function(*args, **kwargs)
        except ConnectionFailure as error:
            raise DatabaseUnavailable(f"platform database unavailable: {type(error).__name__}") from error

    return call


def _now() -> datetime:
    return datetime.now(timezone.utc)


RELEASED = {"$unset": {"flowRunId": ""}}
"""Part of every outcome write: a job no run holds names none, so that a later claim by a mongo-qas worker
(which sets no `flowRunId`) is not taken for a claim of the run that wrote the outcome."""


def _failure(message: str, failed_attempts: int = 1) -> dict[str, Any]:
    """The update that fails a job, as mongo-qas writes it: one `attempts` increment per failed attempt
    (none for a job skipped without running)."""
    update: dict[str, Any] = {
        "$set": {"error": True, "inProgress": False, "errorMessage": message, "lastErrorAt": _now()}, **RELEASED,
    }
    if failed_attempts:
        update["$inc"] = {"attempts": failed_attempts}
    return update


class PlatformRecords:
    """Reads and writes the platform's records through the unmodified DBManager."""

    def __init__(self, database: DBManager) -> None:
        self.database = database

    @database_call
    def _get(self, collection: str, record_id: str, what: str) -> dict[str, Any]:
        try:
            document = self.database.db.get(collection, record_id)
        except (InvalidId, TypeError) as error:
            raise JobNotFound(f"'{record_id}' is not a valid {what} id") from error
        if document is None:
            raise JobNotFound(f"no {what} with id {record_id}")
        return document

    def job(self, job_id: str) -> JobRecord:
        return JobRecord.from_document(self._get(JOBS, job_id, "job"))

    def service(self, service_id: str) -> ServiceRecord:
        try:
            return ServiceRecord.from_document(self._get(SERVICES, service_id, "service"))
        except JobNotFound as error:
            raise InvalidRecord(f"the job's service is not installed: {error}") from error

    def worker(self, worker_id: str) -> WorkerRecord:
        try:
            return WorkerRecord.from_document(self._get(WORKERS, worker_id, "worker"))
        except JobNotFound as error:
            raise InvalidRecord(f"the job's worker is not installed: {error}") from error

    @database_call
    def unfinished_dependencies(self, job: JobRecord) -> list[str]:
        """Ids in `depends_on` whose job is not done; a job is ready only when this is empty.

        The post-services job cleans up the session's patient data, so for it a dependency that
        failed (or was skipped) counts as finished too: the clean-up must not wait forever.
        """
        if not job.depends_on:
            return []
        finished: dict[str, Any] = {"done": True}
        if job.function_name == POST_SERVICES_JOB:
            finished = {"$or": [{"done": True}, {"error": True}]}
        done = self.database.db.find(
            JOBS,
            {"query": {"_id": {"$in": self.database.make_oid(job.depends_on)}, **finished}, "select": ["_id"]},
        )
        finished = {str(document["_id"]) for document in done}
        return [dependency for dependency in job.depends_on if dependency not in finished]

    @database_call
    def claim(self, job_id: str, flow_run_id: str) -> None:
        """Mark the job in progress for this flow run, atomically.

        The query matches what a mongo-qas worker claims (not in progress, not done), so the two
        never run the same job; the same flow run may claim again when Prefect retries it.
        """
        claimed = self.database.db.find_one_and_update(
            JOBS,
            {"$set": {"inProgress": True, "startedAt": _now(), "flowRunId": flow_run_id, LAST_RUN: flow_run_id}},
            {"query": {
                "_id": self.database.make_oid(job_id),
                "done": {"$ne": True},
                "$or": [{"inProgress": {"$ne": True}}, {"flowRunId": flow_run_id}],
            }},
        )
        if claimed is not None:
            return
        current = self.job(job_id)
        if current.done:
            raise AlreadyClaimed(f"job {job_id} is already done; nothing was run")
        raise AlreadyClaimed(f"job {job_id} is already in progress in another run; nothing was run")

    @database_call
    def claim_session(self, session_id: str, flow_run_id: str, run_has_ended: Callable[[str], bool]) -> None:
        """Make this flow run the one that runs the session, atomically, or raise AlreadyClaimed.

        The session's oldest job keeps the id of the run that holds the session (`sessionFlowRunId`;
        jobs outlive the session document, which post-services deletes). A holder whose run has ended
        (`run_has_ended`) is replaced by a compare-and-swap, so a retried or resubmitted session runs
        again, but two live runs never run the same session, and a session whose jobs are all done is
        not taken over by another run.
        """
        jobs = self.database.db
        anchor = jobs.find_one(JOBS, {"query": self._of_session(session_id), "select": ["_id", SESSION_HOLDER],
                                      "sort": [("_id", 1)]})
        if anchor is None:
            raise InvalidRecord(f"session {session_id} has no jobs")
        free = {"_id": anchor["_id"], "$or": [
            {SESSION_HOLDER: {"$exists": False}}, {SESSION_HOLDER: None}, {SESSION_HOLDER: flow_run_id},
        ]}
        if jobs.find_one_and_update(JOBS, {"$set": {SESSION_HOLDER: flow_run_id}}, {"query": free}) is not None:
            return
        holder = str(jobs.find_one(JOBS, {"query": {"_id": anchor["_id"]}, "select": [SESSION_HOLDER]})[SESSION_HOLDER])
        if run_has_ended(holder):
            if jobs.count(JOBS, {"query": {**self._of_session(session_id), "done": {"$ne": True}}}) == 0:
                raise AlreadyClaimed(f"session {session_id} is already done: flow run {holder} ran it")
            swapped = jobs.find_one_and_update(
                JOBS, {"$set": {SESSION_HOLDER: flow_run_id}}, {"query": {"_id": anchor["_id"], SESSION_HOLDER: holder}}
            )
            if swapped is not None:
                return
        raise AlreadyClaimed(f"session {session_id} is already being run by flow run {holder}")

    @database_call
    def mark_succeeded(self, job_id: str, flow_run_id: str, result: Any) -> None:
        """Completion exactly as mongo-qas writes it (plus `error: False` after an earlier failure), written only
        while `flow_run_id` holds the job (ClaimLost otherwise)."""
        self._write_as_holder(job_id, flow_run_id, {"$set": {
            "done": True, "inProgress": False, "error": False, "result": result,
            "completedAt": _now(), "progress": 100,
        }, **RELEASED})

    @database_call
    def mark_failed(self, job_id: str, flow_run_id: str, message: str, failed_attempts: int = 1) -> None:
        """Failure exactly as mongo-qas writes it: one `attempts` increment per failed attempt; written only
        while `flow_run_id` holds the job (ClaimLost otherwise)."""
        self._write_as_holder(job_id, flow_run_id, _failure(message, failed_attempts))

    def _write_as_holder(self, job_id: str, flow_run_id: str, update: dict[str, Any]) -> None:
        """Apply an outcome only if the record is still in progress for `flow_run_id`, the run's fencing token:
        a run that was taken for dead (its job failed by crash repair, then claimed by another run) must not
        overwrite the outcome of the run that holds the job now."""
        written = self.database.db.find_one_and_update(JOBS, update, {"query": {
            "_id": self.database.make_oid(job_id), "inProgress": True, "flowRunId": flow_run_id,
        }})
        if written is not None:
            return
        current = self.database.db.get(JOBS, job_id) or {}
        holder = current.get("flowRunId") if current.get("inProgress") else None
        raise ClaimLost(
            f"job {job_id} is no longer held by flow run {flow_run_id} "
            + (f"but by flow run {holder}" if holder else "(crash repair recorded it)")
            + "; this run's outcome was not written"
        )

    def _of_session(self, session_id: str) -> dict[str, Any]:
        """The jobs of a session, whose `sessionId` the platform stores as ObjectId or as its hex string."""
        return {"sessionId": {"$in": [session_id, self.database.make_oid(session_id)]}}

    @database_call
    def session_jobs(self, session_id: str) -> list[JobRecord]:
        """Every job of a session, oldest first (the order the scheduler created them in)."""
        documents = self.database.db.find(
            JOBS,
            {"query": self._of_session(session_id), "sort": [("createdAt", 1)]},
        )
        return [JobRecord.from_document(document) for document in documents]

    @database_call
    def jobs_in_progress(self, session_id: str, besides: str) -> list[str]:
        """The ids of the session's jobs in progress in any run (this runtime's or a mongo-qas worker's), but one."""
        documents = self.database.db.find(JOBS, {"query": {
            **self._of_session(session_id), "inProgress": True, "_id": {"$ne": self.database.make_oid(besides)},
        }, "select": ["_id"]})
        return [str(document["_id"]) for document in documents]

    @database_call
    def jobs_held_by_runs(self) -> list[tuple[str, str, str | None]]:
        """(job id, id of the flow run holding it, session id) of every job in progress in a run of this runtime
        (jobs a mongo-qas worker holds have no flow run and are left to it)."""
        documents = self.database.db.find(JOBS, {"query": {"inProgress": True, "flowRunId": {"$exists": True}},
                                                 "select": ["_id", "flowRunId", "sessionId"]})
        return [(str(document["_id"]), str(document["flowRunId"]),
                 str(document["sessionId"]) if document.get("sessionId") else None) for document in documents]

    @database_call
    def session_holder(self, session_id: str) -> str | None:
        """The id of the flow run that holds the session (see claim_session), if any."""
        anchor = self.database.db.find_one(JOBS, {"query": self._of_session(session_id),
                                                  "select": [SESSION_HOLDER], "sort": [("_id", 1)]})
        return str(anchor[SESSION_HOLDER]) if anchor and anchor.get(SESSION_HOLDER) else None

    @database_call
    def sessions_matching(self, field: str, value: str) -> list[str]:
        """The ids of the sessions with a job whose `field` (a key of PATIENT_WORK_FIELDS, or `session_id`)
        is `value`, newest first."""
        query = self._of_session(value) if field == "session_id" else {PATIENT_WORK_FIELDS[field]: value}
        documents = self.database.db.find(JOBS, {"query": query, "select": ["sessionId"]})
        sessions = {str(document["sessionId"]) for document in documents if document.get("sessionId") is not None}
        return sorted(sessions, reverse=True)

    @database_call
    def progress_of_session(self, session_id: str) -> list[JobProgress]:
        """Where each job of a session stands, oldest first."""
        documents = self.database.db.find(JOBS, {"query": self._of_session(session_id), "select": PROGRESS_FIELDS,
                                                 "sort": [("createdAt", 1), ("_id", 1)]})
        return [JobProgress.from_document(document) for document in documents]

    @database_call
    def backlog(self, failed_since: datetime) -> Backlog:
        """The Backlog, counted by the database server with equality matches that OPERATOR_INDEXES serve, so it
        stays fast on a jobs collection of any size. Fields are matched as DBManager.create_job writes them."""
        jobs = self.database.db.get_db()[JOBS]
        left = {"done": False, "error": False}
        sessions = {row["_id"]: row["n"] for row in jobs.aggregate([
            {"$match": left},
            {"$group": {"_id": "$sessionId", "running": {"$max": {"$cond": ["$inProgress", 1, 0]}}}},
            {"$group": {"_id": "$running", "n": {"$sum": 1}}},
        ])}
        running = {str(row["_id"] or "(no host)"): row["n"] for row in jobs.aggregate([
            {"$match": {"inProgress": True}}, {"$group": {"_id": "$channel", "n": {"$sum": 1}}},
        ])}
        failed = {
            str(row["_id"].get("service") or LABELS.get(row["_id"].get("function"), "?")): row["n"]
            for row in jobs.aggregate([
                {"$match": {"error": True, "lastErrorAt": {"$gte": failed_since}}},
                {"$group": {"_id": {"service": "$service_name", "function": "$data.function_name"}, "n": {"$sum": 1}}},
            ])
        }
        oldest = list(jobs.aggregate([
            {"$match": {**left, "inProgress": False}}, {"$group": {"_id": None, "oldest": {"$min": "$createdAt"}}},
        ]))
        return Backlog(
            sessions_running=sessions.get(1, 0), sessions_waiting=sessions.get(0, 0),
            running_by_queue=running, failed_by_service=failed,
            oldest_waiting_since=moment_of(oldest[0]["oldest"]) if oldest else None,
        )

    @database_call
    def ensure_indexes(self) -> None:
        """Create OPERATOR_INDEXES on the jobs collection (an existing index is left as it is)."""
        jobs = self.database.db.get_db()[JOBS]
        for fields in OPERATOR_INDEXES:
            jobs.create_index([(name, 1) for name in fields])

    @database_call
    def latest_session_of_patient(self, patient_id: Any) -> str | None:
        """The id of the newest session the scheduler created for a patient document id."""
        session = self.database.db.find_one(
            SESSIONS, {"query": {"patient_id": patient_id}, "select": ["_id"], "sort": [("_id", -1)]}
        )
        return None if session is None else str(session["_id"])

    @database_call
    def upload_component_file(self, content: bytes, filename: str, metadata: dict[str, Any]) -> str:
        return str(self.database.upload_component_file(
            file=content, metadata=metadata, params={"filename": filename, "content_type": "application/zip"}
        ))

    @database_call
    def remove_component_file(self, file_id: str) -> None:
        self.database.remove_component_file(file_id)

    @database_call
    def find_service(self, name: str) -> ServiceRecord | None:
        document = self.database.get_service(name)
        return None if document is None else ServiceRecord.from_document(document)

    @database_call
    def find_worker(self, name: str) -> WorkerRecord | None:
        document = self.database.get_worker(name)
        return None if document is None else WorkerRecord.from_document(document)

    @database_call
    def docker_images(self) -> list[str]:
        """The image of every installed docker worker."""
        documents = self.database.db.find(WORKERS, {"query": {"type": "docker"}, "select": ["image"]})
        return sorted({str(document["image"]) for document in documents if document.get("image")})

    @database_call
    def names(self, collection: str) -> list[str]:
        """The names of every record in `collection` (`workers` or `services`), as stored."""
        documents = self.database.db.find(collection, {"query": {}, "select": ["name"]})
        return [str(document.get("name")) for document in documents]

    @database_call
    def create_worker(
        self, settings: Mapping[str, Any], *, name: str, worker_type: str, version: str, device_id: str,
        worker_files: Mapping[str, str],
    ) -> str:
        """The `workers` record of an installed worker: its settings (the ones its environment type adds
        included), and where its scripts and data folder lie in `componentfiles`. Made beside a record of the
        same name that it replaces (DBManager.create_worker refuses that; the installer removes the old one
        once the new installation is complete)."""
        return str(self.database.db.create(WORKERS, data={
            **settings, "name": name, "type": worker_type, "version": version, "device_id": device_id,
            "worker_files": {key: self.database.make_oid(file_id) for key, file_id in worker_files.items()},
        }))

    @database_call
    def remove_worker(self, worker_id: str) -> None:
        self.database.remove_worker_by_id(worker_id)

    @database_call
    def create_service(
        self, *, name: str, version: str, jobs: list[Any], module_file_id: str, registry_file_id: str
    ) -> str:
        """The `services` record of a registered service, naming its zipped module and registry; made beside a
        record of the same name that it replaces, as `create_worker` is."""
        return str(self.database.db.create(SERVICES, data={
            "name": name, "version": version, "jobs": jobs,
            "module": self.database.make_oid(module_file_id), "registry": self.database.make_oid(registry_file_id),
        }))

    @database_call
    def remove_service(self, service_id: str) -> None:
        """Remove the service record and its module and registry files."""
        self.database.remove_service_by_id(self.database.make_oid(service_id), comp_file_fields=["module", "registry"])

    @database_call
    def mark_failed_unless_recorded(self, job_id: str, flow_run_id: str, reason: str) -> None:
        """Record a failure the job's own run could not write: the run crashed while it held the job (whatever
        an earlier attempt recorded), or it never claimed the job and nothing is recorded yet. A job done, or
        in progress in another run, is left alone."""
        self.database.db.find_one_and_update(
            JOBS, _failure(reason),
            {"query": {"_id": self.database.make_oid(job_id), "done": {"$ne": True}, "$or": [
                {"inProgress": True, "flowRunId": flow_run_id},
                {"inProgress": {"$ne": True}, "error": {"$ne": True}},
            ]}},
        )

    @database_call
    def mark_skipped(self, job_id: str, reason: str) -> None:
        """A job that did not run because a dependency failed: an error without a spent attempt. A job that
        is in progress (in a run elsewhere) or done is left alone."""
        self.database.db.find_one_and_update(JOBS, _failure(reason, failed_attempts=0), {"query": {
            "_id": self.database.make_oid(job_id), "done": {"$ne": True}, "inProgress": {"$ne": True},
        }})

    @database_call
    def sessions_ready_for_bridge(self) -> list[str]:
        """Sessions the platform's scheduler has finished creating (they have their post-services job)
        and that still have jobs queued for mongo-qas consumers."""
        documents = self.database.db.find(JOBS, {"query": {
            "data.function_name": POST_SERVICES_JOB,
            "consumer_id": PLATFORM_CONSUMER,
            "done": {"$ne": True},
            "inProgress": {"$ne": True},
        }, "select": ["sessionId"], "sort": [("createdAt", 1)]})
        return list(dict.fromkeys(str(document["sessionId"]) for document in documents))

    @database_call
    def take_over_session(self, session_id: str, consumer: str) -> list[str]:
        """Move the session's queued jobs from the mongo-qas consumer to `consumer`, job by job and
        atomically, so a mongo-qas worker can no longer claim them; return the ids taken over."""
        taken = []
        for document in self.database.db.find(JOBS, {"query": self._of_session(session_id), "select": ["_id"]}):
            claimed = self.database.db.find_one_and_update(
                JOBS, {"$set": {"consumer_id": consumer}},
                {"query": {"_id": document["_id"], "consumer_id": PLATFORM_CONSUMER,
                           "inProgress": {"$ne": True}, "done": {"$ne": True}}},
            )
            if claimed is not None:
                taken.append(str(document["_id"]))
        return taken

    @database_call
    def component_file(self, file_id: str, what: str) -> bytes:
        """The bytes of a `componentfiles` entry (service module zip, worker script, data zip)."""
        try:
            return self.database.download_component_file(file_id).getvalue()
        except (NoFile, InvalidId) as error:
            raise InvalidRecord(f"{what} (componentfiles id {file_id}) is missing") from error
