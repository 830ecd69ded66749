"""Tenant slots on the host: /run/fcsp/tenants/<container-id>/{limits,usage}.

The layout comes from fcsp_hook.slot.abi (mirror of shim/fcsp_slot.h).  Writers use
write-to-temporary then rename, so a reader never sees a half-written file.

The usage file is the tenant's to write (it is mounted read-write into the container), so
for a container the hook gives it a tiny filesystem of its own (bound_usage): whatever the
tenant writes, it cannot take more of the host's memory than the file's own pages.  Slots
are removed whatever is in them (remove_slot): mounts are detached, links are never
followed, and nothing a tenant can do makes removal raise.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import fcntl
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fcsp_hook import linux, procfs
from fcsp_hook.errors import SlotError, SlotVersionError
from fcsp_hook.slot import abi, rules, uvm

TENANTS_SUBDIR = "tenants"
# <run_dir>/locks/<container-id>: what host-side writers of a slot's seqlocked fields
# serialise on.  Never mounted into a container, so no tenant can hold it.
LOCKS_SUBDIR = "locks"
# <run_dir>/reaped/: slots whose mounts the process that removed them could not detach.
GRAVEYARD_SUBDIR = "reaped"
# Where bound_usage builds the usage file's filesystem before mounting the file over the
# slot's usage; never there for longer than that.
_USAGE_STAGING = ".usage-fs"
_USAGE_SIZE = ctypes.sizeof(abi.Usage)
# A slot is flat but for mps/; removal descends no deeper than this into whatever is there.
_MAX_DEPTH = 16
# Mounts stacked on one path that removal takes off (one is ours; propagation can add one).
_MAX_STACKED = 8
_PATH_FLAGS = linux.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# OCI runtimes accept ids of letters, digits, '_', '+', '-' and '.'; we accept the
# same, minus anything that could name another directory.
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,70}$")


@dataclass(frozen=True)
class DeviceLimits:
    """What one GPU the container sees is granted."""

    host_index: int = -1
    uuid: str = ""
    mem_limit_bytes: int = 0
    mem_limit_basis_points: int = 0
    sm_requested_centi: int = abi.WHOLE_GPU_CENTI
    backend: abi.Backend = abi.Backend.TIMESLICE
    mps_threads_centi: int = 0
    # Spill mode: how far past the quota (rules.memory_spill).
    mem_spill_bytes: int = 0
    mem_spill_centi: int = 0


@dataclass(frozen=True)
class SlotSpec:
    """Everything the host writes into a tenant's limits file."""

    container_id: str
    tenant: str = ""
    isolation_mode: abi.IsolationMode = abi.IsolationMode.BALANCED
    mem_mode: abi.MemMode = abi.MemMode.HARD
    priority: abi.Priority = abi.Priority.BEST_EFFORT
    devices: tuple[DeviceLimits, ...] = field(default_factory=tuple)
    uvm: uvm.UvmKnobs = uvm.PROFILES["default"]
    # The container's init process on the host: the observer reaps the slot once it is gone.
    init_host_pid: int = 0
    init_start_time: int = 0


def validate_container_id(container_id: str) -> str:
    if not _CONTAINER_ID.fullmatch(container_id) or container_id in {".", ".."}:
        raise SlotError(f"container id {container_id!r} is not a valid OCI container id")
    return container_id


def tenants_dir(run_dir: Path) -> Path:
    return run_dir / TENANTS_SUBDIR


def slot_path(run_dir: Path, container_id: str) -> Path:
    return tenants_dir(run_dir) / validate_container_id(container_id)


def lock_path(slot_dir: Path) -> Path:
    """The lock host-side writers of this slot's seqlocked fields take: <run_dir>/locks/<id>.

    Not flock(limits): a tenant can open its read-only limits file and hold flock on it
    forever.  A slot outside a tenants directory (a tool's, a test's) locks beside itself.
    """
    if slot_dir.parent.name == TENANTS_SUBDIR:
        return slot_dir.parent.parent / LOCKS_SUBDIR / slot_dir.name
    return slot_dir.with_name(f".{slot_dir.name}.lock")


def encode_limits(spec: SlotSpec) -> bytes:
    if len(spec.devices) > abi.MAX_DEVICES:
        raise SlotError(
            f"{len(spec.devices)} GPUs requested; a slot holds at most {abi.MAX_DEVICES}"
        )
    limits = abi.Limits()
    limits.magic = abi.LIMITS_MAGIC
    limits.version = abi.SLOT_VERSION
    limits.size = ctypes.sizeof(abi.Limits)
    limits.isolation_mode = spec.isolation_mode
    limits.mem_mode = spec.mem_mode
    limits.priority = spec.priority
    limits.device_count = len(spec.devices)
    limits.generation = 1
    limits.container_id = spec.container_id.encode()[: abi.ID_LEN - 1]
    limits.tenant = spec.tenant.encode()[: abi.TENANT_LEN - 1]
    limits.init_host_pid = spec.init_host_pid
    limits.init_start_time = spec.init_start_time
    limits.uvm_profile = spec.uvm.profile
    limits.pressure_pct = spec.uvm.pressure_word()
    limits.prefetch_bytes = spec.uvm.prefetch_bytes
    limits.evict_policy = spec.uvm.evict_policy
    for i, dev in enumerate(spec.devices):
        entry = limits.device[i]
        entry.host_index = dev.host_index
        entry.uuid = dev.uuid.encode()[: abi.UUID_LEN - 1]
        entry.flags = abi.DEV_SELECTED_BY_UUID if dev.uuid else 0
        entry.mem_limit_bytes = dev.mem_limit_bytes
        entry.mem_limit_basis_points = dev.mem_limit_basis_points
        entry.sm_requested_centi = dev.sm_requested_centi
        entry.sm_effective_centi = rules.share_to_write(dev.sm_requested_centi)
        entry.backend = dev.backend
        entry.mps_threads_centi = dev.mps_threads_centi
        entry.mem_spill_bytes = dev.mem_spill_bytes
        entry.mem_spill_centi = dev.mem_spill_centi
    return bytes(limits)


def empty_usage() -> bytes:
    usage = abi.Usage()
    usage.magic = abi.USAGE_MAGIC
    usage.version = abi.SLOT_VERSION
    usage.size = ctypes.sizeof(abi.Usage)
    return bytes(usage)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not narrow what tenants' processes need
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_slot(
    directory: Path,
    spec: SlotSpec,
    extra_files: dict[str, tuple[bytes, int]],
    with_mps_dir: bool = False,
    bounded_usage: bool = False,
) -> None:
    """Create or refresh a slot directory holding limits, usage and the given extra files,
    and with_mps_dir, the empty directory the MPS client socket is mounted on; with
    bounded_usage, the usage file on a filesystem of its own (bound_usage).

    limits is always rewritten; usage is reset, since a slot is (re)created only when
    the container starts and none of its processes can hold it yet.  What an earlier
    start left mounted in the directory (its poststop never ran) is detached first.
    limits goes in last: a reader opens a slot once its limits are there (the observer
    does, and keeps what it opened), and by then the usage file is the one that stays.
    """
    limits = encode_limits(spec)
    try:
        directory.mkdir(mode=0o755, parents=False, exist_ok=True)
        _release_mounts(directory)
        os.chmod(directory, 0o755)  # noqa: S103  # every uid in the container traverses it
        # Any uid in the container must be able to report its usage.  A bounded one is
        # mounted over an empty file: a reader that cannot see the mount gets an error,
        # not a record that never moves.
        usage = b"" if bounded_usage else empty_usage()
        _write_atomically(directory / abi.USAGE_FILE, usage, 0o666)
        for name, (data, mode) in extra_files.items():
            _write_atomically(directory / name, data, mode)
        if with_mps_dir:
            (directory / abi.MPS_DIR).mkdir(mode=0o755, exist_ok=True)
    except OSError as exc:
        raise SlotError(f"cannot create slot {directory}: {exc.strerror}") from exc
    if bounded_usage:
        bound_usage(directory)
    try:
        _write_atomically(directory / abi.LIMITS_FILE, limits, 0o644)
    except OSError as exc:
        raise SlotError(f"cannot create slot {directory}: {exc.strerror}") from exc


def ensure_tenants_dir(run_dir: Path) -> Path:
    """Create /run/fcsp/tenants; 0711 so that host users cannot list container ids."""
    path = tenants_dir(run_dir)
    try:
        run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.mkdir(mode=0o711, exist_ok=True)
        os.chmod(path, 0o711)  # noqa: S103  # traversable, not listable
    except OSError as exc:
        raise SlotError(f"cannot create {path}: {exc.strerror}") from exc
    return path


def bound_usage(directory: Path) -> None:
    """Mount, over the slot's usage file, a file of a tmpfs of its own sized to that file.

    The usage file is mounted read-write into the container, and a file on /run can grow
    until /run is full.  A memfd sealed against growing and shrinking would pin its size
    exactly, but mount(2) and open_tree(2) refuse to bind a memfd (EINVAL: its inode lives
    on the kernel's internal mount).  A tmpfs with size= the file's pages and two inodes
    (its root and the file) is the bound the kernel enforces: a write past the end fails
    with ENOSPC beyond the last page, and a truncate that grows the file allocates
    nothing, so the tenant holds at most those pages of host memory however it tries.  Host
    readers read fixed ranges at fixed offsets and never trust the size.

    The tmpfs is mounted on a staging directory in the slot, the file bind-mounted over
    <slot>/usage, and the staging mount detached: only the file stays reachable, on the
    host at the path every reader already uses.  remove_slot unmounts it.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    size = -(-_USAGE_SIZE // page) * page
    try:
        dir_fd = os.open(directory, _DIR_FLAGS)
    except OSError as exc:
        raise SlotError(f"cannot open slot {directory}: {exc.strerror}") from exc
    try:
        _mount_bounded_usage(dir_fd, size)
    except OSError as exc:
        _unmount(dir_fd, abi.USAGE_FILE)
        raise SlotError(f"cannot give {directory}/usage its own filesystem: {exc}") from exc
    finally:
        os.close(dir_fd)


def _mount_bounded_usage(dir_fd: int, size: int) -> None:
    os.mkdir(_USAGE_STAGING, 0o700, dir_fd=dir_fd)
    try:
        staging = os.open(_USAGE_STAGING, _PATH_FLAGS | os.O_DIRECTORY, dir_fd=dir_fd)
        try:
            linux.mount(
                "tmpfs",
                linux.fd_path(staging),
                "tmpfs",
                linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                f"size={size},nr_inodes=2,mode=0700",
            )
        finally:
            os.close(staging)
        try:
            _bind_usage_file(dir_fd)
        finally:
            _unmount(dir_fd, _USAGE_STAGING)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(_USAGE_STAGING, dir_fd=dir_fd)


def _bind_usage_file(dir_fd: int) -> None:
    root = os.open(_USAGE_STAGING, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(abi.USAGE_FILE, flags, 0o666, dir_fd=root)
        try:
            os.fchmod(fd, 0o666)  # any uid in the container reports its usage
            os.write(fd, empty_usage())
        finally:
            os.close(fd)
        source = os.open(abi.USAGE_FILE, _PATH_FLAGS, dir_fd=root)
    finally:
        os.close(root)
    try:
        target = os.open(abi.USAGE_FILE, _PATH_FLAGS, dir_fd=dir_fd)
        try:
            linux.mount(linux.fd_path(source), linux.fd_path(target), None, linux.MS_BIND)
        finally:
            os.close(target)
    finally:
        os.close(source)


def _unmount(dir_fd: int, name: str) -> None:
    """Detach whatever is mounted on dir_fd/name, never following name if it is a link.
    Only where linux.may_mount(): elsewhere the call itself could be fatal."""
    target = f"{linux.fd_path(dir_fd)}/{name}"
    for _ in range(_MAX_STACKED):
        try:
            linux.umount2(target, linux.MNT_DETACH | linux.UMOUNT_NOFOLLOW)
        except OSError:
            return  # EINVAL: nothing (more) mounted there


def _release_mounts(directory: Path) -> None:
    """Detach what an earlier start mounted in a slot directory, and its staging dir."""
    if not linux.may_mount():
        return
    fd = os.open(directory, _DIR_FLAGS)
    try:
        for name in os.listdir(fd):
            _unmount(fd, name)
        with contextlib.suppress(OSError):
            os.rmdir(_USAGE_STAGING, dir_fd=fd)
    finally:
        os.close(fd)


def _empty(dir_fd: int, depth: int, detach: bool) -> None:
    """Delete everything in a directory, detaching mounts first where this process may;
    links are removed, never followed."""
    try:
        names = os.listdir(dir_fd)
    except OSError:
        return
    for name in names:
        if detach:
            _unmount(dir_fd, name)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
            continue
        if depth < _MAX_DEPTH:
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                _empty(sub, depth + 1, detach)
            finally:
                os.close(sub)
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=dir_fd)


def _holds_mounts(dir_fd: int) -> bool:
    """Something in the directory is on another filesystem: a mount in this namespace."""
    dev = os.fstat(dir_fd).st_dev
    try:
        names = os.listdir(dir_fd)
    except OSError:
        return True
    for name in names:
        with contextlib.suppress(OSError):
            if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_dev != dev:
                return True
    return False


def _bury(run_dir: Path, tenants_fd: int, name: str) -> bool:
    """Move a slot this process cannot take apart out of the tenants directory, into
    <run_dir>/reaped/, where the next removal by a process that may unmount sweeps it."""
    graveyard = run_dir / GRAVEYARD_SUBDIR
    try:
        graveyard.mkdir(mode=0o700, exist_ok=True)
        grave = os.open(graveyard, _DIR_FLAGS)
    except OSError:
        return False
    try:
        os.rename(name, f"{name}.{time.time_ns()}", src_dir_fd=tenants_fd, dst_dir_fd=grave)
    except OSError:
        return False
    finally:
        os.close(grave)
    return True


def _sweep(run_dir: Path) -> None:
    """Take apart the slots buried in <run_dir>/reaped/ (mounts detached, files removed)."""
    try:
        grave = os.open(run_dir / GRAVEYARD_SUBDIR, _DIR_FLAGS)
    except OSError:
        return  # none: the usual case
    try:
        for name in os.listdir(grave):
            _unmount(grave, name)
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=grave)
            except OSError:
                continue
            try:
                _empty(fd, 0, detach=True)
            finally:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=grave)
    finally:
        os.close(grave)


def remove_slot(run_dir: Path, container_id: str) -> bool:
    """Remove a tenant's slot; True if there was one and it is gone from the tenants dir.

    Mounts in it (the bounded usage file) are detached, everything else deleted, links
    removed without being followed.  A process that may not make mount calls (the
    observer under its systemd sandbox, which kills it for one) detaches nothing: a slot
    still holding a mount in its namespace is moved to <run_dir>/reaped/ instead, and the
    next removal by a process that may (the hook's poststop) sweeps it.  Never raises:
    poststop must not fail a container's removal, and the observer's reaper must survive
    any slot, whatever is in it.
    """
    try:
        path = slot_path(run_dir, container_id)
    except SlotError:
        return False
    with contextlib.suppress(OSError):
        os.unlink(lock_path(path))
    detach = linux.may_mount()
    try:
        return _remove(run_dir, path, detach)
    except OSError:
        return False
    finally:
        if detach:
            with contextlib.suppress(OSError):
                _sweep(run_dir)


# <run_dir>/locks/.slots: creating a slot (admission included) and removing one whose
# container is gone are serialised on it, so that a removal never takes the slot of a
# container that reused the id (a restart): it sees that container's init alive.  Held for
# milliseconds; a leading dot: no container id has one.
SLOTS_LOCK = ".slots"
SLOTS_LOCK_TIMEOUT_S = 10.0
_LOCK_POLL_S = 0.002


@contextlib.contextmanager
def slots_locked(run_dir: Path, timeout_s: float = SLOTS_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold <run_dir>/locks/.slots (flock; the locks directory is never mounted into a
    container, so no tenant can hold it).  SlotError when it cannot be had in timeout_s."""
    path = run_dir / LOCKS_SUBDIR / SLOTS_LOCK
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SlotError(f"{path}: cannot open the slots lock: {exc.strerror}") from exc
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise SlotError(
                        f"{path}: another container start has held the slots lock for "
                        f"{timeout_s:g} s; try again"
                    ) from None
                time.sleep(_LOCK_POLL_S)
            except OSError as exc:
                raise SlotError(f"{path}: cannot lock: {exc.strerror}") from exc
        yield
    finally:
        os.close(fd)


class Removal(enum.Enum):
    REMOVED = "removed"
    ABSENT = "absent"  # no slot by that id
    RUNNING = "running"  # the slot's container runs: a new one that reused the id
    FAILED = "failed"  # not removed (busy lock, what is in it): the observer reaps it


def remove_if_gone(
    run_dir: Path, container_id: str, proc: Path = procfs.PROC, timeout_s: float = 1.0
) -> Removal:
    """Remove the slot of a container that is gone, under the slots lock: a slot whose
    recorded init runs is another run of that id and is kept.  Never raises."""
    try:
        path = slot_path(run_dir, container_id)
    except SlotError:
        return Removal.ABSENT  # no slot can have that name
    if not path.is_dir():
        return Removal.ABSENT  # nothing to lock for (a slot made now is a new run's)
    try:
        with slots_locked(run_dir, timeout_s):
            if not path.is_dir():
                return Removal.ABSENT
            with contextlib.suppress(SlotError, OSError):
                alive = procfs.process_alive(*read_init_process(path / abi.LIMITS_FILE), proc)
                if alive:
                    return Removal.RUNNING
            return Removal.REMOVED if remove_slot(run_dir, container_id) else Removal.FAILED
    except SlotError:
        return Removal.FAILED


def _remove(run_dir: Path, path: Path, detach: bool) -> bool:
    try:
        parent = os.open(path.parent, _DIR_FLAGS)
    except OSError:
        return False
    try:
        if detach:
            _unmount(parent, path.name)  # nothing is mounted on a slot; if it were, not for long
        try:
            fd = os.open(path.name, _DIR_FLAGS, dir_fd=parent)
        except OSError:
            return False
        try:
            if not detach and _holds_mounts(fd):
                return _bury(run_dir, parent, path.name)
            _empty(fd, 0, detach)
        finally:
            os.close(fd)
        try:
            os.rmdir(path.name, dir_fd=parent)
        except FileNotFoundError:
            pass
        except OSError:  # busy or not empty: something this process cannot take off
            return False if detach else _bury(run_dir, parent, path.name)
        return True
    finally:
        os.close(parent)


_Record = TypeVar("_Record", abi.Limits, abi.Usage)


def _read_record(path: Path, cls: type[_Record], magic: int, what: str) -> _Record:
    """One slot file, read with a bound (the usage file is the tenant's) and checked."""
    size = ctypes.sizeof(cls)
    # Never wait on what a tenant could have put there: no FIFO, no link, no device.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SlotError(f"{path}: not a regular file")
        data = os.pread(fd, size + 1, 0)
    finally:
        os.close(fd)
    if len(data) != size:
        raise SlotError(f"{path}: {len(data)} bytes, expected {size}")
    record = cls.from_buffer_copy(data)
    check_version(path, what, record.magic, magic, record.version)
    return record


def check_version(path: Path, what: str, found_magic: int, magic: int, version: int) -> None:
    """SlotVersionError for a slot file of another version, SlotError for no slot file."""
    if found_magic != magic:
        raise SlotError(f"{path}: not an FCSP {what} file")
    if version != abi.SLOT_VERSION:
        raise SlotVersionError(
            f"{path}: slot version {version}, not {abi.SLOT_VERSION} (an earlier FCSP): its "
            "shim enforces it alone until the container restarts",
            version,
        )


def read_init_process(path: Path) -> tuple[int, int]:
    """The container's init process (host pid, start time) that a limits file of this
    slot version or an earlier one records: the limits' layout is the same since version 1
    (only reserved words took meanings), so the reaper can tell when an older install's
    container is gone.  SlotError when it is no limits file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SlotError(f"{path}: not a regular file")
        data = os.pread(fd, ctypes.sizeof(abi.Limits) + 1, 0)
    finally:
        os.close(fd)
    if len(data) != ctypes.sizeof(abi.Limits):
        raise SlotError(f"{path}: {len(data)} bytes, expected {ctypes.sizeof(abi.Limits)}")
    limits = abi.Limits.from_buffer_copy(data)
    if limits.magic != abi.LIMITS_MAGIC or not 1 <= limits.version <= abi.SLOT_VERSION:
        raise SlotError(f"{path}: not an FCSP limits file")
    return int(limits.init_host_pid), int(limits.init_start_time)


def read_limits(path: Path) -> abi.Limits:
    return _read_record(path, abi.Limits, abi.LIMITS_MAGIC, "limits")


def read_usage(path: Path) -> abi.Usage:
    """Read a usage file.  Its content comes from the tenant: callers bound every value."""
    return _read_record(path, abi.Usage, abi.USAGE_MAGIC, "usage")
