"""dcm-processor components: folders with a `dcm-processor.json`, and registering their services.

A service is registered as the platform's own installer does it: `module/` and `registry/` are
zipped into the `componentfiles` bucket and a `services` record names them by file id, so that the
platform's scheduler and this runtime both find it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcm_processor_utils import zip_directory_to_bytesio

from flows.runtime.errors import InvalidRecord
from flows.runtime.platform_records import PlatformRecords
from flows.runtime.records import checked_name

MANIFEST = "dcm-processor.json"


@dataclass(frozen=True)
class Component:
    """A component folder and what its manifest declares."""

    folder: Path
    name: str
    version: str
    service: dict[str, Any] | None = field(default=None, repr=False)
    worker: dict[str, Any] | None = field(default=None, repr=False)
    requires: list[str] = field(default_factory=list)
    """Relative paths of components to install first (other services or workers this one needs)."""

    @classmethod
    def read(cls, folder: Path) -> Component:
        manifest_file = folder / MANIFEST
        if not manifest_file.is_file():
            raise InvalidRecord(f"{folder} has no {MANIFEST}")
        try:
            manifest = json.loads(manifest_file.read_text())
        except ValueError as error:
            raise InvalidRecord(f"{manifest_file} is not valid JSON: {error}") from error
        return cls(
            folder=folder, name=checked_name(manifest.get("name"), str(manifest_file)),
            version=str(manifest.get("version", "0.0.1")),
            service=manifest.get("service"), worker=manifest.get("worker"),
            requires=[str(path) for path in manifest.get("requires", [])],
        )

    def subfolder(self, relative: Any, what: str) -> Path:
        """A folder named by the manifest, which must lie inside the component."""
        folder = (self.folder / relative).resolve() if isinstance(relative, str) else None
        if folder is None or not folder.is_dir() or not folder.is_relative_to(self.folder.resolve()):
            raise InvalidRecord(f"component '{self.name}': {what} must name a folder inside it")
        return folder

    def service_folder(self, key: str) -> Path:
        assert self.service is not None
        return self.subfolder(self.service.get(key), f"service.{key}")


def register_service(records: PlatformRecords, component: Component) -> str:
    """Upload the service's module and registry and create its record (beside any of the same name, which the
    caller removes once it is replaced); return its id."""
    if component.service is None:
        raise InvalidRecord(f"component '{component.name}' declares no service")
    uploaded: list[str] = []
    try:
        for key in ("module", "registry"):
            content = zip_directory_to_bytesio(component.service_folder(key)).getvalue()
            uploaded.append(records.upload_component_file(
                content, f"{component.name}-{key}.zip",
                {"component": component.name, "version": component.version, "kind": key},
            ))
        return records.create_service(
            name=component.name, version=component.version, jobs=component.service.get("jobs", []),
            module_file_id=uploaded[0], registry_file_id=uploaded[1],
        )
    except BaseException:
        for file_id in uploaded:
            records.remove_component_file(file_id)
        raise
