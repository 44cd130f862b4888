"""The one safe extractor: what it refuses, and that it writes nothing outside its folder."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def test_an_executable_file_stays_executable_and_others_do_not_become_so(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, mode in (("bin/tool", 0o755), ("data.txt", 0o644)):
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            archive.writestr(info, b"#!/bin/sh\necho hi\n")

    def add(archive: tarfile.TarFile) -> None:
        for name, mode in (("bin/tool", 0o755), ("data.txt", 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = 3, mode
            archive.addfile(info, io.BytesIO(b"abc"))

    for kind, content in (("zip", buffer.getvalue()), ("tar", tar_bytes(add))):
        extract_archive(content, tmp_path / kind)
        assert os.access(tmp_path / kind / "bin" / "tool", os.X_OK), kind
        assert not os.access(tmp_path / kind / "data.txt", os.X_OK), kind


def patched_zip(flag_bits: int = 0, compress_type: int | None = None) -> bytes:
    """A one-file zip whose entry claims to be encrypted, or to use a compression method nobody implements."""
    content = bytearray(zip_bytes({"module/__init__.py": b"x = 1\n" * 50}))
    for signature, flags_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        start = content.index(signature)
        if flag_bits:
            content[start + flags_at] |= flag_bits
        if compress_type is not None:
            content[start + method_at:start + method_at + 2] = compress_type.to_bytes(2, "little")
    return bytes(content)


@pytest.mark.parametrize(("content", "message"), [
    (patched_zip(flag_bits=0x1), "encrypted"),
    (patched_zip(compress_type=99), "compression method"),
    (b"\xfd7zXZ\x00\x00" + b"\x00" * 64, "corrupt"),
    (b"BZh91AY&SY" + b"\x00" * 64, "corrupt"),
])
def test_encrypted_unsupported_and_corrupt_compressed_archives_get_the_extractors_own_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    with pytest.raises(ArchiveError, match=message):
        extract_archive(content, tmp_path)


def valid_archives() -> list[bytes]:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("module/__init__.py")
        info.size = 6
        archive.addfile(info, io.BytesIO(b"x = 1\n"))

    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w:xz") as archive:
        add(archive)
    return [zip_bytes({"module/__init__.py": b"x = 1\n", "registry/a.txt": b"a"}), tar_bytes(add), plain.getvalue()]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_archives_raise_only_the_extractors_error(tmp_path_factory: pytest.TempPathFactory,
                                                          data: st.DataObject) -> None:
    original = bytearray(data.draw(st.sampled_from(valid_archives())))
    for position in data.draw(st.lists(st.integers(0, len(original) - 1), min_size=1, max_size=8)):
        original[position] = data.draw(st.integers(0, 255))
    destination = tmp_path_factory.mktemp("fuzz")

    with contextlib.suppress(ArchiveError):
        extract_archive(bytes(original), destination)
    assert all(path.resolve().is_relative_to(destination.resolve()) for path in destination.rglob("*"))


@settings(max_examples=500, deadline=None)
@given(content=st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_the_extractors_error(tmp_path_factory: pytest.TempPathFactory,
                                                         content: bytes) -> None:
    with contextlib.suppress(ArchiveError):
        extract_archive(content, tmp_path_factory.mktemp("bytes"))
