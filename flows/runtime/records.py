"""Typed views of the platform's job, service and worker records, read and checked field by field.

The field names are the ones `DBManager.create_job`, the job scheduler and mongo-qas use, so that the rest
of the platform keeps working unchanged. A record is checked when it is read; the error names the field
and the expected type, never the value (values may be patient data). Reading and writing the database is
flows/runtime/platform_records.py's; this module only parses what it reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from bson import ObjectId

from flows.runtime.errors import InvalidRecord

SERVICE_JOB = "dcm_processor_worker.controller"
PRE_SERVICES_JOB = "dcm_processor_worker.pre_services"
POST_SERVICES_JOB = "dcm_processor_worker.post_services"
JOB_FUNCTIONS = (SERVICE_JOB, PRE_SERVICES_JOB, POST_SERVICES_JOB)
LABELS = {PRE_SERVICES_JOB: "pre-services", POST_SERVICES_JOB: "post-services"}
"""What people call the session hooks."""
WORKER_DATA_FILE = "data_dir"
"""The `worker_files` key of a worker's zipped data folder, as the platform's installer names it."""

TIMEOUT_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
TIMEOUT_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


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


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1 to 64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"
"""What a component, worker, service or job name may be. Names become folders, image tags and file names: the
rule leaves out separators, '..', hidden and option-like names, blanks, control characters and Unicode (whose
normal forms would make two different names look alike)."""


def checked_name(value: Any, what: str, key: str = "name") -> str:
    """`value` if it is a plain name (NAME_PATTERN), else InvalidRecord quoting it (a name is never patient data)."""
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80] + "...")
        raise InvalidRecord(f"{what}: '{key}' {shown} is not a plain name ({NAME_RULE})")
    return value


def _name(document: Mapping[str, Any], key: str, what: str, required: bool = False) -> str | None:
    value = _field(document, key, str, what, required=required)
    return None if value is None else checked_name(value, what, key)


def _record_id(document: Mapping[str, Any], kind: str) -> str:
    if document.get("_id") is None:
        raise InvalidRecord(f"a {kind} record has no '_id'")
    return str(document["_id"])


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
        return LABELS[self.function_name]

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> JobRecord:
        job_id = _record_id(document, "job")
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
            job_name=_name(document, "job_name", what, required=is_service_job),
            service_name=_name(document, "service_name", what),
            event=_field(document, "job_event", str, what) or _field(kwargs, "event", str, f"{what} data.kwargs"),
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
        service_id = _record_id(document, "service")
        what = f"service {service_id}"
        return cls(
            id=service_id,
            name=_name(document, "name", what, required=True),
            version=_field(document, "version", str, what),
            module_file_id=_identifier(document, "module", what, required=True),
        )


@dataclass(frozen=True)
class WorkerRecord:
    """One document of the `workers` collection; `settings` keeps every field, which each environment type
    parses into its own typed settings (flows/runtime/environments/)."""

    id: str
    name: str
    type: str
    worker_files: dict[str, str]
    settings: dict[str, Any] = field(repr=False)

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> WorkerRecord:
        worker_id = _record_id(document, "worker")
        what = f"worker {worker_id}"
        files = _field(document, "worker_files", dict, what, default={})
        return cls(
            id=worker_id,
            name=_name(document, "name", what, required=True),
            type=_field(document, "type", str, what, required=True),
            worker_files={str(name): str(file_id) for name, file_id in files.items()},
            settings=dict(document),
        )

    @property
    def data_file_id(self) -> str | None:
        """The `componentfiles` id of the worker's zipped data folder, when it has one."""
        return self.worker_files.get(WORKER_DATA_FILE)


def moment_of(value: Any) -> datetime | None:
    """A stored timestamp as an aware UTC datetime (the driver returns naive UTC ones); None if it is none."""
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _moment(document: Mapping[str, Any], key: str) -> datetime | None:
    return moment_of(document.get(key))


@dataclass(frozen=True)
class JobProgress:
    """Where one job stands, for the operator's views: read leniently (a malformed record still shows up), and
    with nothing of its patient data (no `headers`, no `kwargs`)."""

    id: str
    session_id: str | None
    label: str
    state: str
    """One of `done`, `failed`, `running`, `waiting`."""
    channel: str | None
    created_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    error_message: str | None
    flow_run_id: str | None
    """The flow run that ran (or runs) the job last, when this runtime ran it."""
    session_flow_run_id: str | None

    @property
    def seconds(self) -> float | None:
        """How long its last attempt took (so far, for a running one)."""
        if self.started_at is None:
            return None
        end = self.ended_at or (datetime.now(timezone.utc) if self.state == "running" else None)
        return None if end is None or end < self.started_at else (end - self.started_at).total_seconds()

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> JobProgress:
        function_name = (document.get("data") or {}).get("function_name")
        if function_name == SERVICE_JOB:
            label = f"{document.get('service_name')}/{document.get('job_name')}"
        else:
            label = LABELS.get(function_name, str(function_name))
        if document.get("done"):
            state, ended = "done", _moment(document, "completedAt")
        elif document.get("inProgress"):
            state, ended = "running", None
        elif document.get("error"):
            state, ended = "failed", _moment(document, "lastErrorAt")
        else:
            state, ended = "waiting", None
        run = document.get("flowRunId") if document.get("inProgress") else None
        return cls(
            id=str(document["_id"]),
            session_id=None if document.get("sessionId") is None else str(document["sessionId"]),
            label=label,
            state=state,
            channel=document.get("channel"),
            created_at=_moment(document, "createdAt"),
            started_at=_moment(document, "startedAt"),
            ended_at=ended,
            error_message=document.get("errorMessage") if state == "failed" else None,
            flow_run_id=str(run or document.get("lastFlowRunId") or "") or None,
            session_flow_run_id=document.get("sessionFlowRunId"),
        )


@dataclass(frozen=True)
class Backlog:
    """What waits and what runs, counted over every job record: the operator's view of the platform's load."""

    sessions_running: int
    """Sessions with work left and a job in progress."""
    sessions_waiting: int
    """Sessions with work left and no job in progress."""
    running_by_queue: dict[str, int]
    """Jobs in progress by channel: the device id that names a host's work queue."""
    failed_by_service: dict[str, int]
    """Jobs failed since the cutoff, by service (pre- and post-services by their label)."""
    oldest_waiting_since: datetime | None
    """When the oldest job that is neither done, failed nor running was created."""
