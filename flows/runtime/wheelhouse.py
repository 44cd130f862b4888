"""A local wheelhouse: every wheel this runtime needs, so images can be built with no network.

Air-gapped hospital networks, and containers behind a TLS-intercepting proxy, cannot reach a package
index from inside a build; the host downloads (or builds) the wheels once and the image installs from
them with `--no-index`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
EXTRA_REQUIREMENTS = ["async-timeout>=4.0.3"]
"""Wanted by redis on Python < 3.11.3 (Debian bookworm has 3.11.2); pip judges that marker by the
host's Python, so it is asked for explicitly."""


def build_wheelhouse(folder: Path, requirements: list[str] | None = None) -> Path:
    """Put wheels for this project and its dependencies (or for `requirements`) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = requirements if requirements is not None else [str(PROJECT_DIR), *EXTRA_REQUIREMENTS]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--isolated", "--disable-pip-version-check", "--quiet",
         "--wheel-dir", str(folder), *wanted],
        check=True,
    )
    return folder
