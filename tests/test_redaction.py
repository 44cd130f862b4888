"""The one redactor: what leaves a job for Prefect has its patient's identifiers and the credentials cut out."""

from __future__ import annotations

import pytest

from flows.runtime.errors import CallbackFailed
from flows.runtime.redaction import SHOW_UIDS_VARIABLE, Redactor
from tests.platform import IDENTIFYING_METADATA

HEADERS = {
    "_id": "65f0c0ffee", "StudyInstanceUID": IDENTIFYING_METADATA["StudyInstanceUID"],
    "SeriesInstanceUID": IDENTIFYING_METADATA["SeriesInstanceUID"],
    "Metadata": {**IDENTIFYING_METADATA, "Modality": "MR", "SeriesDescription": "T1 axial"},
}
URL = "mongodb://platform:s3cret-pass@db.hospital.example:27017/dcm"


def job_redactor(**kwargs: object) -> Redactor:
    return Redactor.for_job({"headers": HEADERS, "db_url": URL, **kwargs}, None)


@pytest.mark.parametrize(("said", "shown"), [
    ("Doe^Janet-Sensitive", "[patient name]"),
    ("patient Janet-Sensitive Doe", "patient [patient name]"),
    ("DOE, Janet-Sensitive", "[patient name]"),
    ("family Doe only", "family [patient name] only"),
    ("id PID-778899 and patientPID-778899", "id [patient id] and patient[patient id]"),
    ("alias ALT-3344", "alias [other patient ids]"),
    ("born 19700412 or 1970-04-12 or 12.04.1970", "born [birth date] or [birth date] or [birth date]"),
    ("order ACC-55667788", "order [accession number]"),
    ("at ST ELSEWHERE CLINIC", "at [institution]"),
    ("sent by Gregory Houseman", "sent by [referring physician]"),
    ("read by Quinlan", "read by [performing physician]"),
    ("/data/1.2.826.0.1.3680043.8.498.102/0001.dcm", "/data/[series uid]/0001.dcm"),
    (f"connecting to {URL}", "connecting to [database url]"),
    ("password=s3cret-pass", "password=[database url password]"),
])
def test_identifiers_and_credentials_are_cut_and_named(said: str, shown: str) -> None:
    assert job_redactor()(said) == shown


@pytest.mark.parametrize("harmless", [
    "42 slices checked in 1.3 s", "Modality MR, T1 axial", "Doeskin gloves", "Does the mask fit?", "",
])
def test_harmless_text_is_left_alone(harmless: str) -> None:
    assert job_redactor()(harmless) == harmless


def test_a_short_identifier_is_cut_only_where_it_stands_alone() -> None:
    redact = Redactor.for_job({"headers": {"PatientID": "17"}}, None)

    assert redact("patient 17 has 170 slices") == "patient [patient id] has 170 slices"


def test_an_operator_may_keep_uids_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SHOW_UIDS_VARIABLE, "1")
    uid = IDENTIFYING_METADATA["SeriesInstanceUID"]

    assert job_redactor()(f"{uid} for Doe^Janet-Sensitive") == f"{uid} for [patient name]"


def test_person_names_in_dicom_json_form_and_multi_valued_ids_are_found() -> None:
    redact = Redactor.for_job({"headers": {"Metadata": [
        {"PatientName": {"Alphabetic": "Roe^Richard"}, "OtherPatientIDs": ["X-100200", "X-300400"]},
    ]}}, None)

    assert redact("Richard Roe, X-300400") == "[patient name], [other patient ids]"


def test_a_failed_callback_is_redacted_for_prefect_and_kept_in_full_for_the_record() -> None:
    failure = CallbackFailed("run failed: ValueError: bad series for Doe^Janet-Sensitive", "Traceback: PID-778899")

    redacted = failure.redacted(job_redactor())

    assert str(redacted) == "run failed: ValueError: bad series for [patient name]"
    assert redacted.traceback == "Traceback: [patient id]"
    assert redacted.recorded == "run failed: ValueError: bad series for Doe^Janet-Sensitive"
