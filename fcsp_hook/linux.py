"""The Linux system calls Python's os module lacks: openat2, mount, umount2, setns.

Thin ctypes wrappers that raise OSError with errno, like the os module does.
"""

from __future__ import annotations

import ctypes
import os

# The C library is already loaded; naming it avoids find_library, which runs ldconfig.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

# openat2(2) has the same number on every architecture that has it.
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
CLONE_NEWNS = 0x00020000

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


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    result = _libc.mount(
        os.fsencode(source) if source is not None else None,
        os.fsencode(target),
        os.fsencode(fstype) if fstype is not None else None,
        ctypes.c_ulong(flags),
        None,
    )
    _check(result, f"mount {source} on {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), f"umount {target}")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def fd_path(fd: int) -> str:
    """The magic link through which mount(2) reaches exactly the file an fd holds."""
    return f"/proc/self/fd/{fd}"
