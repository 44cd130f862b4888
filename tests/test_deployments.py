"""prefect.yaml and the code agree: on what every flow run of the process pool gets, and on every name."""

from __future__ import annotations

import importlib

import yaml

from flows.runtime import names
from flows.runtime.variables import flow_run_variables
from ops.prefect_setup import PREFECT_YAML


def deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def test_every_process_pool_deployment_hands_its_run_to_the_warm_engine_with_the_run_variables_and_no_stdout() -> None:
    process = [deployment for deployment in deployments() if deployment["work_pool"]["name"] == "dcm-process"]

    assert process
    for deployment in process:
        job_variables = deployment["work_pool"]["job_variables"]
        assert job_variables["env"] == flow_run_variables(), deployment["entrypoint"]
        assert job_variables["stream_output"] is False, deployment["entrypoint"]
        assert job_variables["command"] == "python -m ops.warm_engine", deployment["entrypoint"]


def test_prefect_yaml_spells_the_flows_pools_queues_and_block_names_of_the_names_module() -> None:
    flows = {names.JOB_FLOW, names.SESSION_FLOW, names.INSTALL_FLOW, names.REMOVE_FLOW, names.BRIDGE_FLOW,
             names.RECORD_CRASH_FLOW, names.RECONCILE_FLOW, names.BACKLOG_FLOW}
    deployed = set()
    for deployment in deployments():
        module, function = deployment["entrypoint"].split(":")
        flow_name = getattr(importlib.import_module(module), function).name
        deployed.add(f"{flow_name}/{deployment['name']}")
        assert deployment["name"] in (names.PROCESS_DEPLOYMENT, names.DOCKER_DEPLOYMENT)
        assert deployment["work_pool"]["name"] in (names.PROCESS_POOL, names.DOCKER_POOL)
        assert deployment["work_pool"]["work_queue_name"] in (names.DEFAULT_QUEUE, names.SESSION_QUEUE)
        assert deployment.get("parameters", {}).get("database_block", names.DEFAULT_BLOCK) == names.DEFAULT_BLOCK

    assert deployed == {names.deployment(flow) for flow in flows} | {
        names.deployment(names.JOB_FLOW, names.DOCKER_DEPLOYMENT)
    }
