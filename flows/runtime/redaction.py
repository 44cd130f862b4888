"""The one redactor: every text that leaves a job for Prefect (log lines, state messages, artifacts, the
session's logs, an install's build output) passes through it.

It is built per job from the identifying values in the job's `headers` (the PS3.15 basic-profile identifiers
the platform stores: names, ids, birth date, accession number, institution, physicians, and the study, series
and instance UIDs, which a PACS links back to the patient) and from the credentials the run holds (the
database URL and its password). What it cuts is named in brackets, such as `[patient name]`, so a log line
still reads. The job record keeps the full text: it is the platform's, where patient data belongs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

SHOW_UIDS_VARIABLE = "DCM_FLOWS_SHOW_UIDS"
"""Set to 1 on a host (and in its docker pool's environment) to keep study, series and instance UIDs visible."""

PERSON_NAMES = {
    "PatientName": "patient name",
    "OtherPatientNames": "patient name",
    "PatientBirthName": "patient name",
    "PatientMotherBirthName": "patient name",
    "ReferringPhysicianName": "referring physician",
    "PerformingPhysicianName": "performing physician",
    "NameOfPhysiciansReadingStudy": "physician",
    "PhysiciansOfRecord": "physician",
    "OperatorsName": "operator",
}
"""Person-name tags: their `^`-separated components and the space-joined forms are cut too."""

IDENTIFIERS = {
    "PatientID": "patient id",
    "OtherPatientIDs": "other patient ids",
    "IssuerOfPatientID": "patient id issuer",
    "PatientBirthDate": "birth date",
    "PatientBirthTime": "birth date",
    "PatientAddress": "patient address",
    "PatientTelephoneNumbers": "patient telephone",
    "MedicalRecordLocator": "medical record",
    "AccessionNumber": "accession number",
    "StudyID": "study id",
    "InstitutionName": "institution",
    "InstitutionAddress": "institution",
    "InstitutionalDepartmentName": "institution",
    "StationName": "station",
    "DeviceSerialNumber": "device serial number",
    "PatientComments": "patient comments",
    "PatientStudyComments": "patient comments",
    "AdmittingDiagnosesDescription": "diagnosis",
}

UIDS = {
    "StudyInstanceUID": "study uid",
    "SeriesInstanceUID": "series uid",
    "SOPInstanceUID": "instance uid",
    "FrameOfReferenceUID": "frame of reference uid",
}

SHORTEST_LOOSE_MATCH = 4
"""Values at least this long are cut wherever they appear (inside a longer word too: `patient12345`); shorter
ones only where they stand alone, so that a two-digit id does not blank every number in a log."""

SHORTEST_VALUE = 2
"""Single characters (a middle initial, a sex) identify nobody and would blank every line."""


def show_uids() -> bool:
    """Whether the operator asked to keep UIDs visible on this host."""
    return os.environ.get(SHOW_UIDS_VARIABLE, "").strip().lower() in ("1", "true", "yes")


class Redactor:
    """Cuts known sensitive values out of text, naming what was cut.

    Matching ignores case (a service may print a name upper-cased), and longer values are matched first, so a
    full name is cut as one before its components are.
    """

    def __init__(self) -> None:
        self._labels: dict[str, str] = {}
        """Label by case-folded value."""
        self._forms: set[str] = set()
        """Each value as given and case-folded: a regular expression that ignores case does not fold `ß` to `ss`."""
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str, label: str) -> None:
        """Cut `value` (and report it as `[label]`) from now on."""
        value = value.strip()
        if len(value) >= SHORTEST_VALUE:
            self._labels.setdefault(value.casefold(), label)
            self._forms.update((value, value.casefold()))
            self._pattern = None

    def add_secret_url(self, url: str | None, label: str) -> None:
        """Cut a URL that may carry credentials, and its password on its own."""
        if not url:
            return
        self.add(url, label)
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            self.add(password, f"{label} password")

    def add_headers(self, headers: Any, keep_uids: bool = False) -> None:
        """Cut the identifying values found anywhere in a job's `headers` (a series, study or patient document)."""
        for key, value in _tagged_values(headers):
            if key in PERSON_NAMES:
                for variant in _person_name_variants(value):
                    self.add(variant, PERSON_NAMES[key])
            elif key in IDENTIFIERS:
                for variant in _identifier_variants(key, value):
                    self.add(variant, IDENTIFIERS[key])
            elif key in UIDS and not keep_uids:
                self.add(value, UIDS[key])

    def __call__(self, text: str) -> str:
        if not self._labels or not text:
            return text
        if self._pattern is None:
            self._pattern = _compiled(self._forms)
        return self._pattern.sub(lambda match: f"[{self._labels[match.group(0).casefold()]}]", text)

    @classmethod
    def for_job(cls, kwargs: Mapping[str, Any], database_url: str | None) -> Redactor:
        """The redactor of one job: its headers' identifiers and the database URLs it carries."""
        redactor = cls()
        redactor.add_headers(kwargs.get("headers"), keep_uids=show_uids())
        redactor.add_secret_url(database_url, "database url")
        kwargs_url = kwargs.get("db_url")
        redactor.add_secret_url(kwargs_url if isinstance(kwargs_url, str) else None, "database url")
        return redactor


def _compiled(forms: Iterable[str]) -> re.Pattern[str]:
    alternatives = []
    for value in sorted(forms, key=len, reverse=True):
        escaped = re.escape(value)
        alternatives.append(escaped if len(value) >= SHORTEST_LOOSE_MATCH else rf"(?<![^\W_]){escaped}(?![^\W_])")
    return re.compile("|".join(alternatives), re.IGNORECASE)


def _tagged_values(headers: Any) -> Iterator[tuple[str, str]]:
    """(tag keyword, text) for every scalar under a known tag, at any depth, multi-valued ones split."""
    if isinstance(headers, Mapping):
        for key, value in headers.items():
            if key in PERSON_NAMES or key in IDENTIFIERS or key in UIDS:
                for text in _texts(value):
                    yield str(key), text
            else:
                yield from _tagged_values(value)
    elif isinstance(headers, list):
        for item in headers:
            yield from _tagged_values(item)


def _texts(value: Any) -> Iterator[str]:
    """The texts of a tag's value: a string (DICOM's `\\`-separated values split), a number, a list of them,
    or DICOM JSON's person-name form ({"Alphabetic": ...})."""
    if isinstance(value, str):
        yield from (part for part in value.split("\\") if part.strip())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield str(value)
    elif isinstance(value, Mapping):
        for inner in value.values():
            yield from _texts(inner)
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray)):
        for inner in value:
            yield from _texts(inner)


def _person_name_variants(name: str) -> list[str]:
    """A DICOM person name (`Family^Given^Middle^Prefix^Suffix`, groups separated by `=`), its components, and
    the ways it is commonly written out: space-joined in both orders, and `Family, Given`."""
    variants = [name]
    for group in name.split("="):
        parts = [part.strip() for part in group.split("^") if part.strip()]
        if not parts:
            continue
        variants += [group, *parts, " ".join(parts), " ".join(reversed(parts))]
        if len(parts) >= 2:
            variants += [f"{parts[0]}, {' '.join(parts[1:])}", " ".join([*parts[1:], parts[0]])]
    return variants


def _identifier_variants(key: str, value: str) -> list[str]:
    """An identifier as stored, and a DICOM date (YYYYMMDD) also as written out (YYYY-MM-DD, DD.MM.YYYY,
    DD/MM/YYYY, MM/DD/YYYY)."""
    value = value.strip()
    if key == "PatientBirthDate" and re.fullmatch(r"\d{8}", value):
        year, month, day = value[:4], value[4:6], value[6:]
        return [value, f"{year}-{month}-{day}", f"{day}.{month}.{year}", f"{day}/{month}/{year}",
                f"{month}/{day}/{year}"]
    return [value]
