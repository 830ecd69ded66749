"""Tenant slots on the host: /run/fcsp/tenants/<container-id>/{limits,usage}.

The layout comes from fcsp_hook.slot.abi (mirror of shim/fcsp_slot.h).  Writers use
write-to-temporary then rename, so a reader never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fcsp_hook.errors import SlotError
from fcsp_hook.slot import abi, rules

TENANTS_SUBDIR = "tenants"
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


@dataclass(frozen=True)
class SlotSpec:
    """Everything the host writes into a tenant's limits file."""

    container_id: str
    tenant: str = ""
    isolation_mode: abi.IsolationMode = abi.IsolationMode.BALANCED
    mem_mode: abi.MemMode = abi.MemMode.HARD
    priority: abi.Priority = abi.Priority.BEST_EFFORT
    devices: tuple[DeviceLimits, ...] = field(default_factory=tuple)
    # The container's init process on the host: the observer reaps the slot once it is gone.
    init_host_pid: int = 0
    init_start_time: int = 0


def validate_container_id(container_id: str) -> str:
    if not _CONTAINER_ID.match(container_id) or container_id in {".", ".."}:
        raise SlotError(f"container id {container_id!r} is not a valid OCI container id")
    return container_id


def tenants_dir(run_dir: Path) -> Path:
    return run_dir / TENANTS_SUBDIR


def slot_path(run_dir: Path, container_id: str) -> Path:
    return tenants_dir(run_dir) / validate_container_id(container_id)


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
) -> None:
    """Create or refresh a slot directory holding limits, usage and the given extra files,
    and with_mps_dir, the empty directory the MPS client socket is mounted on.

    limits is always rewritten; usage is reset, since a slot is (re)created only when
    the container starts and none of its processes can hold it yet.
    """
    try:
        directory.mkdir(mode=0o755, parents=False, exist_ok=True)
        os.chmod(directory, 0o755)  # noqa: S103  # every uid in the container traverses it
        _write_atomically(directory / abi.LIMITS_FILE, encode_limits(spec), 0o644)
        # Any uid in the container must be able to report its usage.
        _write_atomically(directory / abi.USAGE_FILE, empty_usage(), 0o666)
        for name, (data, mode) in extra_files.items():
            _write_atomically(directory / name, data, mode)
        if with_mps_dir:
            (directory / abi.MPS_DIR).mkdir(mode=0o755, exist_ok=True)
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


def remove_slot(run_dir: Path, container_id: str) -> bool:
    """Remove a tenant's slot (a flat directory of files we wrote); True if there was one."""
    path = slot_path(run_dir, container_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        for name in os.listdir(fd):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()
    return not path.exists()


_Record = TypeVar("_Record", abi.Limits, abi.Usage)


def _read_record(path: Path, cls: type[_Record], magic: int, what: str) -> _Record:
    """One slot file, read with a bound (the usage file is the tenant's) and checked."""
    size = ctypes.sizeof(cls)
    with path.open("rb") as f:
        data = f.read(size + 1)
    if len(data) != size:
        raise SlotError(f"{path}: {len(data)} bytes, expected {size}")
    record = cls.from_buffer_copy(data)
    if record.magic != magic or record.version != abi.SLOT_VERSION:
        raise SlotError(f"{path}: not an FCSP v{abi.SLOT_VERSION} {what} file")
    return record


def read_limits(path: Path) -> abi.Limits:
    return _read_record(path, abi.Limits, abi.LIMITS_MAGIC, "limits")


def read_usage(path: Path) -> abi.Usage:
    """Read a usage file.  Its content comes from the tenant: callers bound every value."""
    return _read_record(path, abi.Usage, abi.USAGE_MAGIC, "usage")
