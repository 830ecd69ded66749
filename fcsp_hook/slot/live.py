"""Live access to slots while tenants run: the observer's and fcspctl set's side of the ABI.

fcsp_hook.slot.files creates and removes slots with whole-file writes; this module reads and
writes them in place, the way the shim sees them:

- limits is mapped read-write (only the host can write it: inside the container it is a
  read-only mount).  sm_effective_centi, clock_scale_centi, turn, mps_processes and
  observer_heartbeat_ns are single aligned stores outside the seqlock; every other
  field is written under the seqlock `seq` (odd while writing) with `generation` bumped,
  and read by retrying until `seq` is the same even value before and after the copy.
  Host-side writers of seqlocked fields serialise on a lock file of their own
  (files.lock_path), never on the limits file: a tenant can open its read-only limits
  and hold flock on it forever.
- usage belongs to the tenant, which can truncate or rewrite it at will: it is never
  mapped (a truncated mapping would SIGBUS the observer), only pread, and every value
  read from it is bounded by the caller.

Stores from Python are plain ctypes stores to naturally aligned fields: on x86-64
(the only target so far) each is a single store instruction and stores are not
reordered with other stores, which is what the seqlock writer needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import mmap
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fcsp_hook.errors import SlotError
from fcsp_hook.slot import abi, files

LIMITS_SIZE = ctypes.sizeof(abi.Limits)
USAGE_SIZE = ctypes.sizeof(abi.Usage)
SEQLOCK_TRIES = 1000
# Host writers hold the lock for a few stores; one that holds it longer is stuck.
HOST_LOCK_TIMEOUT_S = 5.0
HOST_LOCK_POLL_S = 0.002
# Word indexes of the live fields in fcsp_limits (all naturally aligned).
_GENERATION_WORD = abi.Limits.generation.offset // 8
_HEARTBEAT_WORD = abi.Limits.observer_heartbeat_ns.offset // 8
_EFFECTIVE_WORD = (abi.Limits.device.offset + abi.LimitsDevice.sm_effective_centi.offset) // 4
_CLOCK_WORD = (abi.Limits.device.offset + abi.LimitsDevice.clock_scale_centi.offset) // 4
_MPS_PROCESSES_WORD = (abi.Limits.device.offset + abi.LimitsDevice.mps_processes.offset) // 4
_DEVICE_WORDS = ctypes.sizeof(abi.LimitsDevice) // 4
_TURN_WORD = (abi.Limits.device.offset + abi.LimitsDevice.turn.offset) // 8
_DEVICE_WORDS64 = ctypes.sizeof(abi.LimitsDevice) // 8
# The usage file's parts as struct formats, derived from the ABI's structures.
_USAGE_HEAD = abi.flat_layout(abi.Usage, until="device")
_USAGE_DEVICE = abi.flat_layout(abi.UsageDevice)
_USAGE_PROC = abi.flat_layout(abi.UsageProc)

# Nothing a tenant reports can be larger than these; beyond them it is lying.
MAX_BYTES = 1 << 50  # 1 PiB of device memory
MAX_COUNTER = 1 << 62


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC, the clock of every *_ns timestamp in the slot."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _host_lock(path: Path, timeout_s: float) -> int:
    """flock(LOCK_EX) on the host-only lock file, given up after timeout_s: an fd to close."""
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SlotError(f"{path}: cannot open the host writers' lock: {exc.strerror}") from exc
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise SlotError(
                    f"{path}: another host writer has held this slot's lock for "
                    f"{timeout_s:g} s; try again"
                ) from None
            time.sleep(HOST_LOCK_POLL_S)
        except OSError as exc:
            os.close(fd)
            raise SlotError(f"{path}: cannot lock: {exc.strerror}") from exc


class LimitsMap:
    """A tenant's limits file mapped shared, read-write.

    lock: the file host writers serialise on (default: files.lock_path of the slot).
    """

    def __init__(self, path: Path, lock: Path | None = None) -> None:
        self.lock_path = lock if lock is not None else files.lock_path(path.parent)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SlotError(f"{path}: cannot open: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if st.st_size != LIMITS_SIZE:
                raise SlotError(f"{path}: {st.st_size} bytes, expected {LIMITS_SIZE}")
            self._mm = mmap.mmap(fd, LIMITS_SIZE, mmap.MAP_SHARED)
        except OSError as exc:  # out of descriptors or memory: this slot, not the caller
            os.close(fd)
            raise SlotError(f"{path}: cannot map: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.path = path
        self.inode = st.st_ino
        self.view = abi.Limits.from_buffer(self._mm)
        self._u32 = memoryview(self._mm).cast("I")
        self._u64 = memoryview(self._mm).cast("Q")
        try:
            files.check_version(
                path, "limits", self.view.magic, abi.LIMITS_MAGIC, self.view.version
            )
        except SlotError:
            self.close()
            raise

    def snapshot(self) -> abi.Limits:
        """A consistent copy of the seqlocked fields (the two live fields as of the copy)."""
        for _ in range(SEQLOCK_TRIES):
            before = self.view.seq
            if before % 2:
                continue
            copy = abi.Limits.from_buffer_copy(self._mm)
            if self.view.seq == before:
                return copy
        raise SlotError(f"{self.path}: the seqlock never settled (a writer died mid-update?)")

    @property
    def generation(self) -> int:
        return self._u64[_GENERATION_WORD]

    # The fields the observer touches every tick go through word views of the mapping
    # (an indexed load or store of a naturally aligned word): several times cheaper
    # than ctypes attribute chains, and the same single store.

    def set_effective(self, index: int, centi: int) -> None:
        """One aligned 32-bit store: the shim picks it up on its next refill."""
        self._u32[_EFFECTIVE_WORD + index * _DEVICE_WORDS] = centi

    def effective(self, index: int) -> int:
        return self._u32[_EFFECTIVE_WORD + index * _DEVICE_WORDS]

    def set_clock_scale(self, index: int, centi: int) -> None:
        """One aligned 32-bit store, like set_effective; 0 turns the scaling off."""
        self._u32[_CLOCK_WORD + index * _DEVICE_WORDS] = centi

    def clock_scale(self, index: int) -> int:
        return self._u32[_CLOCK_WORD + index * _DEVICE_WORDS]

    def set_mps_processes(self, index: int, count: int) -> None:
        """One aligned 32-bit store, like set_effective: the tenant's MPS clients seen."""
        self._u32[_MPS_PROCESSES_WORD + index * _DEVICE_WORDS] = count

    def mps_processes(self, index: int) -> int:
        return self._u32[_MPS_PROCESSES_WORD + index * _DEVICE_WORDS]

    def set_turn(self, index: int, word: int) -> None:
        """One aligned 64-bit store of abi.pack_turn's word; 0: no turns."""
        self._u64[_TURN_WORD + index * _DEVICE_WORDS64] = word

    def turn(self, index: int) -> int:
        return self._u64[_TURN_WORD + index * _DEVICE_WORDS64]

    def set_heartbeat(self, now_ns: int) -> None:
        self._u64[_HEARTBEAT_WORD] = now_ns

    @property
    def heartbeat_ns(self) -> int:
        return self._u64[_HEARTBEAT_WORD]

    @contextlib.contextmanager
    def update(self, timeout_s: float = HOST_LOCK_TIMEOUT_S) -> Iterator[abi.Limits]:
        """Write seqlocked fields: seq odd, the caller's stores, generation+1, seq even.

        Host writers serialise on the host-only lock file, waited for at most timeout_s
        (SlotError after); nothing in the slot, which the tenant can reach, is locked.
        """
        lock = _host_lock(self.lock_path, timeout_s)
        try:
            if self.view.seq % 2:  # a writer died mid-update; its half-write is ours to finish
                self.view.seq += 1
            self.view.seq += 1
            try:
                yield self.view
            finally:
                self.view.generation += 1
                self.view.seq += 1
        finally:
            os.close(lock)  # closing the only fd on it releases the flock

    def close(self) -> None:
        # The views export the buffer; they must go before the mapping can.
        del self.view
        self._u32.release()
        self._u64.release()
        # A caller may still hold a sub-view; the GC unmaps it later then.
        with contextlib.suppress(BufferError):
            self._mm.close()
        os.close(self.fd)


@dataclass(frozen=True)
class DeviceUsage:
    """One GPU's counters from a usage file, already bounded."""

    mem_used_bytes: int = 0
    launches: int = 0
    tokens_used: int = 0
    busy_ns: int = 0
    throttled_ns: int = 0
    demand_centi: int = 0
    busy_sq: int = 0  # sum of the launches' costs squared, (ns >> 10) ** 2
    # Spill mode: bytes served past the quota from host memory, and their peak; unified
    # memory moved to the device (prefetch) and to the host (eviction), in total.
    mem_spilled_bytes: int = 0
    mem_spill_peak_bytes: int = 0
    mem_migrated_in_bytes: int = 0
    mem_migrated_out_bytes: int = 0


@dataclass(frozen=True)
class ProcRecord:
    """A LIVE per-process record from a usage file (pid in the container's namespace)."""

    pid: int
    start_time: int
    heartbeat_ns: int
    mem_used_bytes: tuple[int, ...]


@functools.cache
def _usage_layout(count: int) -> struct.Struct:
    """Header and the first count devices' counters, in one unpack (this runs every tick)."""
    return struct.Struct(_USAGE_HEAD.format + _USAGE_DEVICE.format[1:] * count)


# DeviceUsage's fields, each with its index in a device's unpacked words and its bound.
_DEVICE_COUNTERS = tuple(
    (name, _USAGE_DEVICE.fields[name].start, bound)
    for name, bound in (
        ("mem_used_bytes", MAX_BYTES),
        ("launches", MAX_COUNTER),
        ("tokens_used", MAX_COUNTER),
        ("busy_ns", MAX_COUNTER),
        ("throttled_ns", MAX_COUNTER),
        ("busy_sq", MAX_COUNTER),
        ("mem_spilled_bytes", MAX_BYTES),
        ("mem_spill_peak_bytes", MAX_BYTES),
        # Totals over the tenant's life, not amounts held: bounded as counters.
        ("mem_migrated_in_bytes", MAX_COUNTER),
        ("mem_migrated_out_bytes", MAX_COUNTER),
    )
)
_DEMAND = _USAGE_DEVICE.fields["demand_centi"].start


def _bounded(value: int, limit: int) -> int:
    return value if 0 <= value <= limit else 0


def device_usage(record: abi.UsageDevice) -> DeviceUsage:
    """One GPU's counters from a usage record read whole (fcspctl status), bounded as
    UsageReader.devices bounds them."""
    counters = {n: _bounded(int(getattr(record, n)), bound) for n, _, bound in _DEVICE_COUNTERS}
    demand = min(int(record.demand_centi), abi.WHOLE_GPU_CENTI)
    return DeviceUsage(**counters, demand_centi=demand)


class UsageReader:
    """pread-only access to a tenant's usage file."""

    def __init__(self, path: Path) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise SlotError(f"{path}: cannot open: {exc.strerror}") from exc
        self.path = path
        self._last_raw = b""
        self._last_devices: list[DeviceUsage] = []

    def _pread(self, size: int, offset: int) -> bytes:
        try:
            data = os.pread(self.fd, size, offset)
        except OSError as exc:
            raise SlotError(f"{self.path}: cannot read: {exc.strerror}") from exc
        if len(data) != size:
            if not data and offset == 0:
                raise SlotError(
                    f"{self.path}: empty (a tenant truncated it, or it is a mount that this "
                    "process's mount namespace does not receive from the host)"
                )
            raise SlotError(f"{self.path}: truncated (a tenant rewrote its usage file?)")
        return data

    def devices(self, count: int) -> list[DeviceUsage]:
        """The first count devices' counters; SlotError if the file is not a usage file."""
        count = min(max(count, 0), abi.MAX_DEVICES)
        layout = _usage_layout(count)
        raw = self._pread(layout.size, 0)
        if raw == self._last_raw:  # an idle tenant: nothing moved since the last tick
            return self._last_devices
        values = layout.unpack(raw)
        head = {name: values[at.start] for name, at in _USAGE_HEAD.fields.items()}
        files.check_version(self.path, "usage", head["magic"], abi.USAGE_MAGIC, head["version"])
        if head["size"] != USAGE_SIZE:
            raise SlotError(f"{self.path}: not an FCSP usage file of {USAGE_SIZE} bytes")
        out = []
        for i in range(count):
            base = _USAGE_HEAD.items + _USAGE_DEVICE.items * i
            counters = {n: _bounded(values[base + at], bound) for n, at, bound in _DEVICE_COUNTERS}
            demand = min(values[base + _DEMAND], abi.WHOLE_GPU_CENTI)
            out.append(DeviceUsage(**counters, demand_centi=demand))
        self._last_raw, self._last_devices = raw, out
        return out

    def live_processes(self) -> list[ProcRecord]:
        """Records in state LIVE with a plausible pid; anything else is skipped."""
        data = self._pread(abi.MAX_PROCS * _USAGE_PROC.size, abi.Usage.proc.offset)
        fields = _USAGE_PROC.fields
        out = []
        for values in struct.iter_unpack(_USAGE_PROC.format, data):
            state, pid = values[fields["state"].start], values[fields["pid"].start]
            if state != abi.ProcState.LIVE or pid <= 0:
                continue
            mem = values[fields["mem_used_bytes"]]
            out.append(
                ProcRecord(
                    pid,
                    values[fields["start_time"].start],
                    values[fields["heartbeat_ns"].start],
                    tuple(_bounded(m, MAX_BYTES) for m in mem),
                )
            )
        return out

    def close(self) -> None:
        os.close(self.fd)
