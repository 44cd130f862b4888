"""What code that is not the runtime's own sees of the host: callbacks and package installers get a minimal
environment, never the worker's Prefect credentials, database settings or the warm engine's socket."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from flows.runtime.callback import Callback
from flows.runtime.environments import HostSettings, InstallContext, environment_for
from flows.runtime.variables import callback_variables, installer_variables

WORKER_ENVIRONMENT = {
    "PATH": "/usr/bin:/bin", "HOME": "/home/worker", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca.pem", "HTTPS_PROXY": "http://proxy:3128", "CUDA_VISIBLE_DEVICES": "0",
    "PIP_CONFIG_FILE": "/etc/pip.conf", "PIP_FIND_LINKS": "/srv/wheels", "UV_INDEX_URL": "https://mirror.example/packages",
    "PREFECT_API_URL": "http://127.0.0.1:4200/api", "PREFECT_API_KEY": "pnu_secret", "PREFECT_API_AUTH_STRING": "a:b",
    "DCM_DB_URL": "mongodb://user:password@db/dcm", "DCM_FLOWS_WARM_ENGINE": "/run/dcm/engine.sock",
    "DCM_FLOWS_HOME": "/srv/dcm", "AWS_SECRET_ACCESS_KEY": "secret", "SSH_AUTH_SOCK": "/tmp/ssh-agent",
    "DOCKER_HOST": "unix:///var/run/docker.sock", "LICENCE_SERVER": "licences:27000",
}
HOST_BASICS = {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "HTTPS_PROXY", "CUDA_VISIBLE_DEVICES"}


def test_a_callback_on_a_host_sees_the_host_basics_and_its_service_variables_only() -> None:
    seen = callback_variables({"DCM-PROCESSOR-SERVICE-JOB-ID": "42"}, base=WORKER_ENVIRONMENT)

    assert set(seen) == HOST_BASICS | {"DCM-PROCESSOR-SERVICE-JOB-ID", "PYTHONUNBUFFERED"}


def test_an_operator_names_further_variables_that_callbacks_get() -> None:
    base = {**WORKER_ENVIRONMENT, "DCM_FLOWS_CALLBACK_VARIABLES": "LICENCE_SERVER, PREFECT_API_KEY"}

    seen = callback_variables({}, base=base)

    assert seen["LICENCE_SERVER"] == "licences:27000" and "PREFECT_API_KEY" not in seen


def test_a_callback_in_a_container_sees_its_images_environment_without_the_runtimes_settings() -> None:
    seen = callback_variables({}, base=WORKER_ENVIRONMENT, whole_base=True)

    assert not any(name.startswith(("PREFECT_", "DCM_DB_", "DCM_FLOWS_")) for name in seen)
    assert seen["LICENCE_SERVER"] == "licences:27000"


def test_an_installer_sees_the_host_basics_and_the_package_tools_configuration() -> None:
    seen = installer_variables(None, wheelhouse_only=False, base=WORKER_ENVIRONMENT)

    assert set(seen) == HOST_BASICS | {"PIP_CONFIG_FILE", "PIP_FIND_LINKS", "UV_INDEX_URL"}


def test_an_installer_with_a_wheelhouse_sees_no_other_package_source() -> None:
    seen = installer_variables(None, wheelhouse_only=True, base=WORKER_ENVIRONMENT)

    assert set(seen) == HOST_BASICS | {"PIP_CONFIG_FILE"}


def test_the_index_url_reaches_the_installer_by_its_environment_not_its_command_line() -> None:
    index = "https://reader:token@mirror.hospital.example/packages"

    assert HostSettings(environments_folder=Path("/srv"), index_url=index).package_source_arguments() == []
    seen = installer_variables(index, wheelhouse_only=False, base=WORKER_ENVIRONMENT)
    assert seen["PIP_INDEX_URL"] == index and seen["UV_INDEX_URL"] == index


def test_a_real_installer_step_and_a_real_callback_see_exactly_that(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in WORKER_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    host = HostSettings(environments_folder=tmp_path)
    context = InstallContext("w", tmp_path, host, lambda stream, line: None, lambda step, percent: None)
    printed = context.run([sys.executable, "-c", "import json, os; print(json.dumps(sorted(os.environ)))"], "env")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "report.py").write_text("import os\ndef run():\n    return sorted(os.environ)\n")
    callback = Callback(module="report", function="run", search_path=[str(tmp_path / "pkg")])
    returned = environment_for(None).run(callback, tmp_path / "call", callback_variables({}), 60, lambda *_: None)

    assert set(json.loads(printed[0])) - {"LC_CTYPE"} == HOST_BASICS | {"PIP_CONFIG_FILE", "PIP_FIND_LINKS",
                                                                      "UV_INDEX_URL"}
    assert set(returned) - {"LC_CTYPE"} == HOST_BASICS | {"PYTHONUNBUFFERED"}
