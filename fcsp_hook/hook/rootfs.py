"""Paths inside an untrusted container rootfs, resolved without ever leaving it.

The image controls every symlink in the rootfs while the hook runs as root on the
host (CVE-2024-0132 class).  With openat2 RESOLVE_IN_ROOT, links are resolved as
the container itself will see them, clamped to the rootfs.  On kernels without
openat2, paths are walked one component at a time with O_NOFOLLOW and any link is
refused.  The file a mount lands on is always the opened fd, never a path string.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fcsp_hook import linux
from fcsp_hook.errors import UnsafePathError

_DIR_FLAGS = linux.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def _parts(path: str) -> list[str]:
    parts = PurePosixPath("/", path).parts[1:]
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"{path}: '..' is not allowed in a container path")
    return list(parts)


@dataclass
class Rootfs:
    """An open container rootfs.  Paths given to it are as the container sees them."""

    path: Path
    fd: int = field(init=False)
    in_root: bool = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.fd = os.open(self.path, _DIR_FLAGS)
        except OSError as exc:
            raise UnsafePathError(
                f"cannot open the container rootfs {self.path}: {exc.strerror}"
            ) from exc
        self.in_root = linux.has_openat2()

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Rootfs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, path: str, flags: int, mode: int = 0) -> int:
        """Open path inside the rootfs.  Add os.O_NOFOLLOW to refuse a link as the last part."""
        parts = _parts(path)
        if self.in_root:
            resolve = linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS
            return linux.openat2(
                self.fd, "/".join(parts) or ".", flags | os.O_CLOEXEC, mode, resolve
            )
        return self._walk(parts, flags, mode)

    def _walk(self, parts: list[str], flags: int, mode: int) -> int:
        parent = os.dup(self.fd)
        try:
            for part in parts[:-1]:
                try:
                    child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and self._is_link(parent, part):
                        raise UnsafePathError(
                            f"/{'/'.join(parts)}: '{part}' is a symlink, which this kernel "
                            "(no openat2) cannot resolve safely"
                        ) from exc
                    raise
                os.close(parent)
                parent = child
            last = parts[-1] if parts else "."
            return os.open(last, flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode, dir_fd=parent)
        finally:
            os.close(parent)

    @staticmethod
    def _is_link(dir_fd: int, name: str) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def lstat(self, path: str) -> os.stat_result | None:
        """stat the last part without following it; None when it does not exist."""
        try:
            fd = self.open(path, linux.O_PATH | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def ensure_dir(self, path: str) -> list[str]:
        """Create path's missing directories; returns those created, outermost first.

        A link to a directory inside the rootfs (/run -> /var/run) is followed, as the
        container will follow it.
        """
        created: list[str] = []
        parts = _parts(path)
        for depth in range(1, len(parts) + 1):
            current = "/" + "/".join(parts[:depth])
            try:
                os.close(self.open(current, _DIR_FLAGS))
                continue
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise UnsafePathError(
                    f"{current} in the image is not a directory we can use: {exc.strerror}"
                ) from exc
            if self.lstat(current) is not None:
                raise UnsafePathError(f"{current} in the image is a symlink that leads nowhere")
            parent = self.open("/" + "/".join(parts[: depth - 1]), _DIR_FLAGS)
            try:
                os.mkdir(parts[depth - 1], 0o755, dir_fd=parent)
            finally:
                os.close(parent)
            created.append(current)
        return created

    def ensure_regular_file(self, path: str) -> bool:
        """Make path a regular file to mount onto; True if it was created.

        A symlink here is refused: mounting through it would cover whatever it names
        (/etc/ld.so.preload -> /etc/passwd).
        """
        st = self.lstat(path)
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePathError(
                    f"{path} in the image is a symlink; refusing to mount over it"
                )
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(f"{path} in the image is not a regular file")
            return False
        head, name = os.path.split(path)
        parent = self.open(head, _DIR_FLAGS)
        try:
            os.close(
                os.open(
                    name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=parent,
                )
            )
        finally:
            os.close(parent)
        return True

    def read_regular_file(self, path: str, limit: int) -> bytes | None:
        """Read at most limit bytes of a regular file; None when absent."""
        st = self.lstat(path)
        if st is None:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"{path} in the image is a symlink; refusing to follow it")
        fd = self.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePathError(f"{path} in the image is not a regular file")
            return os.read(fd, limit)
        finally:
            os.close(fd)

    def remove(self, path: str, *, directory: bool) -> None:
        """Undo ensure_*: remove what we created, if it is still there."""
        head, name = os.path.split(path)
        with contextlib.suppress(OSError):
            parent = self.open(head, _DIR_FLAGS)
            try:
                os.unlink(name, dir_fd=parent) if not directory else os.rmdir(name, dir_fd=parent)
            finally:
                os.close(parent)
