"""The rules of the slot's live words: what the host writes into a tenant's limits while it
runs, and what each value means to the shim.  shim/fcsp_slot.h states the same rules for
the C side; on the host side this module is the one place that applies them: the hook
(a new slot), the observer (shares, turns, clocks, MPS processes, the heartbeat) and
`fcspctl set`.

- sm_effective_centi, the share in force: 0 means "unset" to the shim, which then runs on
  its request, so a share is never written as 0 (the least is MIN_SHARE_CENTI).  A new
  slot carries the request there; so does a changed request while no observer runs.
- clock_scale_centi: 0 = no scaling.  turn: 0 = no turns.  mps_processes: the tenant's
  MPS clients the host sees on the GPU; 0 = none seen.
- observer_heartbeat_ns: CLOCK_MONOTONIC of the observer's last tick; 0 = no observer.
  Older than OBSERVER_STALE_NS, the observer is gone and the shims run on their requests.
- The memory quota of a GPU: the smaller of the byte quota and the percentage of the
  GPU's real total, whichever of the two are set (memory_quota).
- Spill mode: how far past the quota a tenant may hold host memory the GPU maps
  (memory_spill), and the pressure levels of its memory on the GPU (pressure_level).
"""

from __future__ import annotations

import enum

from fcsp_hook.slot import abi

# Not typing.TYPE_CHECKING: the hook imports this module on every container start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from fcsp_hook.slot.live import LimitsMap

MIN_SHARE_CENTI = 1  # FCSP_MIN_SHARE_CENTI: 0.01 %, "nothing" as the shim can tell it apart
OBSERVER_STALE_NS = 1_000_000_000  # FCSP_OBSERVER_STALE_NS
U64_MAX = (1 << 64) - 1
DEFAULT_PRESSURE_PCT = (70, 85, 95)  # the default profile's (fcsp_hook.slot.uvm)


def share_to_write(centi: int) -> int:
    """A share as the slot may carry it: never 0 (unset), never more than the whole GPU."""
    return min(max(centi, MIN_SHARE_CENTI), abi.WHOLE_GPU_CENTI)


def grant_share(limits: LimitsMap, index: int, centi: int) -> bool:
    """The observer's decision for one GPU of a tenant; True if the word changed."""
    share = share_to_write(centi)
    if limits.effective(index) == share:
        return False
    limits.set_effective(index, share)
    return True


def request_share(device: abi.LimitsDevice, centi: int, observer_alive: bool) -> None:
    """A new request (inside a seqlocked update): with no observer to recompute the share
    in force, the request is the share in force."""
    device.sm_requested_centi = centi
    if not observer_alive:
        device.sm_effective_centi = share_to_write(centi)


def restore_requests(limits: LimitsMap, spec: abi.Limits) -> None:
    """The observer stops: every share back to its request, no clock scaling, no turns,
    heartbeat 0, so that the shims run on their requests at once rather than after
    OBSERVER_STALE_NS."""
    for i in range(min(int(spec.device_count), abi.MAX_DEVICES)):
        limits.set_effective(i, share_to_write(int(spec.device[i].sm_requested_centi)))
        limits.set_clock_scale(i, 0)
        limits.set_turn(i, 0)
    limits.set_heartbeat(0)


def beat(limits: LimitsMap, now_ns: int) -> None:
    """The observer's heartbeat: the shares in this slot are fresh as of now_ns."""
    limits.set_heartbeat(max(now_ns, 1))


def observer_alive(heartbeat_ns: int, now_ns: int) -> bool:
    return heartbeat_ns != 0 and now_ns - heartbeat_ns <= OBSERVER_STALE_NS


def memory_quota(limit_bytes: int, basis_points: int, real_total: int) -> int:
    """Bytes a tenant may hold on one GPU; 0: no quota.  The smaller of the byte quota
    and basis_points (1/100 %) of the GPU's real total, of those that are set; a
    percentage of an unknown total (0) counts as unset.  fcsp_mem_quota in the header."""
    share = 0
    if basis_points and real_total:
        share = real_total * min(basis_points, abi.WHOLE_GPU_CENTI) // abi.WHOLE_GPU_CENTI
    if limit_bytes and share:
        return min(limit_bytes, share)
    return limit_bytes or share


def device_memory_quota(device: abi.LimitsDevice, real_total: int) -> int:
    return memory_quota(int(device.mem_limit_bytes), int(device.mem_limit_basis_points), real_total)


def memory_spill(spill_bytes: int, spill_centi: int, quota: int) -> int:
    """Bytes a spill-mode tenant may hold past its quota: spill_bytes where set, else
    spill_centi (1/100 of the quota; WHOLE_GPU_CENTI is 1x) of the quota, at most 2^64 - 1.
    fcsp_mem_spill in the header."""
    return spill_bytes or min(quota * spill_centi // abi.WHOLE_GPU_CENTI, U64_MAX)


class Pressure(enum.IntEnum):
    """A tenant's memory on one GPU against its quota, at its profile's percentages."""

    OK = 0
    WARNING = 1
    HIGH = 2
    CRITICAL = 3


def pack_pressure(warning_pct: int, high_pct: int, critical_pct: int) -> int:
    """fcsp_limits.pressure_pct; the levels rise strictly, each a percent from 1 to 100."""
    if not 0 < warning_pct < high_pct < critical_pct <= 100:
        raise ValueError(f"pressure levels {warning_pct}/{high_pct}/{critical_pct} must rise")
    return warning_pct | high_pct << abi.PRESSURE_BITS | critical_pct << 2 * abi.PRESSURE_BITS


def unpack_pressure(word: int) -> tuple[int, int, int]:
    mask = (1 << abi.PRESSURE_BITS) - 1
    return word & mask, word >> abi.PRESSURE_BITS & mask, word >> 2 * abi.PRESSURE_BITS & mask


def pressure_level(used: int, quota: int, pressure_pct: int) -> Pressure:
    """The level of `used` bytes under `quota` (0: no quota, never pressed); a slot without
    levels (0) has the default profile's."""
    if quota <= 0:
        return Pressure.OK
    levels = unpack_pressure(pressure_pct) if pressure_pct else DEFAULT_PRESSURE_PCT
    level = Pressure.OK
    for pct, name in zip(levels, (Pressure.WARNING, Pressure.HIGH, Pressure.CRITICAL), strict=True):
        if used * 100 >= quota * pct:
            level = name
    return level
