"""`dcm-install-component` and `dcm-remove-component`: environments and services as deployments.

Parameters are a component source (folder, archive or URL) or a component name, never data.
Build output streams into the run's logs and a progress artifact moves through the steps
(fetch, environment, packages, upload, register).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from blocks.database import DcmDatabase
from blocks.host import WorkerHost
from flows.run_logs import line_logger
from flows.runtime.environments import ContainerPolicy, HostSettings
from flows.runtime.installer import ComponentInstaller
from flows.runtime.names import DEFAULT_BLOCK, INSTALL_FLOW, REMOVE_FLOW
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.redaction import Redactor


def host_settings(host: WorkerHost) -> HostSettings:
    return HostSettings(
        environments_folder=Path(host.environments_folder).expanduser(),
        wheelhouse=Path(host.wheelhouse).expanduser() if host.wheelhouse else None,
        index_url=host.index_url.get_secret_value() if host.index_url else None,
        installer=host.installer,
        container_policy=ContainerPolicy(
            network_modes=tuple(host.container_network_modes), allow_root=host.allow_root_containers,
            allow_host_ipc=host.allow_host_ipc,
        ),
    )


def _installer(database_block: str, host_block: str, progress_key: str | None) -> ComponentInstaller:
    logger = get_run_logger()
    artifact_id = create_progress_artifact(0, key=progress_key, description="Installing a dcm-processor component")

    def progress(step: str, percent: float) -> None:
        logger.info("step: %s (%d%%)", step, percent)
        update_progress_artifact(artifact_id, percent, description=f"step: {step}")

    records = PlatformRecords(DcmDatabase.resolve(database_block).open())
    host = host_settings(WorkerHost.resolve(host_block))
    redact = Redactor()
    redact.add_secret_url(records.database.dburl, "database url")
    redact.add_secret_url(host.index_url, "index url")
    return ComponentInstaller(records, host, line_logger(logger, redact), progress)


@flow(name=INSTALL_FLOW, persist_result=False, log_prints=False)
def install_component_flow(
    source: str, force: bool = False, database_block: str = DEFAULT_BLOCK, host_block: str = DEFAULT_BLOCK
) -> dict[str, Any]:
    """Install a component: build its worker's environment, upload its files, register its service.

    Args:
        source: a folder with dcm-processor.json, a .zip/.tar.gz of one, or an http(s) URL of an archive.
        force: replace an installed worker or service of the same name (its environment, image, files).
        database_block: name of the `dcm-database` block.
        host_block: name of the `dcm-worker-host` block (environments folder, wheelhouse, index).
    """
    report = _installer(database_block, host_block, "dcm-install").install(source, force=force)
    for note in report.skipped:
        get_run_logger().warning(note)
    return asdict(report)


@flow(name=REMOVE_FLOW, persist_result=False, log_prints=False)
def remove_component_flow(name: str, database_block: str = DEFAULT_BLOCK, host_block: str = DEFAULT_BLOCK) -> list[str]:
    """Remove the service and the worker called `name`: records, files, environment and images."""
    removed = _installer(database_block, host_block, "dcm-remove").remove(name)
    get_run_logger().info("removed: %s", ", ".join(removed) or "nothing (no such component)")
    return removed
