"""Environment types read their worker's settings once, typed, and the registry picks one per `workers.type`."""

from __future__ import annotations

from typing import Any

import pytest

from flows.runtime import names
from flows.runtime.environments import (
    ENVIRONMENT_TYPES,
    DockerEnvironment,
    LocalEnvironment,
    VenvEnvironment,
    environment_class,
)
from flows.runtime.environments.venv import VenvSettings
from flows.runtime.errors import InvalidRecord
from flows.runtime.records import WorkerRecord
from tests.platform import PATIENT_NAME


def worker(worker_type: str, **settings: Any) -> WorkerRecord:
    return WorkerRecord(id="w", name="scanner-tools", type=worker_type, worker_files={}, settings=settings)


@pytest.mark.parametrize(("settings", "named"), [
    ({"image": "x", "gpus": {"owner": PATIENT_NAME}}, "'gpus' (dict)"),
    ({"image": "x", "cpus": PATIENT_NAME}, "'cpus' (str)"),
    ({"image": "x", "params": {"run_kwargs": [PATIENT_NAME]}}, "'params.run_kwargs' (list)"),
])
def test_a_bad_docker_setting_names_the_field_and_its_type_never_the_value(settings: dict, named: str) -> None:
    with pytest.raises(InvalidRecord) as refused:
        DockerEnvironment(worker("docker", **settings))

    assert "worker 'scanner-tools': invalid settings" in str(refused.value) and named in str(refused.value)
    assert PATIENT_NAME not in str(refused.value)


def test_a_bad_venv_setting_is_refused_when_the_job_starts_and_when_it_is_installed() -> None:
    with pytest.raises(InvalidRecord, match=r"'venv_python_path' \(int\)"):
        VenvEnvironment(worker("venv", venv_python_path=3))
    with pytest.raises(InvalidRecord, match=r"'pre_scripts' \(str\)"):
        VenvSettings.parse({"pre_scripts": "setup.py"}, "worker 'scanner-tools'")


def test_settings_are_typed_with_the_platforms_defaults() -> None:
    docker = DockerEnvironment(worker("docker", image="x", cpus=1.5)).settings
    venv = VenvSettings.parse({"python_version": 3.11}, "worker 'scanner-tools'")

    assert docker.cpus == 1.5 and docker.module_dir_mount == "/module" and docker.user == "10001:10001"
    assert venv.python_version == "3.11" and venv.venv_path == "venv"


def test_each_worker_type_has_one_environment_type_whose_pool_and_deployment_are_named_names() -> None:
    handled = [record_type for environment in ENVIRONMENT_TYPES for record_type in environment.record_types]

    assert len(handled) == len(set(handled))
    assert environment_class(None, "a job without worker") is LocalEnvironment
    assert environment_class("virtualenv", "worker") is VenvEnvironment
    for environment in ENVIRONMENT_TYPES:
        assert environment.work_pool in (names.PROCESS_POOL, names.DOCKER_POOL)
        assert environment.deployment in (names.PROCESS_DEPLOYMENT, names.DOCKER_DEPLOYMENT)
        assert all(field.description for field in environment.settings_model.model_fields.values()), environment
