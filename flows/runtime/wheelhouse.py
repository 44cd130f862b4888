"""A local wheelhouse: every wheel this runtime needs, so images can be built with no network.

Air-gapped hospital networks, and containers behind a TLS-intercepting proxy, cannot reach a package
index from inside a build; the host downloads (or builds) the wheels once and the image installs from
them with `--no-index`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path
from urllib.parse import unquote, urlsplit

from flows.runtime.errors import InstallError

DISTRIBUTION = "dcm-processor-flows"
EXTRA_REQUIREMENTS = ["async-timeout>=4.0.3"]
"""Wanted by redis on Python < 3.11.3 (Debian bookworm has 3.11.2); pip judges that marker by the
host's Python, so it is asked for explicitly."""


def installed_from() -> str:
    """What this project was installed from, for pip: its source folder (an editable install) or the wheel
    or archive file that was installed, as recorded in the installation's `direct_url.json`."""
    records = (found.read_text("direct_url.json") for found in distributions(name=DISTRIBUTION))
    recorded = next((record for record in records if record), None)  # a build's egg-info in a checkout has none
    url = json.loads(recorded)["url"] if recorded else ""
    source = Path(unquote(urlsplit(url).path)) if url.startswith("file:") else None
    if source is None or not source.exists():
        raise FileNotFoundError(
            f"{DISTRIBUTION} was not installed from a folder or file that is still here ({url or 'no record'}), so "
            "no wheelhouse can be built for it: give the dcm-worker-host block a `wheelhouse` folder"
        )
    return str(source)


def build_wheelhouse(folder: Path, requirements: list[str] | None = None) -> Path:
    """Put wheels for this project and its dependencies (or for `requirements`) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = requirements if requirements is not None else [installed_from(), *EXTRA_REQUIREMENTS]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--isolated", "--disable-pip-version-check", "--quiet",
         "--wheel-dir", str(folder), *wanted],
        check=True,
    )
    return folder


SOURCE_OPTIONS = ("-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--trusted-host")
INCLUDE_OPTIONS = ("-r", "--requirement", "-c", "--constraint")


def refuse_other_package_sources(requirements: Path, inside: Path) -> None:
    """Raise InstallError when a requirements file (or one it includes) names a package source besides the
    wheelhouse: an index or find-links option, or a URL. On an air-gapped host the wheelhouse is the only one."""
    seen: set[Path] = set()
    waiting = [requirements.resolve()]
    while waiting:
        current = waiting.pop()
        if current in seen:
            continue
        seen.add(current)
        if not current.is_relative_to(inside.resolve()) or not current.is_file():
            raise InstallError(f"{requirements.name} includes {current.name}, which is not a file of the worker")
        for number, raw in enumerate(current.read_text().splitlines(), start=1):
            line = raw.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            option, value = _option(line)
            where = f"{current.name} line {number}"
            if option in SOURCE_OPTIONS:
                raise InstallError(f"{where} names another package source ({option}); with a wheelhouse "
                                   "configured, installs use only the wheelhouse")
            if "://" in line or line.startswith("git+"):
                raise InstallError(f"{where} names a package by URL; with a wheelhouse configured, installs use "
                                   "only the wheelhouse")
            if option in INCLUDE_OPTIONS:
                waiting.append((current.parent / value).resolve())


def _option(line: str) -> tuple[str, str]:
    """A requirements line's option and its value (`--name value`, `--name=value`, `-x value`, `-xvalue`), or
    no option and the line."""
    if line.startswith("--"):
        name, _, value = line.replace("=", " ", 1).partition(" ")
    elif line.startswith("-"):
        name, value = line[:2], line[2:]
    else:
        return "", line
    return name, value.strip()
