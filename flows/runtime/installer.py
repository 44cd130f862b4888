"""Installing and removing dcm-processor components: worker environments, worker files and services.

The records are the ones the platform's own tools write and read (`workers` with `worker_files` ids
in `componentfiles`, `services` with module and registry zips, `device_id` of this host), so a
component installed here is listed by the platform and one installed by the platform runs here.
An install that fails leaves nothing half-made: the environment, the image, the uploaded files and
the records it created are removed again before the error is raised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dcm_processor_utils import get_device_id, zip_directory_to_bytesio

from flows.runtime.archive import extract_archive
from flows.runtime.components import MANIFEST, Component, register_service
from flows.runtime.environments import (
    HostSettings,
    InstallContext,
    WorkerSettings,
    environment_class,
    environment_for,
)
from flows.runtime.environments.base import ProgressHandler
from flows.runtime.errors import InstallError, InvalidRecord, UnknownWorkerType
from flows.runtime.platform_records import SERVICES, WORKERS, PlatformRecords
from flows.runtime.process import LineHandler
from flows.runtime.records import WORKER_DATA_FILE, WorkerRecord, checked_name

DOWNLOAD_LIMIT_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class InstallReport:
    """What an install did, for the log and the run's result (names and ids only)."""

    component: str
    worker: str | None = None
    worker_id: str | None = None
    service_id: str | None = None
    skipped: list[str] = field(default_factory=list)


@contextmanager
def fetched(source: str) -> Iterator[tuple[Path, Path]]:
    """The component folder of `source` (a folder, a .zip/.tar(.gz) archive, or an http(s) URL of one), and the
    tree its `requires` may name components in: a folder's parent (its siblings), or the archive's contents."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = _component_root(path.resolve())
        yield folder, folder.parent
        return
    with tempfile.TemporaryDirectory(prefix="dcm-component-") as temporary:
        if source.startswith(("http://", "https://")):
            extract_archive(_downloaded(source), Path(temporary))
        elif path.is_file():
            extract_archive(path, Path(temporary))
        else:
            raise InstallError(f"{source} is neither a folder, an archive nor an http(s) URL")
        yield _component_root(Path(temporary)), Path(temporary).resolve()


def _downloaded(source: str) -> bytes:
    """The archive at an http(s) URL; a `#sha256=<hex>` fragment (as pip writes it) is checked."""
    url, _, fragment = source.partition("#")
    expected = fragment.removeprefix("sha256=").lower() if fragment.startswith("sha256=") else None
    if fragment and expected is None:
        raise InstallError(f"{url}: the only fragment understood is #sha256=<hex digest>")
    with urllib.request.urlopen(url, timeout=120) as response:
        content = response.read(DOWNLOAD_LIMIT_BYTES + 1)
    if len(content) > DOWNLOAD_LIMIT_BYTES:
        raise InstallError(f"{url} is larger than {DOWNLOAD_LIMIT_BYTES} bytes")
    if expected is not None and hashlib.sha256(content).hexdigest() != expected:
        raise InstallError(f"{url}: the archive's sha256 is not the one given; nothing was installed")
    return content


def _component_root(folder: Path) -> Path:
    if (folder / MANIFEST).is_file():
        return folder
    children = [child for child in folder.iterdir() if child.is_dir()]
    if len(children) == 1 and (children[0] / MANIFEST).is_file():
        return children[0]
    raise InstallError(f"no {MANIFEST} in the component's top folder")


@dataclass
class InstallRun:
    """One install, required components included: what it made, undone as a whole if any part fails, and what
    it replaces, removed only once everything is in place."""

    undo: list[Callable[[], None]] = field(default_factory=list)
    replaced: list[Callable[[], None]] = field(default_factory=list)
    installing: list[str] = field(default_factory=list)
    """The components being installed, outermost first, to refuse a `requires` cycle."""


class ComponentInstaller:
    """Installs and removes components against one platform database on this host.

    A forced reinstall builds the new environment beside the installed one and registers the new records next
    to the old ones; the old installation is removed only when the new one is complete, so a reinstall that
    fails leaves the old one working, and jobs keep running on it meanwhile.
    """

    def __init__(self, records: PlatformRecords, host: HostSettings, on_line: LineHandler,
                 progress: ProgressHandler) -> None:
        self.records = records
        self.host = host
        self.on_line = on_line
        self.progress = progress

    def install(self, source: str, force: bool = False) -> InstallReport:
        run = InstallRun()
        try:
            report = self._install(source, force, run)
        except BaseException:
            for undo in reversed(run.undo):
                undo()
            raise
        for remove in run.replaced:
            remove()
        return report

    def _install(self, source: str, force: bool, run: InstallRun) -> InstallReport:
        self.progress("fetch", 5)
        with fetched(source) as (folder, tree):
            component = Component.read(folder)
            if component.name in run.installing:
                cycle = " -> ".join([*run.installing[run.installing.index(component.name):], component.name])
                raise InstallError(f"components require each other in a cycle: {cycle}")
            run.installing.append(component.name)
            for required in component.requires:
                path = (folder / required).resolve()
                if not path.is_relative_to(tree):
                    raise InstallError(f"component '{component.name}' requires '{required}', which is outside {tree}")
                self._install(str(path), False, run)
            skipped: list[str] = []
            worker_name = worker_id = None
            if component.worker is not None:
                worker_name, worker_id = self._install_worker(component, force, skipped, run)
            service_id = None
            if component.service is not None:
                self.progress("register", 90)
                service_id = self._register(component, force, skipped, run)
            run.installing.pop()
            self.progress("done", 100)
            return InstallReport(component.name, worker_name, worker_id, service_id, skipped)

    def _register(self, component: Component, force: bool, skipped: list[str], run: InstallRun) -> str | None:
        _refuse_case_twin("service", component.name, self.records.names(SERVICES))
        existing = self.records.find_service(component.name)
        if existing is not None and not force:
            skipped.append(f"service '{component.name}' is already installed (use force to replace it)")
            return None
        service_id = register_service(self.records, component)
        run.undo.append(lambda: self.records.remove_service(service_id))
        if existing is not None:
            run.replaced.append(lambda: self.records.remove_service(existing.id))
        return service_id

    def _install_worker(self, component: Component, force: bool, skipped: list[str],
                        run: InstallRun) -> tuple[str, str | None]:
        assert component.worker is not None
        worker_folder = component.subfolder(component.worker.get("path", "worker"), "worker.path")
        settings_file = worker_folder / "settings.json"
        try:
            raw_settings = json.loads(settings_file.read_text())
        except (OSError, ValueError) as error:
            raise InstallError(f"worker settings of '{component.name}' cannot be read: {error}") from error
        name = checked_name(raw_settings.get("name", component.name), f"{settings_file}")
        type_name = component.worker.get("type") or raw_settings.get("type")
        environment_type = environment_class(type_name, f"worker '{name}'")
        settings = environment_type.settings_model.parse(raw_settings, f"worker '{name}'")
        _refuse_case_twin("worker", name, self.records.names(WORKERS))
        existing = self.records.find_worker(name)
        if existing is not None and not force:
            skipped.append(f"worker '{name}' is already installed (use force to replace it)")
            return name, existing.id
        in_use = frozenset(_built(existing))
        context = InstallContext(name, worker_folder, self.host, self.on_line, self.progress, in_use=in_use)
        try:
            self.progress("environment", 20)
            built = environment_type.install(context, settings)
            self.progress("upload", 80)
            files = self._upload_worker_files(context, settings)
            worker_id = self.records.create_worker(
                {**raw_settings, **built}, name=name, worker_type=type_name, version=component.version,
                device_id=get_device_id(), worker_files=files,
            )
        except BaseException:
            for cleanup in reversed(context.cleanups):
                cleanup()
            raise
        new = self.records.worker(worker_id)
        run.undo.append(lambda: self.remove_worker(new, keep=in_use))
        if existing is not None:
            run.replaced.append(lambda: self.remove_worker(existing, keep=frozenset(_built(new))))
        return name, worker_id

    def _upload_worker_files(self, context: InstallContext, settings: WorkerSettings) -> dict[str, str]:
        files: dict[str, str] = {}
        for script in dict.fromkeys([*settings.pre_scripts, *settings.post_scripts]):
            path = (context.folder / script).resolve()
            if not path.is_file() or not path.is_relative_to(context.folder.resolve()):
                raise InstallError(f"worker '{context.name}': script '{script}' is not a file in the worker folder")
            files[script] = self._upload(path.read_bytes(), script, context)
        if settings.data_dir:
            folder = (context.folder / settings.data_dir).resolve()
            if not folder.is_dir() or not folder.is_relative_to(context.folder.resolve()):
                raise InstallError(
                    f"worker '{context.name}': data_dir '{settings.data_dir}' is not a folder in the worker"
                )
            archive = zip_directory_to_bytesio(folder).getvalue()
            files[WORKER_DATA_FILE] = self._upload(archive, f"{context.name}-data.zip", context)
        return files

    def _upload(self, content: bytes, filename: str, context: InstallContext) -> str:
        file_id = self.records.upload_component_file(content, filename, {"worker": context.name})
        context.cleanups.append(lambda: self.records.remove_component_file(file_id))
        return file_id

    def remove_worker(self, worker: WorkerRecord, keep: frozenset[str] = frozenset()) -> None:
        """Remove a worker's environment or images (but what `keep` names), its files and its record."""
        with contextlib.suppress(UnknownWorkerType, InvalidRecord):  # a broken record is still removable
            environment_for(worker).remove(keep)
        for file_id in worker.worker_files.values():
            self.records.remove_component_file(file_id)
        self.records.remove_worker(worker.id)

    def remove(self, name: str) -> list[str]:
        """Remove the service and the worker called `name`; return what was removed."""
        removed = []
        service = self.records.find_service(name)
        if service is not None:
            self.records.remove_service(service.id)
            removed.append(f"service '{name}'")
        worker = self.records.find_worker(name)
        if worker is not None:
            self.remove_worker(worker)
            removed.append(f"worker '{name}'")
        return removed


def _refuse_case_twin(kind: str, name: str, installed: list[str]) -> None:
    """Refuse a name that differs only in case from an installed one: both would share a folder on a
    case-insensitive file system and an image tag (tags are lower case)."""
    for other in installed:
        if other != name and other.lower() == name.lower():
            raise InstallError(f"{kind} name '{name}' differs only in case from the installed {kind} '{other}'")


def _built(worker: WorkerRecord | None) -> set[str]:
    """What an installed worker's environment type built for it; nothing for a record it cannot read."""
    if worker is None:
        return set()
    try:
        return environment_for(worker).built()
    except (UnknownWorkerType, InvalidRecord):
        return set()
