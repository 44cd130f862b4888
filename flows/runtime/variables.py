"""The one builder of environment variables: what a callback, an installer and a flow run each see.

`dcm_processor_service` reads the service variables (their names contain dashes) to reach session data and
files. Code that is not the runtime's own (a service's callback, a package's setup.py run by pip) gets a
minimal environment: on a host, only the variables named here (a worker's environment holds its Prefect
credentials, the database URL and the warm engine's socket); in a container, the image's environment without
the runtime's own settings. Flow runs get a heartbeat every 30 s (Prefect's minimum; its default is 180 s),
which is what lets a run whose process and worker died be marked Crashed within two minutes (see flows/crash.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from dcm_processor_db_provider import DBManager

from flows.runtime.records import JobRecord

SERVICE_PREFIX = "DCM-PROCESSOR-SERVICE-"
WITHHELD_PREFIXES = ("PREFECT_", "DCM_DB_", "DCM_FLOWS_")
"""The runtime's own settings (Prefect's credentials, the database, the warm engine): never handed on."""
PASSED_VARIABLES = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "LD_LIBRARY_PATH",
)
"""What code that is not the runtime's sees of a host's environment: the system's basics, certificates, proxies
and the GPUs it may use (with the locale's LC_* variables)."""
PASSED_PREFIXES = ("LC_",)
INSTALLER_PREFIXES = ("PIP_", "UV_", "XDG_")
"""An installer also sees pip's and uv's configuration, which names the machine's package sources."""
INSTALLER_SOURCE_VARIABLES = (
    "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_INDEX",
    "UV_DEFAULT_INDEX", "UV_FIND_LINKS",
)
"""Package sources an installer does not see when a wheelhouse is the only source (air-gapped hosts)."""
EXTRA_VARIABLES = "DCM_FLOWS_CALLBACK_VARIABLES"
"""Comma-separated names of further host variables a host's operator hands to callbacks (a licence server...)."""
HEARTBEAT_SECONDS = 30
MISSED_HEARTBEATS_SECONDS = 2 * HEARTBEAT_SECONDS + 15
"""A run silent this long has lost its process (and its pool worker): it is set Crashed."""
SILENT_RUN_CRASHED = f"no heartbeat for {MISSED_HEARTBEATS_SECONDS} s: the run's process and its worker are gone"
"""The Crashed state's message of such a run, whichever of the heartbeat automation and the reconciler sets it."""


API_CLIENT_VARIABLES = {"PREFECT_CLIENT_MAX_RETRIES": "8", "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500"}
"""How every process of the runtime rides out an API that does not answer: with backoff, 8 times (about 8 minutes
in all), and on 500 as well as on 502 and 503, because Prefect's server answers 500 to every request while its
PostgreSQL refuses connections (a restart, a failover)."""


def flow_run_variables() -> dict[str, str]:
    """Settings every flow run's process needs (prefect.yaml gives process runs the same)."""
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS), **API_CLIENT_VARIABLES}


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


def host_variables(base: Mapping[str, str] | None = None, prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """The part of a host's environment that code which is not the runtime's may see."""
    inherited = os.environ if base is None else base
    named = {*PASSED_VARIABLES, *(name.strip() for name in inherited.get(EXTRA_VARIABLES, "").split(",") if name)}
    return {
        name: value for name, value in inherited.items()
        if (name in named or name.startswith((*PASSED_PREFIXES, *prefixes))) and not name.startswith(WITHHELD_PREFIXES)
    }


def installer_variables(index_url: str | None, wheelhouse_only: bool,
                        base: Mapping[str, str] | None = None) -> dict[str, str]:
    """What pip or uv (and every package's build script they run) sees: the host's basics and the package tools'
    configuration; the index to use is handed here, not on a command line another local user can read."""
    variables = host_variables(base, INSTALLER_PREFIXES)
    if wheelhouse_only:
        for name in INSTALLER_SOURCE_VARIABLES:
            variables.pop(name, None)
    if index_url:
        variables.update(PIP_INDEX_URL=index_url, UV_INDEX_URL=index_url)
    return variables


def callback_variables(
    service: Mapping[str, str], extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None,
    whole_base: bool = False,
) -> dict[str, str]:
    """A callback's environment: the host's basics (or, with `whole_base`, all of a container's environment,
    which is its image's) without the runtime's own settings, plus the service variables."""
    inherited = os.environ if base is None else base
    if whole_base:
        environment = {name: value for name, value in inherited.items() if not name.startswith(WITHHELD_PREFIXES)}
    else:
        environment = host_variables(inherited)
    environment.update(service)
    environment.update(extra or {})
    environment["PYTHONUNBUFFERED"] = "1"
    return environment
