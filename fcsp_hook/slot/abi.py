"""Python mirror of shim/fcsp_slot.h, the slot ABI.

The C header is the source of truth; tests/test_abi.py compiles a program that
prints every offset and size there and compares them with these structures.  The
ctypes structures below are the one description of the layout on the Python side:
the struct formats that read a usage file in one unpack are derived from them
(`flat_layout`), never written by hand.  Pure data: no I/O here.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from dataclasses import dataclass

LIMITS_MAGIC = 0x4C505346
USAGE_MAGIC = 0x55505346
SLOT_VERSION = 2

MAX_DEVICES = 16
MAX_PROCS = 64
UUID_LEN = 48
ID_LEN = 72
TENANT_LEN = 64

CONTAINER_SLOT_DIR = "/run/fcsp"
LIMITS_FILE = "limits"
USAGE_FILE = "usage"

DEV_SELECTED_BY_UUID = 0x1
TURN_BITS = 20  # fcsp_limits_device.turn: cycle, window start, window length (us)
TURN_MAX_US = (1 << TURN_BITS) - 1
CENTI_PER_PERCENT = 100
WHOLE_GPU_CENTI = 100 * CENTI_PER_PERCENT  # FCSP_WHOLE_GPU_CENTI: shares are in 1/100 %


class IsolationMode(enum.IntEnum):
    NONE = 0
    BALANCED = 1
    STRICT = 2
    ADAPTIVE = 3


class MemMode(enum.IntEnum):
    HARD = 0
    SOFT = 1
    SPILL = 2


class UvmProfile(enum.IntEnum):
    DEFAULT = 0
    LLM_INFERENCE = 1
    TRAINING = 2


class EvictPolicy(enum.IntEnum):
    LRU = 0
    FIFO = 1


PRESSURE_BITS = 8  # fcsp_limits.pressure_pct: warning | high << 8 | critical << 16


class Backend(enum.IntEnum):
    TIMESLICE = 0
    MPS = 1


MPS_DIR = "mps"


class Priority(enum.IntEnum):
    BEST_EFFORT = 0
    LATENCY = 1


class ProcState(enum.IntEnum):
    FREE = 0
    LIVE = 1
    REAPING = 2


u32 = ctypes.c_uint32
i32 = ctypes.c_int32
u64 = ctypes.c_uint64


class LimitsDevice(ctypes.Structure):
    _fields_ = (
        ("uuid", ctypes.c_char * UUID_LEN),
        ("host_index", i32),
        ("flags", u32),
        ("mem_limit_bytes", u64),
        ("mem_limit_basis_points", u32),
        ("sm_requested_centi", u32),
        ("sm_effective_centi", u32),
        ("backend", u32),
        ("mps_threads_centi", u32),
        ("clock_scale_centi", u32),
        ("turn", u64),
        ("mem_spill_bytes", u64),
        ("mem_spill_centi", u32),
        ("mps_processes", u32),
    )


class Limits(ctypes.Structure):
    _fields_ = (
        ("magic", u32),
        ("version", u32),
        ("size", u32),
        ("seq", u32),
        ("isolation_mode", u32),
        ("mem_mode", u32),
        ("priority", u32),
        ("device_count", u32),
        ("generation", u64),
        ("observer_heartbeat_ns", u64),
        ("container_id", ctypes.c_char * ID_LEN),
        ("tenant", ctypes.c_char * TENANT_LEN),
        ("init_host_pid", i32),
        ("reserved1", u32),
        ("init_start_time", u64),
        ("uvm_profile", u32),
        ("pressure_pct", u32),
        ("prefetch_bytes", u64),
        ("evict_policy", u32),
        ("reserved2", u32),
        ("reserved", u64 * 4),
        ("device", LimitsDevice * MAX_DEVICES),
    )


class UsageDevice(ctypes.Structure):
    _fields_ = (
        ("mem_used_bytes", u64),
        ("mem_peak_bytes", u64),
        ("mem_soft_excess_bytes", u64),
        ("mem_rejected", u64),
        ("launches", u64),
        ("tokens_used", u64),
        ("busy_ns", u64),
        ("throttled_ns", u64),
        ("demand_centi", u64),
        # The shim's compute limiter (see fcsp_slot.h); the host never reads them.
        ("tat_ns", u64),
        ("demand_window_ns", u64),
        ("demand_busy_ns", u64),
        ("demand_throttled_ns", u64),
        ("turn_booked_ns", u64),
        ("turn_margin", u64),
        ("busy_sq", u64),
        ("mem_spilled_bytes", u64),
        ("mem_spill_peak_bytes", u64),
        ("mem_migrated_in_bytes", u64),
        ("mem_migrated_out_bytes", u64),
    )


class UsageProc(ctypes.Structure):
    _fields_ = (
        ("state", u32),
        ("pid", i32),
        ("start_time", u64),
        ("heartbeat_ns", u64),
        ("mem_used_bytes", u64 * MAX_DEVICES),
        ("mem_spilled_bytes", u64 * MAX_DEVICES),
        ("reserved", u64 * 2),
    )


class Usage(ctypes.Structure):
    _fields_ = (
        ("magic", u32),
        ("version", u32),
        ("size", u32),
        ("reserved0", u32),
        ("heartbeat_ns", u64),
        ("reserved", u64 * 7),
        ("device", UsageDevice * MAX_DEVICES),
        ("proc", UsageProc * MAX_PROCS),
    )


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "fcsp_limits_device": LimitsDevice,
    "fcsp_limits": Limits,
    "fcsp_usage_device": UsageDevice,
    "fcsp_usage_proc": UsageProc,
    "fcsp_usage": Usage,
}


def pack_turn(cycle_us: int, start_us: int, length_us: int) -> int:
    """fcsp_limits_device.turn for a window [start, start + length) of every cycle."""
    if not 0 < length_us <= cycle_us <= TURN_MAX_US or not 0 <= start_us < cycle_us:
        raise ValueError(f"turn {start_us}+{length_us} of {cycle_us} us")
    return cycle_us | start_us << TURN_BITS | length_us << 2 * TURN_BITS


def unpack_turn(word: int) -> tuple[int, int, int]:
    """(cycle, start, length) in microseconds; (0, 0, 0) for no turns."""
    return word & TURN_MAX_US, word >> TURN_BITS & TURN_MAX_US, word >> 2 * TURN_BITS & TURN_MAX_US


# ---- struct formats derived from the structures ---------------------------------------------

_SCALAR_CODES: dict[type[ctypes._SimpleCData], str] = {  # type: ignore[type-arg]
    ctypes.c_uint32: "I",
    ctypes.c_int32: "i",
    ctypes.c_uint64: "Q",
}


@dataclass(frozen=True)
class FlatLayout:
    """A structure (or its leading fields) as one little-endian struct format: `fields`
    maps each field's name to its slice of the unpacked tuple (arrays of scalars give
    several items, a char array one bytes item)."""

    format: str
    fields: dict[str, slice]

    @property
    def size(self) -> int:
        return struct.calcsize(self.format)

    @property
    def items(self) -> int:
        return max((s.stop for s in self.fields.values()), default=0)


def _codes(ctype: type) -> tuple[str, int]:
    """The struct codes of one field and how many items they unpack to."""
    if ctype in _SCALAR_CODES:
        return _SCALAR_CODES[ctype], 1
    length = getattr(ctype, "_length_", 0)
    element = getattr(ctype, "_type_", None)
    if element is ctypes.c_char:
        return f"{length}s", 1
    if element in _SCALAR_CODES:
        return f"{length}{_SCALAR_CODES[element]}", length
    raise TypeError(f"{ctype.__name__}: no flat struct format (a nested structure?)")


def flat_layout(cls: type[ctypes.Structure], until: str | None = None) -> FlatLayout:
    """cls's fields in order (up to, not including, `until`), with pad bytes wherever
    the C layout has them, so that the format's size is the structure's (or `until`'s
    offset)."""
    parts, fields, at, item = ["<"], {}, 0, 0
    for name, ctype, *_ in cls._fields_:
        if name == until:
            break
        offset = getattr(cls, name).offset
        if offset > at:
            parts.append(f"{offset - at}x")
        codes, count = _codes(ctype)
        parts.append(codes)
        fields[name] = slice(item, item + count)
        item += count
        at = offset + ctypes.sizeof(ctype)
    end = getattr(cls, until).offset if until else ctypes.sizeof(cls)
    if end > at:
        parts.append(f"{end - at}x")
    return FlatLayout("".join(parts), fields)
