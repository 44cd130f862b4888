"""The one safe extractor: what it refuses, and that it writes nothing outside its folder."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from flows.runtime.archive import ArchiveLimits, extract_archive
from flows.runtime.errors import ArchiveError


def zip_bytes(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def tar_bytes(add: callable) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        add(archive)
    return buffer.getvalue()


def test_zip_and_tar_archives_are_extracted_with_their_folders(tmp_path: Path) -> None:
    extract_archive(zip_bytes({"pkg/__init__.py": b"x = 1\n", "pkg/sub/data.txt": b"data"}), tmp_path / "zip")

    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("pkg/module.py")
        info.size = 4
        archive.addfile(info, io.BytesIO(b"y=2\n"))

    extract_archive(tar_bytes(add), tmp_path / "tar")

    assert (tmp_path / "zip" / "pkg" / "sub" / "data.txt").read_bytes() == b"data"
    assert (tmp_path / "tar" / "pkg" / "module.py").read_bytes() == b"y=2\n"


@pytest.mark.parametrize("name", ["../escape.py", "pkg/../../escape.py", "/etc/escape.py", "C:/escape.py"])
def test_entries_that_would_land_outside_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    destination = tmp_path / "out"

    with pytest.raises(ArchiveError):
        extract_archive(zip_bytes({name: b"evil"}), destination)

    assert not (tmp_path / "escape.py").exists()


def test_symbolic_links_in_zip_and_tar_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="symbolic link"):
        extract_archive(zip_bytes({}, symlinks={"link": "/etc/passwd"}), tmp_path / "zip")

    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        archive.addfile(info)

    with pytest.raises(ArchiveError, match="link"):
        extract_archive(tar_bytes(add), tmp_path / "tar")


def test_a_zip_bomb_stops_at_the_size_limit(tmp_path: Path) -> None:
    bomb = zip_bytes({"zeros.bin": b"\0" * 5_000_000})

    with pytest.raises(ArchiveError, match="expands to more than"):
        extract_archive(bomb, tmp_path, ArchiveLimits(max_total_bytes=1_000_000))


def test_too_many_entries_are_refused(tmp_path: Path) -> None:
    many = zip_bytes({f"file{index}.txt": b"" for index in range(20)})

    with pytest.raises(ArchiveError, match="more than 10 entries"):
        extract_archive(many, tmp_path, ArchiveLimits(max_files=10))


def test_a_corrupt_archive_gets_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="corrupt"):
        extract_archive(b"PK\x03\x04 this is not really a zip", tmp_path)
