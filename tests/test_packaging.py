"""The package works without the checkout: a wheel installed into a fresh environment elsewhere starts its own
stack, deploys from a folder that holds only prefect.yaml, and runs a job."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dcm_processor_db_provider import DBManager

from ops.prefect_setup import PREFECT_YAML
from ops.stack import LocalStack
from tests.conftest import REPOSITORY
from tests.platform import Platform

pytestmark = pytest.mark.integration

COMMAND_SECONDS = 600


def run(command: list[str], cwd: Path, environment: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True,
                            timeout=COMMAND_SECONDS)
    assert result.returncode == 0, f"`{' '.join(command)}` exited {result.returncode}:\n" \
                                   f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A fresh virtual environment outside the checkout with the built wheel installed; its bin folder and an
    environment for commands run in it (none of the test session's Prefect or database variables)."""
    folder = tmp_path_factory.mktemp("installed")
    source, dist = folder / "source", folder / "dist"
    # Built from a copy: a build leaves build/ and an egg-info behind in the folder it builds.
    shutil.copytree(REPOSITORY, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".dcm-flows", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    run([sys.executable, "-m", "uv", "build", "--wheel", "--out-dir", str(dist), str(source)], folder, dict(os.environ))
    wheel = next(dist.glob("dcm_processor_flows-*.whl"))
    venv = folder / "venv"
    run([sys.executable, "-m", "venv", str(venv)], folder, dict(os.environ))
    run([sys.executable, "-m", "uv", "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
         f"{wheel}[embedded]"], folder, dict(os.environ))
    inherited = {name: value for name, value in os.environ.items() if not name.startswith(("PREFECT_", "DCM_"))}
    environment = {**inherited, "DCM_FLOWS_HOME": str(folder / "home"), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    try:
        yield venv / "bin", environment
    finally:
        LocalStack(folder / "home").stop()


def test_an_installed_wheel_starts_its_stack_deploys_from_prefect_yaml_alone_and_runs_a_job(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    bin_folder, environment = installed
    elsewhere = tmp_path / "deployments"
    elsewhere.mkdir()
    shutil.copy(PREFECT_YAML, elsewhere / "prefect.yaml")

    package = run([str(bin_folder / "python"), "-c", "import flows, ops, blocks; print(flows.__file__, ops.__file__)"],
                  elsewhere, environment)
    run([str(bin_folder / "dcm-flows"), "stack", "start"], elsewhere, environment)
    stack = LocalStack(Path(environment["DCM_FLOWS_HOME"]))
    state = stack.state()
    assert state is not None
    prefect = {**environment, "PREFECT_API_URL": state.api_url, "PREFECT_API_AUTH_STRING": stack.api_auth()}
    run([str(bin_folder / "prefect"), "--no-prompt", "deploy", "--all"], elsewhere, prefect)
    platform = Platform(DBManager(dburl=state.database_url, dbname="dcm-processor", dbprovider="mongodb"))
    job_id = platform.service_job(platform.service("packaged", "def run(**kwargs):\n    return 'from the wheel'\n"))

    output = run([str(bin_folder / "dcm-flows"), "submit", "job", job_id, "--wait"], elsewhere, prefect)

    assert str(REPOSITORY) not in package and str(bin_folder.parent) in package
    assert "Completed" in output
    assert platform.job(job_id)["result"] == "from the wheel"
