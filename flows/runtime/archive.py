"""The one safe extractor for every archive this runtime opens (service modules, worker data, components).

An archive comes from the platform database or from a component author, so it is untrusted: entries
that would land outside the destination (absolute paths, `..`), links and special files are refused,
and the extracted size and file count are bounded so that a zip bomb stops early.
"""

from __future__ import annotations

import io
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from flows.runtime.errors import ArchiveError

CHUNK_BYTES = 1024 * 1024
ENCRYPTED_FLAG = 0x1
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
CORRUPT_ARCHIVE_ERRORS = (
    zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError, RuntimeError,
    struct.error, IndexError, KeyError, OverflowError,
)
"""What the standard library raises for a damaged archive (the zip module raises RuntimeError and its subclass
NotImplementedError for flags and versions it does not handle, and IndexError and KeyError from its parsers)."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Upper bounds for one extraction."""

    max_total_bytes: int = 4 * 1024**3
    max_files: int = 50_000


@dataclass(frozen=True)
class _Entry:
    name: str
    is_directory: bool
    declared_size: int
    executable: bool = False
    """The owner's execute bit as archived: services may ship a binary or a script they run."""


def _safe_relative_path(name: str) -> PurePosixPath:
    """The entry's path inside the destination, or ArchiveError when it would escape it."""
    normalised = name.replace("\\", "/")
    path = PurePosixPath(normalised)
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        raise ArchiveError(f"archive entry '{name}' has an absolute path")
    if ".." in path.parts:
        raise ArchiveError(f"archive entry '{name}' escapes the destination folder")
    return PurePosixPath(*[part for part in path.parts if part not in ("", ".")])


class _Extraction:
    """Writes entries below one folder while counting files and bytes against the limits."""

    def __init__(self, destination: Path, limits: ArchiveLimits) -> None:
        self.destination = destination.resolve()
        self.limits = limits
        self.files = 0
        self.bytes_written = 0

    def target(self, entry: _Entry) -> Path | None:
        relative = _safe_relative_path(entry.name)
        if not relative.parts:
            return None
        target = self.destination.joinpath(*relative.parts)
        if not target.resolve().is_relative_to(self.destination):
            raise ArchiveError(f"archive entry '{entry.name}' escapes the destination folder")
        return target

    def count(self, entry: _Entry) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise ArchiveError(f"archive has more than {self.limits.max_files} entries")
        if self.bytes_written + entry.declared_size > self.limits.max_total_bytes:
            raise ArchiveError(f"archive expands to more than {self.limits.max_total_bytes} bytes")

    def extract(self, entry: _Entry, open_content: Callable[[], IO[bytes]]) -> None:
        """Check one entry against the folder and the limits, then create its folder or write its file."""
        target = self.target(entry)
        self.count(entry)
        if target is None:
            return
        if entry.is_directory:
            target.mkdir(parents=True, exist_ok=True)
            return
        with open_content() as content:
            self.write(target, content)
        if entry.executable:
            mode = target.stat().st_mode
            target.chmod(mode | (mode & 0o444) >> 2)

    def write(self, target: Path, source: IO[bytes]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as output:
            while chunk := source.read(CHUNK_BYTES):
                self.bytes_written += len(chunk)
                if self.bytes_written > self.limits.max_total_bytes:
                    raise ArchiveError(f"archive expands to more than {self.limits.max_total_bytes} bytes")
                output.write(chunk)


def _extract_zip(source: BinaryIO, extraction: _Extraction) -> None:
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"archive entry '{info.filename}' is a symbolic link")
            if info.flag_bits & ENCRYPTED_FLAG:
                raise ArchiveError(f"archive entry '{info.filename}' is encrypted")
            if info.compress_type not in ZIP_METHODS:
                raise ArchiveError(f"archive entry '{info.filename}' uses compression method {info.compress_type}, "
                                   "which is not supported")
            entry = _Entry(info.filename, info.is_dir(), info.file_size, bool(mode & stat.S_IXUSR))
            extraction.extract(entry, lambda info=info: archive.open(info))


def _extract_tar(source: BinaryIO, extraction: _Extraction) -> None:
    with tarfile.open(fileobj=source, mode="r:*") as archive:
        for member in archive:
            if not (member.isfile() or member.isdir()):
                raise ArchiveError(f"archive entry '{member.name}' is a link or special file")
            extraction.extract(
                _Entry(member.name, member.isdir(), member.size, bool(member.mode & stat.S_IXUSR)),
                lambda member=member: _tar_member(archive, member),
            )


def _tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    content = archive.extractfile(member)
    if content is None:
        raise ArchiveError(f"archive entry '{member.name}' cannot be read")
    return content


@contextmanager
def _opened(source: bytes | Path) -> Iterator[BinaryIO]:
    if isinstance(source, bytes):
        yield io.BytesIO(source)
    else:
        with open(source, "rb") as stream:
            yield stream


def extract_archive(source: bytes | Path, destination: Path, limits: ArchiveLimits | None = None) -> None:
    """Extract a zip or tar (optionally compressed) archive below `destination`, or raise ArchiveError."""
    destination.mkdir(parents=True, exist_ok=True)
    extraction = _Extraction(destination, limits or ArchiveLimits())
    try:
        with _opened(source) as stream:
            if zipfile.is_zipfile(stream):
                stream.seek(0)
                _extract_zip(stream, extraction)
                return
            stream.seek(0)
            _extract_tar(stream, extraction)
    except ArchiveError:
        raise
    except CORRUPT_ARCHIVE_ERRORS as error:
        raise ArchiveError(f"archive is corrupt or not a zip/tar file: {type(error).__name__}: {error}") from error
