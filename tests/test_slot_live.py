"""Slots while tenants run (fcsp_hook.slot.live): the limits' seqlock and live words, the
usage file read with bounds and never mapped."""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from fcsp_hook.errors import SlotError
from fcsp_hook.slot import abi, files, live

_DEV = abi.Usage.device.offset


def _slot(tmp_path: Path, cid: str = "t1", **kw: Any) -> Path:
    files.ensure_tenants_dir(tmp_path)
    directory = files.slot_path(tmp_path, cid)
    dev = files.DeviceLimits(host_index=0, sm_requested_centi=2500, **kw)
    files.write_slot(directory, files.SlotSpec(container_id=cid, devices=(dev,)), {})
    return directory


def test_seqlocked_update_bumps_seq_twice_and_generation(tmp_path: Path) -> None:
    """A host update leaves seq even (two bumps), generation + 1, and the new values."""
    directory = _slot(tmp_path)
    limits = live.LimitsMap(directory / abi.LIMITS_FILE)
    try:
        before = limits.snapshot()
        with limits.update() as view:
            assert view.seq % 2 == 1  # readers retry while the writer is inside
            view.device[0].sm_requested_centi = 6000
        after = limits.snapshot()
    finally:
        limits.close()
    assert after.seq == before.seq + 2
    assert after.generation == before.generation + 1
    assert files.read_limits(directory / abi.LIMITS_FILE).device[0].sm_requested_centi == 6000


def test_a_writer_that_died_mid_update_is_detected_and_repaired(tmp_path: Path) -> None:
    """seq stuck odd: readers give up with a SlotError; the next writer makes it even again."""
    directory = _slot(tmp_path)
    limits = live.LimitsMap(directory / abi.LIMITS_FILE)
    try:
        limits.view.seq = 7
        with pytest.raises(SlotError, match="seqlock never settled"):
            limits.snapshot()
        with limits.update():
            pass
        assert limits.snapshot().seq % 2 == 0
    finally:
        limits.close()


def test_live_fields_are_single_stores_visible_to_readers(tmp_path: Path) -> None:
    """sm_effective_centi, mps_processes and the heartbeat land in the file at their ABI
    offsets."""
    directory = _slot(tmp_path)
    limits = live.LimitsMap(directory / abi.LIMITS_FILE)
    try:
        limits.set_effective(0, 4321)
        limits.set_mps_processes(0, 3)
        limits.set_heartbeat(123456789)
    finally:
        limits.close()
    raw = (directory / abi.LIMITS_FILE).read_bytes()
    eff = abi.Limits.device.offset + abi.LimitsDevice.sm_effective_centi.offset
    mps = abi.Limits.device.offset + abi.LimitsDevice.mps_processes.offset
    assert struct.unpack_from("<I", raw, eff)[0] == 4321
    assert struct.unpack_from("<I", raw, mps)[0] == 3
    assert struct.unpack_from("<Q", raw, abi.Limits.observer_heartbeat_ns.offset)[0] == 123456789


def test_usage_values_are_bounded(tmp_path: Path) -> None:
    """Absurd numbers from a tenant read as 0 (or the whole GPU for demand), not as given."""
    directory = _slot(tmp_path)
    fd = os.open(directory / abi.USAGE_FILE, os.O_RDWR)
    try:
        os.pwrite(fd, struct.pack("<9Q", 1 << 60, 0, 0, 0, 5, 5, 1 << 63, 7, 1 << 40), _DEV)
    finally:
        os.close(fd)
    reader = live.UsageReader(directory / abi.USAGE_FILE)
    try:
        (dev,) = reader.devices(1)
    finally:
        reader.close()
    assert dev.mem_used_bytes == 0 and dev.busy_ns == 0
    assert dev.launches == 5 and dev.throttled_ns == 7
    assert dev.demand_centi == abi.WHOLE_GPU_CENTI


def test_a_truncated_or_foreign_usage_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """Truncation (a tenant can do it) and a wrong magic raise SlotError; nothing is mapped."""
    directory = _slot(tmp_path)
    usage = directory / abi.USAGE_FILE
    reader = live.UsageReader(usage)
    try:
        os.truncate(usage, 100)
        with pytest.raises(SlotError, match="truncated"):
            reader.devices(1)
        usage.write_bytes(b"\0" * ctypes.sizeof(abi.Usage))
        with pytest.raises(SlotError, match="not an FCSP"):
            reader.devices(1)
    finally:
        reader.close()


def test_process_records_are_read_live_only_and_bounded(tmp_path: Path) -> None:
    """Only LIVE records with a plausible pid are read, their memory bounded like the rest."""
    directory = _slot(tmp_path)
    records = [
        abi.UsageProc(state=abi.ProcState.LIVE, pid=7, start_time=3, heartbeat_ns=9),
        abi.UsageProc(state=abi.ProcState.FREE, pid=8),
        abi.UsageProc(state=abi.ProcState.LIVE, pid=-1),
        abi.UsageProc(state=abi.ProcState.REAPING, pid=9),
        abi.UsageProc(state=abi.ProcState.LIVE, pid=10),
    ]
    records[0].mem_used_bytes[:2] = [1 << 20, 1 << 60]
    fd = os.open(directory / abi.USAGE_FILE, os.O_RDWR)
    try:
        os.pwrite(fd, b"".join(bytes(r) for r in records), abi.Usage.proc.offset)
    finally:
        os.close(fd)
    reader = live.UsageReader(directory / abi.USAGE_FILE)
    try:
        first, second = reader.live_processes()
    finally:
        reader.close()
    assert (first.pid, first.start_time, first.heartbeat_ns) == (7, 3, 9)
    assert first.mem_used_bytes[:2] == (1 << 20, 0)  # past 1 PiB: a lie, read as 0
    assert second.pid == 10


def test_host_writers_serialise_on_their_own_lock_not_on_the_slot(tmp_path: Path) -> None:
    """A flock on the limits file (a tenant can take one through its read-only mount) does
    not hold a host writer up; the host writers' own lock, under the run directory, does,
    for a bounded time only, with a one-line SlotError."""
    directory = _slot(tmp_path)
    limits = live.LimitsMap(directory / abi.LIMITS_FILE)
    tenant_fd = os.open(directory / abi.LIMITS_FILE, os.O_RDONLY)
    try:
        fcntl.flock(tenant_fd, fcntl.LOCK_EX)
        with limits.update(timeout_s=0.5) as view:
            view.device[0].sm_requested_centi = 3000
        assert limits.lock_path == tmp_path / files.LOCKS_SUBDIR / "t1"
        host_fd = os.open(limits.lock_path, os.O_RDONLY)
        try:
            fcntl.flock(host_fd, fcntl.LOCK_EX)
            with pytest.raises(SlotError, match="another host writer"), limits.update(0.05):
                pass
        finally:
            os.close(host_fd)
        assert limits.snapshot().device[0].sm_requested_centi == 3000
        assert limits.snapshot().seq % 2 == 0
    finally:
        os.close(tenant_fd)
        limits.close()
