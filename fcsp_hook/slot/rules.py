"""The rules of the slot's live words: what the host writes into a tenant's limits while it
runs, and what each value means to the shim.  shim/fcsp_slot.h states the same rules for
the C side; on the host side this module is the one place that applies them: the hook
(a new slot), the observer (shares, turns, clocks, the heartbeat) and `fcspctl set`.

- sm_effective_centi, the share in force: 0 means "unset" to the shim, which then runs on
  its request, so a share is never written as 0 (the least is MIN_SHARE_CENTI).  A new
  slot carries the request there; so does a changed request while no observer runs.
- clock_scale_centi: 0 = no scaling.  turn: 0 = no turns.
- observer_heartbeat_ns: CLOCK_MONOTONIC of the observer's last tick; 0 = no observer.
  Older than OBSERVER_STALE_NS, the observer is gone and the shims run on their requests.
- The memory quota of a GPU: the smaller of the byte quota and the percentage of the
  GPU's real total, whichever of the two are set (memory_quota).
"""

from __future__ import annotations

from fcsp_hook.slot import abi

# Not typing.TYPE_CHECKING: the hook imports this module on every container start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from fcsp_hook.slot.live import LimitsMap

MIN_SHARE_CENTI = 1  # FCSP_MIN_SHARE_CENTI: 0.01 %, "nothing" as the shim can tell it apart
OBSERVER_STALE_NS = 1_000_000_000  # FCSP_OBSERVER_STALE_NS


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
