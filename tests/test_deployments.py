"""prefect.yaml and the code agree on what every flow run of the process pool gets."""

from __future__ import annotations

import yaml

from flows.runtime.environment import flow_run_variables
from flows.stack import PROJECT_DIR


def test_every_process_pool_deployment_hands_its_run_to_the_warm_engine_with_the_run_variables_and_no_stdout() -> None:
    deployments = yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text())["deployments"]
    process = [deployment for deployment in deployments if deployment["work_pool"]["name"] == "dcm-process"]

    assert process
    for deployment in process:
        job_variables = deployment["work_pool"]["job_variables"]
        assert job_variables["env"] == flow_run_variables(), deployment["entrypoint"]
        assert job_variables["stream_output"] is False, deployment["entrypoint"]
        assert job_variables["command"] == "python -m flows.warm_engine", deployment["entrypoint"]
