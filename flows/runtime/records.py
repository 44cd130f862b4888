"""Typed views of the platform's job, service and worker records, and the writes a job run makes.

This is the only module that knows collection and field names. The field names are the ones
`DBManager.create_job`, the job scheduler and mongo-qas use, so that the rest of the platform keeps
working unchanged. A record is checked field by field when it is read; the error names the field
and the expected type, never the value (values may be patient data).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ParamSpec, TypeVar

from bson import ObjectId
from bson.errors import InvalidId
from dcm_processor_db_provider import DBManager
from gridfs.errors import NoFile
from pymongo.errors import ConnectionFailure

from flows.runtime.errors import AlreadyClaimed, DatabaseUnavailable, InvalidRecord, JobNotFound

JOBS = "jobs"
SERVICES = "services"
SESSIONS = "sessions"
WORKERS = "workers"

SERVICE_JOB = "dcm_processor_worker.controller"
PRE_SERVICES_JOB = "dcm_processor_worker.pre_services"
POST_SERVICES_JOB = "dcm_processor_worker.post_services"
JOB_FUNCTIONS = (SERVICE_JOB, PRE_SERVICES_JOB, POST_SERVICES_JOB)
WORKER_DATA_FILE = "data_dir"
SESSION_HOLDER = "sessionFlowRunId"
"""The `worker_files` key of a worker's zipped data folder, as the platform's installer names it."""
PLATFORM_CONSUMER = "default-customer-id"
"""The `consumer_id` DBManager.create_job gives every job; mongo-qas workers claim only jobs that have it."""

TIMEOUT_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
TIMEOUT_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")

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


def parse_timeout(value: str | int | float | None, what: str = "job") -> float | None:
    """Seconds from a `job_timeout` such as 90, "90s", "30m", "1h" or "1h30m"; None means no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        parts = list(TIMEOUT_PART.finditer(text))
        if not parts or "".join(part.group(0) for part in parts) != text:
            raise InvalidRecord(f"{what}: job_timeout '{value}' is not a duration like 90, '90s', '30m' or '1h'")
        seconds = sum(float(number) * TIMEOUT_UNITS[unit or "s"] for number, unit in (p.groups() for p in parts))
    if seconds <= 0:
        raise InvalidRecord(f"{what}: job_timeout '{value}' must be positive")
    return seconds


def _field(document: Mapping[str, Any], key: str, expected: type | tuple[type, ...], what: str,
           default: Any = None, required: bool = False) -> Any:
    value = document.get(key)
    if value is None:
        if required:
            raise InvalidRecord(f"{what}: required field '{key}' is missing")
        return default
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        names = "/".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise InvalidRecord(f"{what}: field '{key}' must be {names}, not {type(value).__name__}")
    return value


def _identifier(document: Mapping[str, Any], key: str, what: str, required: bool = False) -> str | None:
    """An id field, stored by the platform as ObjectId or as its hex string."""
    value = document.get(key)
    if value is None:
        if required:
            raise InvalidRecord(f"{what}: required field '{key}' is missing")
        return None
    if not isinstance(value, (str, ObjectId)):
        raise InvalidRecord(f"{what}: field '{key}' must be an id, not {type(value).__name__}")
    return str(value)


def _text_list(document: Mapping[str, Any], key: str, what: str) -> list[str]:
    values = _field(document, key, list, what, default=[])
    if not all(isinstance(value, str) for value in values):
        raise InvalidRecord(f"{what}: field '{key}' must be a list of strings")
    return list(values)


@dataclass(frozen=True)
class JobRecord:
    """One document of the `jobs` collection. `kwargs` holds patient data: never log it."""

    id: str
    function_name: str
    args: list[Any]
    kwargs: dict[str, Any] = field(repr=False)
    session_id: str | None
    job_name: str | None
    service_name: str | None
    event: str | None
    worker_entry: str | None
    timeout_seconds: float | None
    peer_id: str | None
    channel: str | None
    depends_on: list[str]
    attempts: int
    max_attempts: int
    done: bool
    in_progress: bool
    failed: bool
    error_message: str | None
    result: Any = field(repr=False)
    service_id: str | None
    worker_id: str | None
    worker_type: str | None

    @property
    def is_service_job(self) -> bool:
        return self.function_name == SERVICE_JOB

    @property
    def label(self) -> str:
        """A name for humans: service and job name, or the session hook it runs."""
        if self.is_service_job:
            return f"{self.service_name}/{self.job_name}"
        return "pre-services" if self.function_name == PRE_SERVICES_JOB else "post-services"

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> JobRecord:
        job_id = str(document["_id"])
        what = f"job {job_id}"
        data = _field(document, "data", dict, what, required=True)
        function_name = _field(data, "function_name", str, what, required=True)
        if function_name not in JOB_FUNCTIONS:
            raise InvalidRecord(
                f"{what}: data.function_name '{function_name}' is not one of {', '.join(JOB_FUNCTIONS)}"
            )
        kwargs = _field(data, "kwargs", dict, what, default={})
        is_service_job = function_name == SERVICE_JOB
        record = cls(
            id=job_id,
            function_name=function_name,
            args=_field(data, "args", list, what, default=[]),
            kwargs=kwargs,
            session_id=_identifier(document, "sessionId", what),
            job_name=_field(document, "job_name", str, what, required=is_service_job),
            service_name=_field(document, "service_name", str, what),
            event=_field(document, "job_event", str, what),
            worker_entry=_field(document, "job_worker_entry", str, what, required=is_service_job),
            timeout_seconds=parse_timeout(_field(document, "job_timeout", (str, int, float), what), what),
            peer_id=_identifier(document, "peer_id", what),
            channel=_field(document, "channel", str, what),
            depends_on=[str(dependency) for dependency in _field(document, "depends_on", list, what, [])],
            attempts=_field(document, "attempts", int, what, default=0),
            max_attempts=_field(document, "max_attempts", int, what, default=1),
            done=bool(document.get("done", False)),
            in_progress=bool(document.get("inProgress", False)),
            failed=bool(document.get("error", False)),
            error_message=_field(document, "errorMessage", str, what),
            result=document.get("result"),
            service_id=_identifier(kwargs, "service_id", f"{what} data.kwargs", required=is_service_job),
            worker_id=_identifier(kwargs, "worker_id", f"{what} data.kwargs"),
            worker_type=_field(kwargs, "worker_type", str, f"{what} data.kwargs"),
        )
        if is_service_job and not record.worker_entry.isidentifier():
            raise InvalidRecord(f"{what}: job_worker_entry '{record.worker_entry}' is not a Python name")
        return record


@dataclass(frozen=True)
class ServiceRecord:
    """One document of the `services` collection."""

    id: str
    name: str
    version: str | None
    module_file_id: str

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> ServiceRecord:
        service_id = str(document["_id"])
        what = f"service {service_id}"
        return cls(
            id=service_id,
            name=_field(document, "name", str, what, required=True),
            version=_field(document, "version", str, what),
            module_file_id=_identifier(document, "module", what, required=True),
        )


@dataclass(frozen=True)
class WorkerRecord:
    """One document of the `workers` collection; `settings` keeps every field for the worker types."""

    id: str
    name: str
    type: str
    pre_scripts: list[str]
    post_scripts: list[str]
    worker_files: dict[str, str]
    settings: dict[str, Any] = field(repr=False)

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> WorkerRecord:
        worker_id = str(document["_id"])
        what = f"worker {worker_id}"
        files = _field(document, "worker_files", dict, what, default={})
        return cls(
            id=worker_id,
            name=_field(document, "name", str, what, required=True),
            type=_field(document, "type", str, what, required=True),
            pre_scripts=_text_list(document, "pre_scripts", what),
            post_scripts=_text_list(document, "post_scripts", what),
            worker_files={str(name): str(file_id) for name, file_id in files.items()},
            settings=dict(document),
        )

    def setting(self, key: str, expected: type | tuple[type, ...], default: Any = None) -> Any:
        """A worker setting, type-checked like every other record field."""
        return _field(self.settings, key, expected, f"worker {self.name}", default=default)


def _now() -> datetime:
    return datetime.now(timezone.utc)


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
            {"$set": {"inProgress": True, "startedAt": _now(), "flowRunId": flow_run_id}},
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
    def mark_succeeded(self, job_id: str, result: Any) -> None:
        """Completion exactly as mongo-qas writes it (plus `error: False` after an earlier failure)."""
        self.database.db.update(JOBS, job_id, {"$set": {
            "done": True, "inProgress": False, "error": False, "result": result,
            "completedAt": _now(), "progress": 100,
        }})

    @database_call
    def mark_failed(self, job_id: str, message: str, failed_attempts: int = 1) -> None:
        """Failure exactly as mongo-qas writes it: one `attempts` increment per failed attempt."""
        self.database.db.update(JOBS, job_id, {
            "$set": {"error": True, "inProgress": False, "errorMessage": message, "lastErrorAt": _now()},
            "$inc": {"attempts": failed_attempts},
        })

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
    def create_worker(self, document: dict[str, Any]) -> str:
        return str(self.database.create_worker(document))

    @database_call
    def remove_worker(self, worker_id: str) -> None:
        self.database.remove_worker_by_id(worker_id)

    @database_call
    def create_service(self, document: dict[str, Any]) -> str:
        return str(self.database.create_service(document))

    @database_call
    def remove_service(self, name: str) -> None:
        """Remove the service record and its module and registry files."""
        self.database.remove_service(name, comp_file_fields=["module", "registry"])

    @database_call
    def mark_failed_unless_recorded(self, job_id: str, flow_run_id: str, reason: str) -> None:
        """Record a failure the job's own run could not write (its run crashed or never started);
        a job in progress in another run is left alone."""
        self.database.db.find_one_and_update(
            JOBS,
            {"$set": {"error": True, "inProgress": False, "errorMessage": reason, "lastErrorAt": _now()},
             "$inc": {"attempts": 1}},
            {"query": {"_id": self.database.make_oid(job_id), "done": {"$ne": True}, "error": {"$ne": True},
                       "$or": [{"inProgress": {"$ne": True}}, {"flowRunId": flow_run_id}]}},
        )

    @database_call
    def mark_skipped(self, job_id: str, reason: str) -> None:
        """A job that did not run because a dependency failed: an error without a spent attempt."""
        self.database.db.update(JOBS, job_id, {
            "$set": {"error": True, "inProgress": False, "errorMessage": reason, "lastErrorAt": _now()},
        })

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
        for job in self.session_jobs(session_id):
            claimed = self.database.db.find_one_and_update(
                JOBS, {"$set": {"consumer_id": consumer}},
                {"query": {"_id": self.database.make_oid(job.id), "consumer_id": PLATFORM_CONSUMER,
                           "inProgress": {"$ne": True}, "done": {"$ne": True}}},
            )
            if claimed is not None:
                taken.append(job.id)
        return taken

    @database_call
    def component_file(self, file_id: str, what: str) -> bytes:
        """The bytes of a `componentfiles` entry (service module zip, worker script, data zip)."""
        try:
            return self.database.download_component_file(file_id).getvalue()
        except (NoFile, InvalidId) as error:
            raise InvalidRecord(f"{what} (componentfiles id {file_id}) is missing") from error
