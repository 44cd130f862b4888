"""Worker-host settings as a Prefect block: where environments live and where packages come from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

HOME_VARIABLE = "DCM_FLOWS_HOME"


def home_folder() -> Path:
    """This host's folder of dcm-processor-flows (the local stack, worker environments): `DCM_FLOWS_HOME`,
    else `~/.dcm-flows`. The one default, wherever the package is installed."""
    return Path(os.environ.get(HOME_VARIABLE) or Path.home() / ".dcm-flows")


class WorkerHost(Block):
    """How this host installs worker environments: its folder for virtual environments and, for
    air-gapped hospitals, a wheelhouse or a package index mirror used for every install."""

    _block_type_name = "DCM Worker Host"
    _block_type_slug = "dcm-worker-host"
    _description = "Where worker environments are built on a host, and where their packages come from."

    environments_folder: str = Field(
        default_factory=lambda: str(home_folder() / "workers"),
        description="Folder that holds one sub-folder per venv worker (default: `workers` in the home folder).",
    )
    wheelhouse: str | None = Field(
        default=None,
        description="Folder of wheels; when set, installs use only it (no index), also for Docker images.",
    )
    index_url: SecretStr | None = Field(
        default=None,
        description="Package index to use instead of the machine's configured one; secret, as it may hold a password.",
    )
    container_network_modes: list[str] = Field(
        default_factory=lambda: ["host", "bridge", "none"],
        description="Network modes a docker worker's containers may use (never another container's, by default).",
    )
    allow_root_containers: bool = Field(default=False, description="Whether a docker worker may run as root.")
    allow_host_ipc: bool = Field(default=False, description="Whether a docker worker may share the host's IPC.")
    installer: Literal["auto", "uv", "pip"] = Field(
        default="auto",
        description="`uv pip` when available (auto), or plain pip; for venv workers and docker runtime layers.",
    )

    @classmethod
    def resolve(cls, block_name: str) -> WorkerHost:
        """The saved block called `block_name`, or the defaults (DCM_FLOWS_WHEELHOUSE may name a wheelhouse)."""
        try:
            return cls.load(block_name)
        except ValueError:
            return cls(wheelhouse=os.environ.get("DCM_FLOWS_WHEELHOUSE") or None)
