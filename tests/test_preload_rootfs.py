"""The merged ld.so.preload, and path resolution inside a hostile rootfs (no container:
these run on plain directories, with and without openat2)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcsp_hook import linux
from fcsp_hook.errors import UnsafePathError
from fcsp_hook.hook import preload
from fcsp_hook.hook.rootfs import Rootfs

LIB = "/run/fcsp/libvgpu.so"


def test_merge_puts_the_shim_first_and_keeps_image_entries() -> None:
    """The shim comes first; the image's entries follow once each, in their order."""
    entries = preload.parse_entries(b"/lib/a.so /lib/b.so:/lib/a.so\n\t/run/fcsp/libvgpu.so\n")
    assert preload.merge(entries, LIB) == b"/run/fcsp/libvgpu.so\n/lib/a.so\n/lib/b.so\n"


def test_empty_image_preload() -> None:
    """No image entries: the file names the shim alone."""
    assert preload.merge(preload.parse_entries(b""), LIB) == b"/run/fcsp/libvgpu.so\n"


@pytest.fixture(params=["openat2", "walk"])
def open_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Rootfs, Path]]:
    """A rootfs opened with openat2 RESOLVE_IN_ROOT, and with the no-openat2 fallback."""
    if request.param == "openat2" and not linux.has_openat2():
        pytest.skip("this kernel has no openat2")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    with Rootfs(root) as rootfs:
        rootfs.in_root = request.param == "openat2"
        yield rootfs, root


def test_regular_preload_is_read(open_root: tuple[Rootfs, Path]) -> None:
    """A regular /etc/ld.so.preload is read; an absent one is None."""
    rootfs, root = open_root
    assert rootfs.read_regular_file("/etc/ld.so.preload", 100) is None
    (root / "etc" / "ld.so.preload").write_text("/lib/x.so\n")
    assert rootfs.read_regular_file("/etc/ld.so.preload", 100) == b"/lib/x.so\n"


def test_preload_link_to_host_file_is_refused(
    open_root: tuple[Rootfs, Path], tmp_path: Path
) -> None:
    """A link as the last component is refused for reading and for mounting over."""
    rootfs, root = open_root
    secret = tmp_path / "secret"
    secret.write_text("host\n")
    (root / "etc" / "ld.so.preload").symlink_to(secret)
    with pytest.raises(UnsafePathError, match="symlink"):
        rootfs.read_regular_file("/etc/ld.so.preload", 100)
    with pytest.raises(UnsafePathError, match="symlink"):
        rootfs.ensure_regular_file("/etc/ld.so.preload")
    assert secret.read_text() == "host\n"


def test_created_files_stay_inside(open_root: tuple[Rootfs, Path]) -> None:
    """ensure_dir/ensure_regular_file create inside the rootfs and say what they created."""
    rootfs, root = open_root
    assert rootfs.ensure_dir("/run/fcsp") == ["/run", "/run/fcsp"]
    assert rootfs.ensure_dir("/run/fcsp") == []
    assert rootfs.ensure_regular_file("/etc/ld.so.preload") is True
    assert rootfs.ensure_regular_file("/etc/ld.so.preload") is False
    assert (root / "run" / "fcsp").is_dir()
    assert (root / "etc" / "ld.so.preload").is_file()
    rootfs.remove("/etc/ld.so.preload", directory=False)
    rootfs.remove("/run/fcsp", directory=True)
    assert not (root / "etc" / "ld.so.preload").exists()
    assert not (root / "run" / "fcsp").exists()


def test_dotdot_is_refused(open_root: tuple[Rootfs, Path]) -> None:
    """A '..' in a path we are given is refused outright."""
    rootfs, _ = open_root
    with pytest.raises(UnsafePathError, match=r"'\.\.'"):
        rootfs.ensure_dir("/run/../../etc")


def test_absolute_dir_link_resolves_inside_or_is_refused(
    open_root: tuple[Rootfs, Path], tmp_path: Path
) -> None:
    """/etc -> /elsewhere: with openat2 it lands in <rootfs>/elsewhere; without, it is refused.
    Either way the host's /elsewhere is untouched."""
    rootfs, root = open_root
    host_dir = tmp_path / "elsewhere"
    host_dir.mkdir()
    (root / "etc").rmdir()
    (root / "elsewhere").mkdir()
    (root / "etc").symlink_to(str(host_dir))  # absolute: names a real host directory
    inside = root / str(host_dir).lstrip("/")
    inside.mkdir(parents=True)
    if rootfs.in_root:
        assert rootfs.ensure_regular_file("/etc/ld.so.preload") is True
        assert (inside / "ld.so.preload").is_file()
    else:
        with pytest.raises(UnsafePathError, match="symlink"):
            rootfs.ensure_regular_file("/etc/ld.so.preload")
    assert list(host_dir.iterdir()) == []


def test_relative_link_cannot_climb_out(open_root: tuple[Rootfs, Path], tmp_path: Path) -> None:
    """/etc -> ../../../../x never reaches a directory above the rootfs."""
    rootfs, root = open_root
    (root / "etc").rmdir()
    (root / "etc").symlink_to("../../../../../../../" + str(tmp_path).lstrip("/"))
    with pytest.raises(UnsafePathError):
        rootfs.ensure_dir("/etc")
    assert not (tmp_path / "ld.so.preload").exists()


def test_dangling_dir_link_is_refused(open_root: tuple[Rootfs, Path]) -> None:
    """A link to nowhere is not silently replaced by a directory."""
    rootfs, root = open_root
    (root / "run").symlink_to("/nowhere")
    with pytest.raises(UnsafePathError):
        rootfs.ensure_dir("/run/fcsp")
    assert not (root / "nowhere").exists()


def test_fifo_is_not_read(open_root: tuple[Rootfs, Path]) -> None:
    """A FIFO in place of /etc/ld.so.preload is refused instead of blocking the hook."""
    rootfs, root = open_root
    os.mkfifo(root / "etc" / "ld.so.preload")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        rootfs.read_regular_file("/etc/ld.so.preload", 100)
