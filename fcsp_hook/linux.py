"""The Linux system calls Python's os module lacks: openat2, mount, umount2, setns,
open_tree and move_mount.

Thin ctypes wrappers that raise OSError with errno, like the os module does.
"""

from __future__ import annotations

import ctypes
import errno
import os

# The C library is already loaded; naming it avoids find_library, which runs ldconfig.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

# These have the same number on every architecture (the table shared since Linux 5.1).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_OPENAT2 = 437

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
CLONE_NEWNS = 0x00020000
CAP_SYS_ADMIN = 21

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
OPEN_TREE_CLONE = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40

O_PATH = getattr(os, "O_PATH", 0o10000000)


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    how = _OpenHow(flags, mode, resolve)
    result = _syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    return _check(result, f"openat2 {path}")


def has_openat2() -> bool:
    """openat2 exists from Linux 5.6; older kernels answer ENOSYS."""
    try:
        os.close(openat2(-100, "/", os.O_RDONLY | O_PATH | os.O_CLOEXEC, 0, 0))
    except OSError:
        return False
    return True


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    result = _libc.mount(
        os.fsencode(source) if source is not None else None,
        os.fsencode(target),
        os.fsencode(fstype) if fstype is not None else None,
        ctypes.c_ulong(flags),
        os.fsencode(data) if data is not None else None,
    )
    _check(result, f"mount {source} on {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), f"umount {target}")


def open_tree(dirfd: int, path: str, flags: int) -> int:
    """A detached copy of the mount at path (OPEN_TREE_CLONE), held by the returned fd:
    unlike a path, it can be attached in another mount namespace (move_mount), whatever
    the propagation between the two.  Linux 5.2+; older kernels answer ENOSYS."""
    result = _syscall(
        ctypes.c_long(SYS_OPEN_TREE),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.c_uint(flags | os.O_CLOEXEC),
    )
    return _check(result, f"open_tree {path}")


def move_mount(tree_fd: int, target_fd: int) -> None:
    """Attach the detached mount tree_fd holds onto the file or directory target_fd holds."""
    result = _syscall(
        ctypes.c_long(SYS_MOVE_MOUNT),
        ctypes.c_int(tree_fd),
        ctypes.c_char_p(b""),
        ctypes.c_int(target_fd),
        ctypes.c_char_p(b""),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
    )
    _check(result, "move_mount")


_may_mount: bool | None = None


def may_mount() -> bool:
    """Whether this process may make mount system calls: CAP_SYS_ADMIN in effect, and no
    seccomp filter that stops them (systemd's SystemCallFilter=~@mount, which
    fcsp-observer.service has, answers a umount2 with SIGSYS: a killed process).  Ask this
    before any mount, umount2, open_tree or move_mount in code such a process runs."""
    global _may_mount  # noqa: PLW0603  # asked once per process
    if _may_mount is None:
        _may_mount = _status_allows_mounts()
    return _may_mount


def _status_allows_mounts() -> bool:
    try:
        with open("/proc/self/status", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    try:
        effective = int(fields[b"CapEff"], 16)
        seccomp = int(fields.get(b"Seccomp", b"0"))
    except (KeyError, ValueError):
        return False
    if not effective >> CAP_SYS_ADMIN & 1:
        return False  # without it every mount call fails; skipping them is the same
    return seccomp == 0 or _umount2_survives()


def _umount2_survives() -> bool:
    """Under a seccomp filter, which may kill for a mount call or fail it: a harmless
    umount2 (of the empty path: ENOENT) in a child, and how the child ended."""
    try:
        pid = os.fork()
    except OSError:
        return False
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            umount2("", MNT_DETACH)
        except OSError as exc:
            code = 0 if exc.errno == errno.ENOENT else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def has_open_tree() -> bool:
    """open_tree and move_mount exist from Linux 5.2; older kernels answer ENOSYS.
    A mount system call itself: only where may_mount()."""
    try:
        os.close(open_tree(AT_FDCWD, "/", 0))
    except OSError:
        return False
    return True


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def fd_path(fd: int) -> str:
    """The magic link through which mount(2) reaches exactly the file an fd holds."""
    return f"/proc/self/fd/{fd}"
