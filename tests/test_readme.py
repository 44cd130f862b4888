"""The README's quick start works as written: its command blocks run, in order, on a stack of their own.

The first block is the two set-up commands; `make test` is what runs this test (through `.ci/run`),
so it is checked to be CI's command rather than run again. Every other line runs verbatim in a shell
from the checkout, with `DCM_FLOWS_HOME` pointing at a fresh folder, as on a fresh machine.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.stack import LocalStack, docker_engine_answers
from tests.conftest import REPOSITORY

pytestmark = pytest.mark.integration

README = REPOSITORY / "README.md"
COMMAND_SECONDS = 900


def quick_start_blocks() -> list[list[str]]:
    """The README's first two `sh` blocks, one command per line, comments dropped."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.DOTALL)[:2]
    return [[line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]
            for block in blocks]


def test_the_readme_starts_with_the_two_set_up_commands_and_ci_runs_the_second() -> None:
    assert README.read_text().splitlines()[2] == "```sh"
    assert quick_start_blocks()[0] == ["make demo", "make test"]
    assert "make test" in (REPOSITORY / ".ci" / "run").read_text()


@pytest.fixture
def fresh_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    try:
        yield home
    finally:
        LocalStack(home).stop()


def test_every_quick_start_command_runs_on_a_fresh_stack(fresh_home: Path, wheelhouse: Path) -> None:
    # A fresh shell: without the variables that point this test session at its shared stack.
    inherited = {name: value for name, value in os.environ.items() if not name.startswith(("PREFECT_", "DCM_DB_"))}
    environment = {**inherited, "DCM_FLOWS_HOME": str(fresh_home)}
    if docker_engine_answers():
        environment["DCM_FLOWS_WHEELHOUSE"] = str(wheelhouse)
    set_up, step_by_step = quick_start_blocks()
    outputs = {}
    for command in [set_up[0], *step_by_step]:
        result = subprocess.run(command, shell=True, cwd=REPOSITORY, env=environment, capture_output=True,
                                text=True, timeout=COMMAND_SECONDS)
        outputs[command] = result.stdout
        assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                       f"{result.stderr[-3000:]}"

    demo = outputs["make demo"]
    assert "session run Completed" in demo
    assert re.search(r"nifti-converter/to-nifti\s+done", demo)
    assert ("series-qc/check-geometry" in demo) == docker_engine_answers()
    install = next(output for command, output in outputs.items() if " install " in command)
    assert "Completed" in install and "/runs/flow-run/" in install
    assert "running: Prefect UI" in outputs[step_by_step[-1]]
