"""Reading job records: the platform's fields, and clear errors that never quote patient data."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from bson import ObjectId
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.runtime.errors import InvalidRecord
from flows.runtime.records import SERVICE_JOB, JobRecord, ServiceRecord, WorkerRecord, parse_timeout

HOSTILE_NAMES = [
    "..", "/srv/data", "a/b", ".hidden", "", "x" * 300, "caf\u00e9", "cafe\u0301", "two words", "line\nbreak",
    "-starts-with-a-dash",
]
"""Names that must never become a path, an image tag or a file name: traversal, absolute, nested, hidden, empty,
too long, Unicode (whose normal forms differ), blanks and control characters, an option-like dash."""


def job_document(**changes: Any) -> dict[str, Any]:
    document = {
        "_id": ObjectId(), "sessionId": str(ObjectId()), "channel": "device",
        "data": {"function_name": SERVICE_JOB, "args": [], "kwargs": {
            "service_id": ObjectId(), "worker_id": None, "worker_type": None,
            "headers": {"Metadata": {"PatientName": "Secret^Name"}},
        }},
        "job_name": "segment", "service_name": "brain", "job_event": "stable-series",
        "job_worker_entry": "run", "job_timeout": "1h", "depends_on": [ObjectId()],
        "attempts": 0, "max_attempts": 1, "done": False, "inProgress": False, "error": False,
    }
    document.update(changes)
    return document


def test_a_scheduler_job_record_is_read_with_its_platform_fields() -> None:
    document = job_document()

    job = JobRecord.from_document(document)

    assert job.id == str(document["_id"]) and job.is_service_job
    assert job.service_id == str(document["data"]["kwargs"]["service_id"])
    assert job.timeout_seconds == 3600 and job.label == "brain/segment"
    assert job.depends_on == [str(document["depends_on"][0])]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), ("", None), (90, 90), ("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600),
     ("1h30m", 5400), ("1.5h", 5400), ("2d", 172800)],
)
def test_job_timeouts_are_read_in_the_platform_notation(value: Any, seconds: float | None) -> None:
    assert parse_timeout(value) == seconds


@pytest.mark.parametrize("value", ["soon", "1x", "-5", "0", "h"])
def test_a_timeout_that_does_not_parse_is_a_clear_error(value: str) -> None:
    with pytest.raises(InvalidRecord, match="job_timeout"):
        parse_timeout(value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": {"function_name": "os.system", "kwargs": {}}}, "is not one of"),
        ({"job_worker_entry": None}, "required field 'job_worker_entry'"),
        ({"job_worker_entry": "not a name"}, "is not a Python name"),
        ({"attempts": "three"}, "field 'attempts' must be int"),
        ({"data": {"function_name": SERVICE_JOB, "kwargs": "headers"}}, "field 'kwargs' must be dict"),
    ],
)
def test_invalid_records_name_the_field_and_never_quote_headers(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRecord, match=message) as raised:
        JobRecord.from_document(job_document(**changes))

    assert "Secret" not in str(raised.value)


def test_the_job_kwargs_are_kept_out_of_the_record_repr() -> None:
    assert "Secret" not in repr(JobRecord.from_document(job_document()))


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("field", ["service_name", "job_name"])
def test_a_job_whose_service_or_job_name_is_not_a_plain_name_is_refused(field: str, name: str) -> None:
    with pytest.raises(InvalidRecord, match=f"'{field}' .*letters, digits"):
        JobRecord.from_document(job_document(**{field: name}))


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_worker_and_service_records_whose_name_is_not_a_plain_name_are_refused(name: str) -> None:
    with pytest.raises(InvalidRecord, match=r"'name' .*letters, digits"):
        WorkerRecord.from_document({"_id": ObjectId(), "name": name, "type": "venv"})
    with pytest.raises(InvalidRecord, match=r"'name' .*letters, digits"):
        ServiceRecord.from_document({"_id": ObjectId(), "name": name, "module": ObjectId()})


@pytest.mark.parametrize("name", ["brain", "nifti-converter", "Seg_2.1", "x" * 64])
def test_plain_names_are_read(name: str) -> None:
    assert WorkerRecord.from_document({"_id": ObjectId(), "name": name, "type": "venv"}).name == name
    assert JobRecord.from_document(job_document(service_name=name, job_name=name)).job_name == name


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.builds(ObjectId),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=10,
)


def documents(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Records with any subset of the fields a reader looks at, each holding any JSON-like value."""
    return st.dictionaries(st.sampled_from(fields), JSON_VALUES, max_size=len(fields))


@settings(max_examples=1500, deadline=None)
@given(document=documents(["_id", "data", "sessionId", "job_name", "service_name", "job_event", "job_worker_entry",
                           "job_timeout", "peer_id", "channel", "depends_on", "attempts", "max_attempts", "done",
                           "errorMessage"]),
       data=documents(["function_name", "args", "kwargs"]), kwargs=documents(["service_id", "worker_id", "event"]))
def test_any_job_document_is_read_or_refused_with_invalid_record(
    document: dict[str, Any], data: dict[str, Any], kwargs: dict[str, Any]
) -> None:
    if data:
        document["data"] = {**data, "kwargs": kwargs} if "kwargs" in data else data
    with contextlib.suppress(InvalidRecord):
        JobRecord.from_document(document)


@settings(max_examples=500, deadline=None)
@given(document=documents(["_id", "name", "type", "worker_files", "version", "module"]))
def test_any_worker_or_service_document_is_read_or_refused_with_invalid_record(document: dict[str, Any]) -> None:
    for reader in (WorkerRecord.from_document, ServiceRecord.from_document):
        with contextlib.suppress(InvalidRecord):
            reader(document)
