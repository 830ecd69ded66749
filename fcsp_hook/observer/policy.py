"""The share policy: who gets how much of one GPU.  Pure code, no I/O.

The observer calls `allocate` once per GPU per tick with what every tenant on that
GPU requested and whether it is active and wants more; it writes the shares back.
All shares are in 1/100 % of the GPU (abi.WHOLE_GPU_CENTI is the whole GPU), and
all arithmetic is on integers, so that "the shares sum to at most 100 %" is exact.

Modes, per tenant:

- none: never throttled (the observer writes the whole GPU); accounting only.  Such
  tenants are outside the sum: nothing they get is taken from anyone's share.
- strict: exactly the request, active or idle, never more (MIG-like).  Strict
  requests are reserved first; if they alone oversubscribe the GPU they are scaled
  down proportionally, since no mode may hand out more than the GPU.
- balanced: the capacity left after strict reservations is shared in steps:
    1. floor: each active tenant is first given tenant_floor_pct % of its request;
    2. entitlement: then the rest of its request, latency-priority tenants first;
       when active requests oversubscribe the GPU, tenants get their floor plus a
       proportional part of the rest (so no active tenant falls below its floor);
    3. idle tenants keep a small wake-up share (idle_share, at most their request);
    4. shared pool: capacity nobody is entitled to (idle tenants' shares, unrequested
       capacity), up to shared_pool_pct % of the GPU, is split among the active
       tenants by requested share, whether they asked for more or not;
    5. burst pool: what is still free goes to active tenants with unmet demand,
       latency-priority first, each capped at burst_max_pct % of the GPU.
- adaptive: balanced, except that what steps 4 and 5 lend an adaptive tenant is
  scaled by (1 - tightness); tightness moves towards 1 while the GPU's contention is
  above a high mark and back towards 0 once it drops below a low mark (hysteresis).
  At tightness 1 an adaptive tenant gets exactly what strict would give it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fcsp_hook.nvml import ClockReading
from fcsp_hook.slot.abi import TURN_MAX_US, WHOLE_GPU_CENTI, IsolationMode, Priority, pack_turn

PERCENT = 100


@dataclass(frozen=True)
class Pools:
    """config.toml [policy]: the pools, in percent of the GPU."""

    tenant_floor_pct: int = 20
    shared_pool_pct: int = 40
    burst_max_pct: int = 40


@dataclass(frozen=True)
class AdaptiveParams:
    """config.toml [observer]: adaptive mode's thresholds, in percent."""

    contention_high_pct: int = 50
    contention_low_pct: int = 20
    step_pct: int = 25


@dataclass(frozen=True)
class TenantInput:
    """One tenant on one GPU, as the observer sees it this tick."""

    key: str
    mode: IsolationMode
    requested: int
    active: bool = True
    unmet: int = 0  # share it would use beyond what it has now, centi; 0: satisfied
    priority: Priority = Priority.BEST_EFFORT


@dataclass(frozen=True)
class GpuState:
    """What adaptive mode remembers about a GPU between ticks."""

    tight: bool = False  # above the high mark, not yet back below the low one
    tightness_pct: int = 0  # 0 relaxed (balanced) .. 100 strict


@dataclass(frozen=True)
class Allocation:
    shares: dict[str, int]
    state: GpuState = field(default_factory=GpuState)


def _clamp_centi(value: int) -> int:
    return min(max(value, 0), WHOLE_GPU_CENTI)


def contention_pct(tenants: Iterable[TenantInput]) -> int:
    """Unmet demand of the GPU's active tenants, in percent of the GPU, 0..100.

    A tenant alone on a GPU contends with nobody, however throttled it is: contention
    needs at least two active (throttled) tenants.
    """
    return contention_of([t.unmet for t in tenants if t.active and t.mode != IsolationMode.NONE])


def contention_of(unmet_of_active: Sequence[int]) -> int:
    """contention_pct, given the unmet demand of each active, throttled-mode tenant."""
    if len(unmet_of_active) < 2:
        return 0
    unmet = sum(_clamp_centi(u) for u in unmet_of_active)
    return min(unmet * PERCENT // WHOLE_GPU_CENTI, PERCENT)


def step_adaptive(state: GpuState, contention: int, params: AdaptiveParams) -> GpuState:
    """Move tightness one step; the state flips only past the high or below the low mark."""
    tight = state.tight
    if contention >= params.contention_high_pct:
        tight = True
    elif contention <= params.contention_low_pct:
        tight = False
    target = PERCENT if tight else 0
    if state.tightness_pct < target:
        level = min(state.tightness_pct + params.step_pct, target)
    else:
        level = max(state.tightness_pct - params.step_pct, target)
    return GpuState(tight=tight, tightness_pct=level)


def _proportional(weights: dict[str, int], amount: int) -> dict[str, int]:
    """Split amount by weight, rounding down (so the parts never exceed amount)."""
    total = sum(weights.values())
    if total <= 0 or amount <= 0:
        return dict.fromkeys(weights, 0)
    return {k: w * amount // total for k, w in weights.items()}


def _fill(caps: dict[str, int], weights: dict[str, int], amount: int) -> dict[str, int]:
    """Water-fill amount over keys by weight, none past its cap; returns what each got."""
    got = dict.fromkeys(caps, 0)
    open_keys = {k for k, c in caps.items() if c > 0 and weights.get(k, 0) > 0}
    while amount > 0 and open_keys:
        parts = _proportional({k: weights[k] for k in open_keys}, amount)
        if not any(parts.values()):  # rounding left less than one unit per key
            for k in sorted(open_keys)[:amount]:
                got[k] += 1
            break
        for k, part in parts.items():
            give = min(part, caps[k] - got[k])
            got[k] += give
            amount -= give
            if got[k] >= caps[k]:
                open_keys.discard(k)
    return got


def _scaled(requests: dict[str, int], capacity: int) -> dict[str, int]:
    """Each request, or a proportional part of capacity when they oversubscribe it."""
    if sum(requests.values()) <= capacity:
        return dict(requests)
    return _proportional(requests, capacity)


def _entitlements(
    active: Sequence[TenantInput], capacity: int, floor_pct: int
) -> tuple[dict[str, int], dict[str, int]]:
    """Floors, then the rest of each request (latency first); returns (shares, floors)."""
    requests = {t.key: _clamp_centi(t.requested) for t in active}
    floors = {k: r * floor_pct // PERCENT for k, r in requests.items()}
    if sum(floors.values()) > capacity:
        # Floors alone oversubscribe the GPU: no floor can be kept; share by request.
        shares = _proportional(requests, capacity)
        return shares, shares
    shares = dict(floors)
    left = capacity - sum(floors.values())
    for priority in (Priority.LATENCY, Priority.BEST_EFFORT):
        rest = {t.key: requests[t.key] - floors[t.key] for t in active if t.priority == priority}
        top = _fill(rest, rest, left)
        for k, v in top.items():
            shares[k] += v
            left -= v
    return shares, floors


def _lend(
    active: Sequence[TenantInput], shares: dict[str, int], free: int, pools: Pools, capacity: int
) -> dict[str, int]:
    """Steps 4 and 5: the shared pool by request, then the burst pool to unmet demand."""
    shared_amount = min(free, capacity * pools.shared_pool_pct // PERCENT)
    weights = {t.key: _clamp_centi(t.requested) for t in active}
    headroom = {t.key: WHOLE_GPU_CENTI - shares[t.key] for t in active}
    lent = _fill(headroom, weights, shared_amount)
    free -= sum(lent.values())
    burst_cap = capacity * pools.burst_max_pct // PERCENT
    for priority in (Priority.LATENCY, Priority.BEST_EFFORT):
        wanting = [t for t in active if t.priority == priority and t.unmet > 0]
        caps = {
            t.key: min(burst_cap, WHOLE_GPU_CENTI - shares[t.key] - lent[t.key]) for t in wanting
        }
        burst = _fill(caps, {t.key: weights[t.key] for t in wanting}, free)
        for k, v in burst.items():
            lent[k] += v
            free -= v
    return lent


def allocate(
    tenants: Sequence[TenantInput],
    pools: Pools,
    idle_share: int,
    state: GpuState = GpuState(),  # frozen, so sharing the default is safe
    params: AdaptiveParams = AdaptiveParams(),  # frozen as well
) -> Allocation:
    """Every tenant's share of one GPU this tick, and adaptive mode's next state."""
    shares: dict[str, int] = {}
    for t in tenants:
        if t.mode == IsolationMode.NONE:
            shares[t.key] = WHOLE_GPU_CENTI
    strict = {t.key: _clamp_centi(t.requested) for t in tenants if t.mode == IsolationMode.STRICT}
    shares.update(_scaled(strict, WHOLE_GPU_CENTI))
    capacity = WHOLE_GPU_CENTI - sum(shares[k] for k in strict)

    flexible = [t for t in tenants if t.mode in (IsolationMode.BALANCED, IsolationMode.ADAPTIVE)]
    active = [t for t in flexible if t.active]
    idle = [t for t in flexible if not t.active]
    base, _ = _entitlements(active, capacity, pools.tenant_floor_pct)
    shares.update(base)
    free = capacity - sum(base.values())

    # Idle tenants' wake-up shares come after active entitlements, at most half of what
    # is left, so waking tenants can always be heard without starving the active ones.
    wake = {t.key: min(_clamp_centi(t.requested), _clamp_centi(idle_share)) for t in idle}
    wake = _scaled(wake, free // 2)
    shares.update(wake)
    free -= sum(wake.values())

    contention = contention_pct(tenants)
    next_state = step_adaptive(state, contention, params)
    lent = _lend(active, shares, free, pools, capacity)
    for t in active:
        loan = lent[t.key]
        if t.mode == IsolationMode.ADAPTIVE:
            loan = loan * (PERCENT - next_state.tightness_pct) // PERCENT
        shares[t.key] += loan
    return Allocation(shares=shares, state=next_state)


def floor_of(tenant: TenantInput, pools: Pools) -> int:
    """The least an active balanced or adaptive tenant gets when floors are feasible."""
    return _clamp_centi(tenant.requested) * pools.tenant_floor_pct // PERCENT


# ---- clock normalisation ---------------------------------------------------------------

# At or above this utilisation the GPU is at full load: its clock then is the reference.
FULL_LOAD_UTIL_PCT = 95
CLOCK_SCALE_MAX_CENTI = 20000
# A GPU's power at an SM clock, with nothing running: what a kernel's share of the draw is
# counted above, as a share of the power limit (bench/results/compute-diagnosis.md).
STATIC_POWER_PCT = 15
# Work whose draw, run without pause, would come within POWER_BOUND_LOW_PCT of the power
# limit starts to be counted as power-bound; above POWER_BOUND_HIGH_PCT it fully is.
POWER_BOUND_LOW_PCT = 90
POWER_BOUND_HIGH_PCT = 110


def power_bound_centi(r: ClockReading) -> int:
    """How far (0..10000) the work running now would hold the GPU at its power limit if it
    ran without pause: its draw above static power, divided by the fraction of time the GPU
    is busy, against the limit.  Only such work runs slower at full load than on a partly
    idle GPU; a launch-bound loop of small kernels runs at the top clock either way.  A GPU
    that does not report power is taken as power-bound (the reference clock alone)."""
    if r.power_w is None or not r.power_limit_w:
        return WHOLE_GPU_CENTI
    if r.util_pct <= 0:
        return 0
    static = r.power_limit_w * STATIC_POWER_PCT / PERCENT
    flat_out = static + max(r.power_w - static, 0.0) * PERCENT / min(r.util_pct, PERCENT)
    low = r.power_limit_w * POWER_BOUND_LOW_PCT / PERCENT
    high = r.power_limit_w * POWER_BOUND_HIGH_PCT / PERCENT
    return round(WHOLE_GPU_CENTI * min(max((flat_out - low) / (high - low), 0.0), 1.0))


def learn_full_load_clock(reference_mhz: float, r: ClockReading) -> float:
    """The SM clock the GPU holds at full load under power-bound work: an average of the
    clocks seen while it was that busy (0.0 until it has been)."""
    near_limit = (
        r.power_w is None
        or not r.power_limit_w
        or r.power_w >= r.power_limit_w * POWER_BOUND_LOW_PCT / PERCENT
    )
    if r.util_pct < FULL_LOAD_UTIL_PCT or r.sm_mhz <= 0 or not near_limit:
        return reference_mhz
    if reference_mhz <= 0:
        return float(r.sm_mhz)
    return reference_mhz + (r.sm_mhz - reference_mhz) / 8


def clock_scale_centi(reference_mhz: float, r: ClockReading, max_speedup_pct: int) -> int:
    """How much faster than at full load the kernels run now, 1/100 % (0: not known yet).
    The SM clock ratio, capped at max_speedup_pct: a GEMM does not speed up as much as its
    clock does (memory and issue limits stay), and weighted by how
    power-bound the work is (a loop that never reaches the power limit gains nothing).
    Never below 1: a clock read while the GPU idles between kernels is lower than the one
    they run at, and a share must never buy more than its GPU time."""
    if reference_mhz <= 0 or r.sm_mhz <= 0:
        return 0
    speedup = min(r.sm_mhz / reference_mhz, max_speedup_pct / PERCENT)
    weight = power_bound_centi(r) / WHOLE_GPU_CENTI
    scale = round(WHOLE_GPU_CENTI * (1 + max(speedup - 1, 0.0) * weight))
    return min(scale, CLOCK_SCALE_MAX_CENTI)


@dataclass(frozen=True)
class TurnInput:
    """One tenant on one time-sliced GPU, for turns."""

    key: str
    share: int  # effective, centi
    busy: bool  # active and using (nearly) all of its share; may take turns
    kernel_us: float = 0.0  # size of its launches, weighted by GPU time; 0: not known


# The cycle may move this far from the configured one to fit whole kernels into windows,
# but only for a fit better by FIT_GAIN (of a window's length), so that kernel times that
# jitter from tick to tick do not move the windows.
CYCLE_FIT_LOW, CYCLE_FIT_HIGH = 0.8, 1.25
FIT_GAIN = 0.02
MANY_KERNELS = 1 / (2 * FIT_GAIN)  # a window holding more fits any cycle within FIT_GAIN


def turns(tenants: Sequence[TurnInput], cycle_us: int, current_cycle_us: int = 0) -> dict[str, int]:
    """Each busy tenant's window of a cycle of about cycle_us, as the slot's turn word.

    Two busy contexts that the driver time-slices lose a few percent of the GPU to
    switching (bench/results/compute-diagnosis.md); taking turns of a 20-50 ms cycle they
    lose none.  Windows follow one another in key order, each as long as its share of the
    cycle (of the busy tenants' shares together, if they exceed the GPU).  A tenant that
    is not busy gets 0 and launches at any time, as does everyone when fewer than two
    are busy (nobody to take turns with) or cycle_us is 0.  The cycle is fitted to the
    tenants' kernels (fit_cycle); current_cycle_us is the one in force, if any.
    """
    words = dict.fromkeys((t.key for t in tenants), 0)
    busy = sorted((t for t in tenants if t.busy and t.share > 0), key=lambda t: t.key)
    if cycle_us <= 0 or len(busy) < 2:
        return words
    total = max(sum(t.share for t in busy), WHOLE_GPU_CENTI)
    cycle_us = fit_cycle(busy, total, cycle_us, current_cycle_us)
    start = 0
    for t in busy:
        length = cycle_us * t.share // total
        if length > 0:
            words[t.key] = pack_turn(cycle_us, start, length)
        start += length
    return words


def misfit(tenants: Sequence[TurnInput], total: int, cycle_us: float) -> float:
    """How far the worst window is from holding a whole number of its tenant's kernels, as
    a fraction of the window.  A window ends on a kernel boundary only on average (the shim
    books the last kernel if half of it fits), so a window of 2.8 kernels of 5 ms is filled
    by 3 that run 1 ms into the next tenant's window, or by 2, 6 ms short."""
    worst = 0.0
    for t in tenants:
        if t.kernel_us <= 0:
            continue
        kernels = cycle_us * t.share / total / t.kernel_us
        if kernels <= MANY_KERNELS:
            worst = max(worst, abs(kernels - max(round(kernels), 1)) / kernels)
    return worst


def fit_cycle(tenants: Sequence[TurnInput], total: int, cycle_us: int, current_us: int) -> int:
    """The cycle, within CYCLE_FIT_LOW-CYCLE_FIT_HIGH of cycle_us, whose windows best hold
    whole kernels: the configured one unless another fits better by FIT_GAIN, and the one
    in force unless another fits better by FIT_GAIN.  Short kernels fit any cycle; a pair
    of 5.3 ms-kernel tenants at 30 / 70 % gets 53 ms (3 and 7 kernels) instead of 50."""
    low, high = cycle_us * CYCLE_FIT_LOW, min(cycle_us * CYCLE_FIT_HIGH, TURN_MAX_US)
    candidates = [float(cycle_us)]
    for t in tenants:
        per_kernel = t.kernel_us * total / t.share  # the cycle per kernel in t's window
        if t.kernel_us <= 0 or high / per_kernel > MANY_KERNELS:
            continue
        first = max(math.ceil(low / per_kernel), 1)
        candidates += [n * per_kernel for n in range(first, int(high / per_kernel) + 1)]
    fitting = [c for c in candidates if low <= c <= high]
    best = min(fitting, key=lambda c: (misfit(tenants, total, c), abs(c - cycle_us)))
    chosen = float(cycle_us)
    if misfit(tenants, total, best) + FIT_GAIN < misfit(tenants, total, chosen):
        chosen = best
    if low <= current_us <= high and (
        misfit(tenants, total, current_us) <= misfit(tenants, total, chosen) + FIT_GAIN
    ):
        chosen = current_us
    return round(chosen)
