"""Worker-host settings as a Prefect block: where environments live and where packages come from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field

DEFAULT_ENVIRONMENTS = Path(os.environ.get("DCM_FLOWS_HOME", Path.home() / ".dcm-flows")) / "workers"


class WorkerHost(Block):
    """How this host installs worker environments: its folder for virtual environments and, for
    air-gapped hospitals, a wheelhouse or a package index mirror used for every install."""

    _block_type_name = "DCM Worker Host"
    _block_type_slug = "dcm-worker-host"
    _description = "Where worker environments are built on a host, and where their packages come from."

    environments_folder: str = Field(
        default=str(DEFAULT_ENVIRONMENTS),
        description="Folder that holds one sub-folder per venv worker.",
    )
    wheelhouse: str | None = Field(
        default=None,
        description="Folder of wheels; when set, installs use only it (no index), also for Docker images.",
    )
    index_url: str | None = Field(default=None, description="Package index to use instead of PyPI.")
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
