"""Mounting the slot, the library and the generated ld.so.preload into a container.

The hook enters the container's mount namespace (state.pid's at prestart: after the
runtime's mounts exist, before pivot_root) for the mounts and returns to the host's at
once; a hook that cannot return exits rather than write anything more.  Every target is
resolved inside the rootfs (fcsp_hook.hook.rootfs) and mounted onto through its opened
fd.  If any step fails, what was mounted or created is undone before the error is
reported.

The bounded usage file (files.bound_usage) is a mount on the host, made after the
container's mount namespace was copied from the host's: with private propagation the
namespace never sees it by path.  It is cloned on the host (open_tree) and the clone
attached in the container (move_mount), so the tenant writes exactly the file the host reads.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fcsp_hook import linux
from fcsp_hook.errors import FcspError, HookError, UnsafePathError
from fcsp_hook.hook import preload
from fcsp_hook.hook.rootfs import Rootfs
from fcsp_hook.slot import abi

LIBRARY_NAME = "libvgpu.so"
PRELOAD_NAME = "ld.so.preload"
CONTAINER_SLOT_DIR = abi.CONTAINER_SLOT_DIR
CONTAINER_LIBRARY = f"{CONTAINER_SLOT_DIR}/{LIBRARY_NAME}"
CONTAINER_USAGE = f"{CONTAINER_SLOT_DIR}/{abi.USAGE_FILE}"
CONTAINER_MPS = f"{CONTAINER_SLOT_DIR}/{abi.MPS_DIR}"
PRELOAD_PATH = "/etc/ld.so.preload"

READ_ONLY = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
DATA_ONLY = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC


@dataclass(frozen=True)
class MountPlan:
    pid: int
    rootfs: Path
    slot_dir: Path
    library: Path
    # The MPS daemon's client directory (only its control socket), for an MPS tenant.
    mps_client: Path | None = None
    # <slot>/usage is a mount on the host (files.bound_usage): clone it into the container.
    bounded_usage: bool = False


@dataclass
class _Undo:
    """What the child changed in the container, to take back on failure."""

    mounts: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)

    def run(self, rootfs: Rootfs) -> None:
        for target in reversed(self.mounts):
            try:
                fd = rootfs.open(target, linux.O_PATH | os.O_NOFOLLOW)
                try:
                    linux.umount2(linux.fd_path(fd), linux.MNT_DETACH)
                finally:
                    os.close(fd)
            except OSError:
                pass  # the namespace dies with the container the runtime is about to fail
        for path in reversed(self.files):
            rootfs.remove(path, directory=False)
        for path in reversed(self.dirs):
            rootfs.remove(path, directory=True)


def _bind(rootfs: Rootfs, source_fd: int, target: str, flags: int, undo: _Undo) -> None:
    fd = rootfs.open(target, linux.O_PATH | os.O_NOFOLLOW)
    try:
        linux.mount(linux.fd_path(source_fd), linux.fd_path(fd), None, linux.MS_BIND)
    finally:
        os.close(fd)
    undo.mounts.append(target)
    _remount(rootfs, target, flags)


def _attach(rootfs: Rootfs, tree_fd: int, target: str, flags: int, undo: _Undo) -> None:
    """Attach a mount cloned on the host (open_tree) onto target, then set its flags."""
    fd = rootfs.open(target, linux.O_PATH | os.O_NOFOLLOW)
    try:
        linux.move_mount(tree_fd, fd)
    finally:
        os.close(fd)
    undo.mounts.append(target)
    _remount(rootfs, target, flags)


def _remount(rootfs: Rootfs, target: str, flags: int) -> None:
    # A bind mount takes its flags only on a remount, through the new mount's own root.
    fd = rootfs.open(target, linux.O_PATH | os.O_NOFOLLOW)
    try:
        linux.mount(None, linux.fd_path(fd), None, linux.MS_BIND | linux.MS_REMOUNT | flags)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Sources:
    """Host files to mount.  They are opened inside the container's namespace: bind
    mount(2) refuses a source that belongs to another mount namespace, and before
    pivot_root the host's tree is still reachable there by the same paths."""

    slot_dir: int
    usage: int | None  # None: the usage file comes as a host clone (usage_tree)
    library: int
    preload: int
    mps_client: int | None

    @classmethod
    def open(cls, plan: MountPlan) -> _Sources:
        flags = linux.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW
        opened: list[int] = []

        def _open(path: Path, open_flags: int, what: str) -> int:
            try:
                fd = os.open(path, open_flags)
            except OSError as exc:
                raise HookError(f"cannot open {what} {path}: {exc.strerror}") from exc
            opened.append(fd)
            return fd

        try:
            return cls(
                slot_dir=_open(plan.slot_dir, flags | os.O_DIRECTORY, "the slot"),
                usage=None
                if plan.bounded_usage
                else _open(plan.slot_dir / abi.USAGE_FILE, flags, "the usage file"),
                library=_open(plan.library, linux.O_PATH | os.O_CLOEXEC, "the library"),
                preload=_open(plan.slot_dir / PRELOAD_NAME, flags, "the preload file"),
                mps_client=_open(
                    plan.mps_client, flags | os.O_DIRECTORY, "the MPS daemon's client directory"
                )
                if plan.mps_client
                else None,
            )
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise

    def close(self) -> None:
        for fd in (self.slot_dir, self.usage, self.library, self.preload, self.mps_client):
            if fd is not None:
                os.close(fd)


# glibc's libraries where ld.so looks for them: the multiarch directories first, then the
# lib64 and plain lib ones of other distributions.
_TRIPLETS = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
# What a glibc older than 2.34 keeps outside libc.so.6 and the shim references weakly
# (shim/glibc_compat.h), with a function the shim needs from each: its name is in the
# library's dynamic string table, near the start of the file.  glibc >= 2.34 ships both
# as empty stubs that define nothing, and need no loading.
GLIBC_COMPANIONS = {"libdl.so.2": b"dlvsym\0", "libpthread.so.0": b"pthread_key_create\0"}
_HEAD_READ = 64 << 10
_MAX_LINKS = 40  # as the kernel's path walk


def _library_dirs() -> tuple[str, ...]:
    triplet = _TRIPLETS.get(os.uname().machine)
    multiarch = (f"/lib/{triplet}", f"/usr/lib/{triplet}") if triplet else ()
    return (*multiarch, "/lib64", "/usr/lib64", "/lib", "/usr/lib")


def _resolve(rootfs: Rootfs, path: str) -> str | None:
    """path with its links followed inside the rootfs, as the container will follow them
    (an absolute target starts again at the rootfs, '..' stops there); None if it does
    not exist or loops.  Links are read, never opened through, so this works the same
    with and without openat2."""
    done: list[str] = []
    todo = path.split("/")
    links = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        st = rootfs.lstat("/" + "/".join([*done, part]))
        if st is None:
            return None
        if not stat.S_ISLNK(st.st_mode):
            done.append(part)
            continue
        links += 1
        if links > _MAX_LINKS:
            return None
        parent = rootfs.open("/" + "/".join(done), linux.O_PATH | os.O_DIRECTORY)
        try:
            target = os.readlink(part, dir_fd=parent)
        finally:
            os.close(parent)
        if target.startswith("/"):
            done = []
        todo = target.split("/") + todo
    return "/" + "/".join(done)


def _library_head(rootfs: Rootfs, path: str) -> bytes | None:
    """The first bytes of the regular file path names in the image; None if there is none."""
    try:
        resolved = _resolve(rootfs, path)
        if resolved is None:
            return None
        fd = rootfs.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (OSError, FcspError):
        return None
    try:
        return os.read(fd, _HEAD_READ) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    finally:
        os.close(fd)


def glibc_companions(rootfs: Rootfs) -> list[str]:
    """The image's own libdl.so.2 and libpthread.so.0, as the container names them, where
    its glibc (the first libc.so.6 on ld.so's default path) is older than 2.34 and has
    them beside it.  Listed after libvgpu.so in ld.so.preload, they make the shim's
    dlopen and pthread references resolve in every process, not only in those that load
    them anyway; where they are missing the shim still loads and does without them."""
    for directory in _library_dirs():
        if _library_head(rootfs, f"{directory}/libc.so.6") is not None:
            break
    else:
        return []  # no glibc (musl, static programs): ld.so.preload does not apply
    found = []
    for name, needed in GLIBC_COMPANIONS.items():
        head = _library_head(rootfs, f"{directory}/{name}")
        if head is not None and head.startswith(b"\x7fELF") and needed in head:
            found.append(f"{directory}/{name}")
    return found


def _install(rootfs: Rootfs, src: _Sources, usage_tree: int | None, preload_out: int) -> None:
    undo = _Undo()
    try:
        image_preload = rootfs.read_regular_file(PRELOAD_PATH, preload.MAX_IMAGE_PRELOAD_BYTES)
        merged = preload.merge(
            preload.parse_entries(image_preload or b""),
            CONTAINER_LIBRARY,
            glibc_companions(rootfs),
        )
        os.write(preload_out, merged)

        undo.dirs += rootfs.ensure_dir(os.path.dirname(PRELOAD_PATH))
        if rootfs.ensure_regular_file(PRELOAD_PATH):
            undo.files.append(PRELOAD_PATH)
        undo.dirs += rootfs.ensure_dir(CONTAINER_SLOT_DIR)

        _bind(rootfs, src.slot_dir, CONTAINER_SLOT_DIR, READ_ONLY | linux.MS_NOEXEC, undo)
        if usage_tree is not None:
            _attach(rootfs, usage_tree, CONTAINER_USAGE, DATA_ONLY, undo)
        elif src.usage is not None:
            _bind(rootfs, src.usage, CONTAINER_USAGE, DATA_ONLY, undo)
        _bind(rootfs, src.library, CONTAINER_LIBRARY, READ_ONLY, undo)
        _bind(rootfs, src.preload, PRELOAD_PATH, READ_ONLY | linux.MS_NOEXEC, undo)
        if src.mps_client is not None:
            # Read-only: a client only connects to the socket, which a read-only mount allows.
            _bind(rootfs, src.mps_client, CONTAINER_MPS, READ_ONLY | linux.MS_NOEXEC, undo)
    except BaseException:
        undo.run(rootfs)
        raise


def _child(plan: MountPlan, ns_fd: int, usage_tree: int | None, preload_out: int) -> str:
    """Enters the container's mount namespace and installs; returns '' or the one-line
    reason it failed (U: an unsafe path)."""
    try:
        linux.setns(ns_fd, linux.CLONE_NEWNS)
        src = _Sources.open(plan)
        try:
            with Rootfs(plan.rootfs) as rootfs:
                _install(rootfs, src, usage_tree, preload_out)
        finally:
            src.close()
    except UnsafePathError as exc:
        return f"U{exc}"
    except FcspError as exc:
        return f"E{exc}"
    except OSError as exc:
        return f"E{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    except Exception as exc:  # reported, never swallowed: the parent fails the hook with it
        return f"E{type(exc).__name__}: {exc}"
    return ""


def install(plan: MountPlan) -> None:
    """Mount everything into the container; raises FcspError with the reason on failure."""
    try:
        ns_fd = os.open(f"/proc/{plan.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise HookError(
            f"cannot reach the container's mount namespace (pid {plan.pid}): {exc.strerror}"
        ) from exc
    usage_tree = None
    try:
        # Written from inside the namespace, where the image's own entries are read.
        preload_out = os.open(
            plan.slot_dir / PRELOAD_NAME, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        )
    except OSError as exc:
        os.close(ns_fd)
        raise HookError(f"cannot open {exc.filename}: {exc.strerror}") from exc
    try:
        if plan.bounded_usage:
            usage_tree = _clone_usage(plan.slot_dir)
        _in_container(plan, ns_fd, usage_tree, preload_out)
    finally:
        if usage_tree is not None:
            os.close(usage_tree)
        os.close(preload_out)
        os.close(ns_fd)


def _clone_usage(slot_dir: Path) -> int:
    """A detached clone of the host's bounded usage mount, for the child to attach."""
    path = slot_dir / abi.USAGE_FILE
    try:
        return linux.open_tree(
            linux.AT_FDCWD, str(path), linux.OPEN_TREE_CLONE | linux.AT_SYMLINK_NOFOLLOW
        )
    except OSError as exc:
        raise HookError(f"cannot clone the mount of {path}: {exc.strerror}") from exc


def _in_container(plan: MountPlan, ns_fd: int, usage_tree: int | None, preload_out: int) -> None:
    """Enter the container's mount namespace, install, and come back.  The hook is a
    single-threaded process of its own (or a fork of fcsp-hookd for this one request),
    so it may enter a namespace itself: no helper process to fork and wait for."""
    try:
        host = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        cwd = os.open(".", linux.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise HookError(f"cannot hold the host's mount namespace: {exc.strerror}") from exc
    try:
        message = _child(plan, ns_fd, usage_tree, preload_out)
    finally:
        try:
            linux.setns(host, linux.CLONE_NEWNS)
            os.fchdir(cwd)
        except OSError as exc:
            # Nothing more may run in the container's namespace: the paths the hook goes
            # on to write are the host's.
            os.write(2, f"fcsp-hook: cannot return to the host: {exc.strerror}\n".encode())
            os._exit(1)
        os.close(cwd)
        os.close(host)
    if message.startswith("U"):
        raise UnsafePathError(message[1:])
    if message.startswith("E"):
        raise HookError(message[1:])
