"""The merged ld.so.preload, and path resolution inside a hostile rootfs (no container:
these run on plain directories, with and without openat2)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcsp_hook import linux
from fcsp_hook.errors import UnsafePathError
from fcsp_hook.hook import mounts, preload
from fcsp_hook.hook.rootfs import Rootfs

LIB = "/run/fcsp/libvgpu.so"


def test_merge_puts_the_shim_first_and_keeps_image_entries() -> None:
    """The shim comes first; the image's entries follow once each, in their order."""
    entries = preload.parse_entries(b"/lib/a.so /lib/b.so:/lib/a.so\n\t/run/fcsp/libvgpu.so\n")
    assert preload.merge(entries, LIB) == b"/run/fcsp/libvgpu.so\n/lib/a.so\n/lib/b.so\n"


def test_empty_image_preload() -> None:
    """No image entries: the file names the shim alone."""
    assert preload.merge(preload.parse_entries(b""), LIB) == b"/run/fcsp/libvgpu.so\n"


def test_glibc_companions_follow_the_shim() -> None:
    """An old glibc's libdl and libpthread come right after the shim, whose dlsym must be
    the first one found, and before the image's entries; each file once."""
    dl, pthread = "/lib/x86_64-linux-gnu/libdl.so.2", "/lib/x86_64-linux-gnu/libpthread.so.0"
    entries = preload.parse_entries(f"/lib/a.so {dl}\n".encode())
    assert (
        preload.merge(entries, LIB, [dl, pthread])
        == f"{LIB}\n{dl}\n{pthread}\n/lib/a.so\n".encode()
    )


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


# The start of a glibc library: an ELF header and the names it defines, which for
# glibc >= 2.34's libdl.so.2 and libpthread.so.0 (empty stubs) are placeholders only.
OLD_LIBRARY = b"\x7fELF\x02\x01\x01" + b"\0" * 64 + b"dlopen\0dlvsym\0pthread_key_create\0"
STUB_LIBRARY = b"\x7fELF\x02\x01\x01" + b"\0" * 64 + b"__libdl_version_placeholder\0"
MULTIARCH = "/lib/x86_64-linux-gnu"


def _glibc(root: Path, directory: str, libdl: bytes | None, libpthread: bytes | None) -> None:
    """libc.so.6 in directory, with libdl and libpthread as versioned files behind links."""
    lib = root / directory.lstrip("/")
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "libc-2.31.so").write_bytes(OLD_LIBRARY)
    (lib / "libc.so.6").symlink_to("libc-2.31.so")
    for name, content in (("libdl.so.2", libdl), ("libpthread.so.0", libpthread)):
        if content is not None:
            (lib / f"{name}.real").write_bytes(content)
            (lib / name).symlink_to(f"{name}.real")


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="multiarch paths of x86_64")
@pytest.mark.parametrize(
    ("libdl", "libpthread", "listed"),
    [
        (OLD_LIBRARY, OLD_LIBRARY, ["libdl.so.2", "libpthread.so.0"]),
        (STUB_LIBRARY, STUB_LIBRARY, []),
        (None, None, []),
        (OLD_LIBRARY, None, ["libdl.so.2"]),
    ],
    ids=["old-glibc", "glibc-2.34-stubs", "neither", "libdl-only"],
)
def test_an_old_glibcs_libdl_and_libpthread_are_found(
    open_root: tuple[Rootfs, Path], libdl: bytes | None, libpthread: bytes | None, listed: list[str]
) -> None:
    """The hook lists the image's own libdl.so.2 and libpthread.so.0 where they sit beside
    its libc.so.6 and are the real libraries of a glibc older than 2.34, as the container
    names them; glibc 2.34's empty stubs and missing files are left out."""
    rootfs, root = open_root
    _glibc(root, MULTIARCH, libdl, libpthread)
    assert mounts.glibc_companions(rootfs) == [f"{MULTIARCH}/{name}" for name in listed]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="multiarch paths of x86_64")
@pytest.mark.parametrize("target", ["usr/lib", "/usr/lib"])
def test_glibc_behind_a_merged_usr_is_found(open_root: tuple[Rootfs, Path], target: str) -> None:
    """/lib -> usr/lib (relative or absolute): links are followed inside the rootfs, with
    or without openat2, and the path listed is the one the container's ld.so looks up."""
    rootfs, root = open_root
    _glibc(root, "/usr" + MULTIARCH, OLD_LIBRARY, OLD_LIBRARY)
    (root / "lib").symlink_to(target)
    assert mounts.glibc_companions(rootfs) == [
        f"{MULTIARCH}/libdl.so.2",
        f"{MULTIARCH}/libpthread.so.0",
    ]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="multiarch paths of x86_64")
def test_a_companion_linked_out_of_the_rootfs_is_not_followed_there(
    open_root: tuple[Rootfs, Path], tmp_path: Path
) -> None:
    """libdl.so.2 -> an absolute path that exists on the host but not in the image: it is
    resolved inside the rootfs, found missing and not listed (the host's file is never
    read); a link loop is not listed either."""
    rootfs, root = open_root
    _glibc(root, MULTIARCH, None, None)
    host = tmp_path / "host-libdl.so.2"
    host.write_bytes(OLD_LIBRARY)
    lib = root / MULTIARCH.lstrip("/")
    (lib / "libdl.so.2").symlink_to(host)
    (lib / "libpthread.so.0").symlink_to("libpthread.so.0")
    assert mounts.glibc_companions(rootfs) == []


def test_an_image_without_glibc_has_no_companions(open_root: tuple[Rootfs, Path]) -> None:
    """musl or static images: no libc.so.6, nothing listed (ld.so.preload does not apply)."""
    rootfs, root = open_root
    (root / "lib").mkdir()
    (root / "lib" / "libdl.so.2").write_bytes(OLD_LIBRARY)
    assert mounts.glibc_companions(rootfs) == []


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="multiarch paths of x86_64")
def test_this_hosts_glibc_stubs_are_not_listed(open_root: tuple[Rootfs, Path]) -> None:
    """glibc >= 2.34 (this host's, Debian 12's 2.36) ships libdl.so.2 and libpthread.so.0
    as stubs that define nothing: an image that has them needs neither preloaded."""
    host = Path("/lib/x86_64-linux-gnu")
    if b"__libdl_version_placeholder" not in (host / "libdl.so.2").read_bytes():
        pytest.skip("this host's glibc is older than 2.34")
    rootfs, root = open_root
    _glibc(root, MULTIARCH, None, None)
    for name in ("libc.so.6", "libdl.so.2", "libpthread.so.0"):
        (root / MULTIARCH.lstrip("/") / name).unlink(missing_ok=True)
        (root / MULTIARCH.lstrip("/") / name).write_bytes((host / name).read_bytes())
    assert mounts.glibc_companions(rootfs) == []
