"""`make chaos` at its small size (bench/chaos.py): sessions run while every kind of fault strikes once, on an
embedded stack of its own, and nothing is lost, run twice, stuck or left behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SEED = 3
"""A fixed schedule for CI (each kind of fault once), the one under which CI once saw a callback run to its end
twice; tests/test_recovery.py has the sequence behind it. `make chaos` draws a new schedule each run."""


def test_sessions_hit_by_every_kind_of_fault_finish_with_nothing_lost_run_twice_stuck_or_left_behind() -> None:
    chaos = subprocess.run([sys.executable, "-m", "bench.chaos", "--small", "--seed", str(SEED)],
                           capture_output=True, text=True, timeout=1500, check=False)

    report = json.loads(chaos.stdout[chaos.stdout.index("\n{") + 1:])
    counts = {name: report[name] for name in (
        "jobs_not_done", "callbacks_run_twice", "done_without_callback", "in_progress_after_reconciler_pass",
        "orphan_processes", "leftover_job_folders", "leftover_containers",
    )}
    assert counts == dict.fromkeys(counts, 0), chaos.stdout
    assert report["sessions_completed"] == report["sessions"], chaos.stdout
    assert report["faults_without_target"] == 0, chaos.stdout
    assert report["seconds_to_consistent"] is not None and report["seconds_to_consistent"] < 180, chaos.stdout
    assert chaos.returncode == 0, chaos.stdout
