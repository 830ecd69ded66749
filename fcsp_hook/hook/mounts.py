"""Mounting the slot, the library and the generated ld.so.preload into a container.

Runs in a forked child that enters the container's mount namespace (state.pid at
prestart: after the runtime's mounts exist, before pivot_root), so the hook itself
stays in the host's.  Every target is resolved inside the rootfs (fcsp_hook.hook.rootfs)
and mounted onto through its opened fd.  If any step fails, what was mounted or
created is undone before the error is reported.
"""

from __future__ import annotations

import os
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
    usage: int
    library: int
    preload: int
    mps_client: int | None

    @classmethod
    def open(cls, plan: MountPlan) -> _Sources:
        flags = linux.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            return cls(
                slot_dir=os.open(plan.slot_dir, flags | os.O_DIRECTORY),
                usage=os.open(plan.slot_dir / abi.USAGE_FILE, flags),
                library=os.open(plan.library, linux.O_PATH | os.O_CLOEXEC),
                preload=os.open(plan.slot_dir / PRELOAD_NAME, flags),
                mps_client=os.open(plan.mps_client, flags | os.O_DIRECTORY)
                if plan.mps_client
                else None,
            )
        except OSError as exc:
            raise HookError(f"cannot open {exc.filename}: {exc.strerror}") from exc

    def close(self) -> None:
        for fd in (self.slot_dir, self.usage, self.library, self.preload, self.mps_client):
            if fd is not None:
                os.close(fd)


def _install(rootfs: Rootfs, src: _Sources, preload_out: int) -> None:
    undo = _Undo()
    try:
        image_preload = rootfs.read_regular_file(PRELOAD_PATH, preload.MAX_IMAGE_PRELOAD_BYTES)
        merged = preload.merge(preload.parse_entries(image_preload or b""), CONTAINER_LIBRARY)
        os.write(preload_out, merged)

        undo.dirs += rootfs.ensure_dir(os.path.dirname(PRELOAD_PATH))
        if rootfs.ensure_regular_file(PRELOAD_PATH):
            undo.files.append(PRELOAD_PATH)
        undo.dirs += rootfs.ensure_dir(CONTAINER_SLOT_DIR)

        _bind(rootfs, src.slot_dir, CONTAINER_SLOT_DIR, READ_ONLY | linux.MS_NOEXEC, undo)
        _bind(rootfs, src.usage, CONTAINER_USAGE, DATA_ONLY, undo)
        _bind(rootfs, src.library, CONTAINER_LIBRARY, READ_ONLY, undo)
        _bind(rootfs, src.preload, PRELOAD_PATH, READ_ONLY | linux.MS_NOEXEC, undo)
        if src.mps_client is not None:
            # Read-only: a client only connects to the socket, which a read-only mount allows.
            _bind(rootfs, src.mps_client, CONTAINER_MPS, READ_ONLY | linux.MS_NOEXEC, undo)
    except BaseException:
        undo.run(rootfs)
        raise


def _child(plan: MountPlan, ns_fd: int, preload_out: int) -> str:
    """Runs in the forked child; returns '' or the one-line reason it failed."""
    try:
        linux.setns(ns_fd, linux.CLONE_NEWNS)
        src = _Sources.open(plan)
        try:
            with Rootfs(plan.rootfs) as rootfs:
                _install(rootfs, src, preload_out)
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
    try:
        # Written from inside the namespace, where the image's own entries are read.
        preload_out = os.open(
            plan.slot_dir / PRELOAD_NAME, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        )
    except OSError as exc:
        os.close(ns_fd)
        raise HookError(f"cannot open {exc.filename}: {exc.strerror}") from exc
    try:
        _fork_child(plan, ns_fd, preload_out)
    finally:
        os.close(preload_out)
        os.close(ns_fd)


def _fork_child(plan: MountPlan, ns_fd: int, preload_out: int) -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child; its effects are tested end to end
        os.close(read_end)
        code = 0
        try:
            os.write(write_end, _child(plan, ns_fd, preload_out).encode("utf-8", "replace"))
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read(4096).decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    if message.startswith("U"):
        raise UnsafePathError(message[1:])
    if message.startswith("E"):
        raise HookError(message[1:])
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise HookError("the mount helper process died")
