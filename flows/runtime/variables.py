"""The one builder of environment variables: a callback's DCM-PROCESSOR-SERVICE-* variables, and a flow run's.

`dcm_processor_service` reads the service variables (their names contain dashes) to reach session
data and files. The worker's own Prefect settings and database variables are removed, so a callback
cannot act on Prefect with the worker's credentials. Flow runs get a heartbeat every 30 s (Prefect's
minimum; its default is 180 s), which is what lets a run whose process and worker died be marked
Crashed within two minutes (see flows/crash.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from dcm_processor_db_provider import DBManager

from flows.runtime.records import JobRecord

SERVICE_PREFIX = "DCM-PROCESSOR-SERVICE-"
WITHHELD_PREFIXES = ("PREFECT_", "DCM_DB_")
HEARTBEAT_SECONDS = 30
MISSED_HEARTBEATS_SECONDS = 2 * HEARTBEAT_SECONDS + 15
"""A run silent this long has lost its process (and its pool worker): it is set Crashed."""
SILENT_RUN_CRASHED = f"no heartbeat for {MISSED_HEARTBEATS_SECONDS} s: the run's process and its worker are gone"
"""The Crashed state's message of such a run, whichever of the heartbeat automation and the reconciler sets it."""


def flow_run_variables() -> dict[str, str]:
    """Settings every flow run's process needs (prefect.yaml gives process runs the same)."""
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS), "PREFECT_CLIENT_MAX_RETRIES": "8"}


def service_variables(job: JobRecord, database: DBManager) -> dict[str, str]:
    """The variables the platform's service helpers expect, for this job and this database."""
    values = {
        "DB-PROVIDER": database.dbprovider,
        "DB-URL": database.dburl,
        "DB-NAME": database.dbname,
        "SESSION-ID": job.session_id,
        "JOB-ID": job.id,
        "JOB-EVENT": job.event,
        "JOB-NAME": job.job_name,
        "JOB-SERVICE-NAME": job.service_name,
        "PEER-ID": job.peer_id,
    }
    return {SERVICE_PREFIX + name: "" if value is None else str(value) for name, value in values.items()}


def callback_variables(
    service: Mapping[str, str], extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The worker's environment without its Prefect and database settings, plus the service variables."""
    inherited = os.environ if base is None else base
    environment = {
        name: value for name, value in inherited.items() if not name.startswith(WITHHELD_PREFIXES)
    }
    environment.update(service)
    environment.update(extra or {})
    environment["PYTHONUNBUFFERED"] = "1"
    return environment
