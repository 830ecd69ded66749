"""The share policy (observer.policy): worked examples and the invariants of every mode."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from fcsp_hook import nvml
from fcsp_hook.observer import policy
from fcsp_hook.observer.policy import (
    AdaptiveParams,
    GpuState,
    Pools,
    TenantInput,
    allocate,
    contention_pct,
    floor_of,
    step_adaptive,
)
from fcsp_hook.slot import abi
from fcsp_hook.slot.abi import WHOLE_GPU_CENTI, IsolationMode, Priority

W = WHOLE_GPU_CENTI
POOLS = Pools()  # 20 / 40 / 40, the defaults
BAL = IsolationMode.BALANCED


def _busy(key: str, requested: int, mode: IsolationMode = BAL, **kw: object) -> TenantInput:
    """An active tenant that wants more than it has (throttled)."""
    return TenantInput(key, mode, requested, active=True, unmet=1000, **kw)  # type: ignore[arg-type]


def _idle(key: str, requested: int, mode: IsolationMode = BAL) -> TenantInput:
    return TenantInput(key, mode, requested, active=False)


def _workday(active: int, idle_share: int) -> dict[str, int]:
    tenants = [_busy(f"t{i}", 2500) if i < active else _idle(f"t{i}", 2500) for i in range(4)]
    return allocate(tenants, POOLS, idle_share).shares


def test_workday_pattern_of_the_article() -> None:
    """4 tenants at 25 %: all busy 25 % each; one leaves 33 %; two leave 50 %; one left 100 %."""
    assert _workday(4, 0) == dict.fromkeys(("t0", "t1", "t2", "t3"), 2500)
    three = _workday(3, 0)
    assert all(abs(three[k] - 3333) <= 1 for k in ("t0", "t1", "t2")) and three["t3"] == 0
    two = _workday(2, 0)
    assert two["t0"] == two["t1"] == 5000
    assert _workday(1, 0)["t0"] == W


def test_workday_with_wake_up_shares() -> None:
    """With idle tenants keeping 1 % to wake up on, the busy ones lose only that 1 % each."""
    assert _workday(3, 100)["t0"] == 3300 and _workday(3, 100)["t3"] == 100
    assert _workday(1, 100) == {"t0": 9700, "t1": 100, "t2": 100, "t3": 100}


def test_pools_worked_example() -> None:
    """README example: A 20 % busy, B 20 % satisfied, C 60 % idle -> A 60, B 40, C 0.

    A and B get their requests (floor + entitlement), the shared pool (40 % of the GPU)
    splits C's idle 60 % by request, 20 each, and the remaining 20 % goes to A alone
    through the burst pool, since only A has unmet demand.
    """
    tenants = [
        _busy("A", 2000),
        TenantInput("B", BAL, 2000, active=True, unmet=0),
        _idle("C", 6000),
    ]
    assert allocate(tenants, POOLS, 0).shares == {"A": 6000, "B": 4000, "C": 0}
    back = [_busy("A", 2000), TenantInput("B", BAL, 2000), _busy("C", 6000)]
    assert allocate(back, POOLS, 0).shares == {"A": 2000, "B": 2000, "C": 6000}


def test_burst_is_capped_per_tenant() -> None:
    """A tenant alone gets at most request + shared pool + burst_max_pct, not the whole GPU."""
    shares = allocate([_busy("A", 1000), _idle("B", 9000)], POOLS, 0).shares
    assert shares["A"] == 1000 + 4000 + 4000


def test_strict_is_its_request_even_on_an_idle_gpu() -> None:
    """strict never lends nor borrows: a busy strict tenant alone still gets its request."""
    shares = allocate([_busy("S", 3000, IsolationMode.STRICT), _idle("I", 3000)], POOLS, 0).shares
    assert shares["S"] == 3000
    idle = allocate([_idle("S", 3000, IsolationMode.STRICT), _busy("B", 3000)], POOLS, 0).shares
    assert idle["S"] == 3000 and idle["B"] <= W - 3000


def test_none_is_never_throttled_and_outside_the_sum() -> None:
    """mode none: the whole GPU (no throttling), and nobody else's share shrinks for it."""
    shares = allocate(
        [TenantInput("N", IsolationMode.NONE, 1000), _busy("B", 5000), _busy("C", 5000)], POOLS, 0
    ).shares
    assert shares == {"N": W, "B": 5000, "C": 5000}


def test_oversubscribed_requests_are_scaled() -> None:
    """Three busy tenants asking 50 % each get a third each."""
    shares = allocate([_busy(k, 5000) for k in "ABC"], POOLS, 0).shares
    assert all(abs(v - 3333) <= 1 for v in shares.values())


def test_latency_priority_is_served_first_under_contention() -> None:
    """Latency 60 % + best-effort 60 %: latency gets its 60, best-effort the rest (>= floor)."""
    shares = allocate(
        [_busy("L", 6000, priority=Priority.LATENCY), _busy("B", 6000)], POOLS, 0
    ).shares
    assert shares == {"L": 6000, "B": 4000}
    crowded = allocate(
        [_busy("L", 9000, priority=Priority.LATENCY), _busy("B", 9000)], POOLS, 0
    ).shares
    assert crowded["B"] == 9000 * 20 // 100 and crowded["L"] == W - crowded["B"]


def test_adaptive_tightens_under_contention_and_relaxes_with_hysteresis() -> None:
    """Adaptive lends like balanced at low contention, nothing at high; marks are sticky."""
    params = AdaptiveParams(contention_high_pct=50, contention_low_pct=20, step_pct=50)
    state = GpuState()
    for _ in range(2):
        state = step_adaptive(state, 80, params)
    assert state.tight and state.tightness_pct == 100
    state = step_adaptive(state, 35, params)  # between the marks: stays tight
    assert state.tight and state.tightness_pct == 100
    state = step_adaptive(state, 10, params)
    assert not state.tight and state.tightness_pct == 50
    state = step_adaptive(state, 35, params)  # between the marks again: keeps relaxing
    assert not state.tight and state.tightness_pct == 0

    adaptive = [
        TenantInput("A", IsolationMode.ADAPTIVE, 2500, unmet=8000),
        TenantInput("B", IsolationMode.ADAPTIVE, 2500, unmet=8000),
        _idle("C", 5000, IsolationMode.ADAPTIVE),
    ]
    tight = allocate(adaptive, POOLS, 0, GpuState(True, 100), params)
    assert tight.shares["A"] == tight.shares["B"] == 2500  # strict-like while contended
    calm = [replace(t, unmet=1000) if t.active else t for t in adaptive]  # contention 20 %
    relaxed = allocate(calm, POOLS, 0, GpuState(False, 0), params)
    assert relaxed.shares["A"] == relaxed.shares["B"] == 5000  # balanced-like when calm


def test_a_tenant_alone_is_not_contention() -> None:
    """However throttled, one active tenant contends with nobody (adaptive stays relaxed)."""
    assert contention_pct([_busy("A", 2500), _idle("B", 2500)]) == 0
    assert contention_pct([_busy("A", 2500), _busy("B", 2500)]) == 20


# ---- properties ---------------------------------------------------------------------------

MODES = st.sampled_from(list(IsolationMode))
tenant_inputs = st.lists(
    st.builds(
        TenantInput,
        key=st.just(""),
        mode=MODES,
        requested=st.integers(0, W),
        active=st.booleans(),
        unmet=st.integers(0, W),
        priority=st.sampled_from(list(Priority)),
    ),
    max_size=12,
).map(lambda ts: [replace(t, key=f"t{i}") for i, t in enumerate(ts)])
pools = (
    st.tuples(st.integers(0, 100), st.integers(0, 100), st.integers(0, 100))
    .filter(lambda p: sum(p) <= 100)
    .map(lambda p: Pools(*p))
)
states = st.builds(GpuState, tight=st.booleans(), tightness_pct=st.integers(0, 100))
idle_shares = st.integers(0, W)


def _run(ts: list[TenantInput], p: Pools, idle: int, s: GpuState) -> dict[str, int]:
    return allocate(ts, p, idle, s).shares


@settings(max_examples=400)
@given(tenant_inputs, pools, idle_shares, states)
def test_every_tenant_gets_a_share_within_the_gpu(
    ts: list[TenantInput], p: Pools, idle: int, s: GpuState
) -> None:
    """Each tenant has exactly one share, from 0 to the whole GPU."""
    shares = _run(ts, p, idle, s)
    assert set(shares) == {t.key for t in ts}
    assert all(0 <= v <= W for v in shares.values())


@settings(max_examples=400)
@given(tenant_inputs, pools, idle_shares, states)
def test_shares_never_sum_past_the_gpu(
    ts: list[TenantInput], p: Pools, idle: int, s: GpuState
) -> None:
    """Whatever the mix of modes, enforced shares on a GPU sum to at most 100 %."""
    shares = _run(ts, p, idle, s)
    assert sum(shares[t.key] for t in ts if t.mode != IsolationMode.NONE) <= W


@settings(max_examples=400)
@given(tenant_inputs, pools, idle_shares, states)
def test_strict_never_exceeds_its_request(
    ts: list[TenantInput], p: Pools, idle: int, s: GpuState
) -> None:
    """strict gets at most its request, and exactly it whenever strict requests fit the GPU."""
    shares = _run(ts, p, idle, s)
    strict = [t for t in ts if t.mode == IsolationMode.STRICT]
    assert all(shares[t.key] <= t.requested for t in strict)
    if sum(t.requested for t in strict) <= W:
        assert all(shares[t.key] == t.requested for t in strict)


@settings(max_examples=400)
@given(tenant_inputs, pools, idle_shares, states)
def test_no_active_tenant_below_its_floor(
    ts: list[TenantInput], p: Pools, idle: int, s: GpuState
) -> None:
    """An active balanced/adaptive tenant keeps its floor whenever the floors fit the GPU."""
    shares = _run(ts, p, idle, s)
    strict = min(sum(t.requested for t in ts if t.mode == IsolationMode.STRICT), W)
    flexible = [
        t for t in ts if t.active and t.mode in (IsolationMode.BALANCED, IsolationMode.ADAPTIVE)
    ]
    if strict + sum(floor_of(t, p) for t in flexible) <= W:
        assert all(shares[t.key] >= floor_of(t, p) for t in flexible)


@settings(max_examples=400)
@given(tenant_inputs, pools, idle_shares, states)
def test_all_active_within_capacity_get_their_request(
    ts: list[TenantInput], p: Pools, idle: int, s: GpuState
) -> None:
    """Balanced, everyone active, requests summing to <= 100 %: each gets at least its request."""
    ts = [replace(t, mode=BAL, active=True) for t in ts]
    if sum(t.requested for t in ts) <= W:
        shares = _run(ts, p, idle, s)
        assert all(shares[t.key] >= t.requested for t in ts)


@settings(max_examples=400)
@given(tenant_inputs, pools, idle_shares)
def test_latency_priority_is_respected_under_contention(
    ts: list[TenantInput], p: Pools, idle: int
) -> None:
    """When active requests oversubscribe the GPU, best-effort tenants get more than their
    floor only once every latency tenant has its whole request."""
    ts = [replace(t, mode=BAL, active=True) for t in ts]
    if sum(t.requested for t in ts) <= W or sum(floor_of(t, p) for t in ts) > W:
        return
    shares = _run(ts, p, idle, GpuState())
    be_above_floor = any(
        shares[t.key] > floor_of(t, p) + len(ts) for t in ts if t.priority == Priority.BEST_EFFORT
    )
    if be_above_floor:
        latency = [t for t in ts if t.priority == Priority.LATENCY]
        assert all(shares[t.key] >= t.requested - len(ts) for t in latency)


@settings(max_examples=200)
@given(tenant_inputs, pools, idle_shares)
def test_fully_tight_adaptive_is_no_more_than_strict(
    ts: list[TenantInput], p: Pools, idle: int
) -> None:
    """At tightness 100 an active adaptive tenant gets at most its request, like strict."""
    shares = allocate(ts, p, idle, GpuState(True, 100), AdaptiveParams(0, 0, 100)).shares
    for t in ts:
        if t.mode == IsolationMode.ADAPTIVE and t.active:
            assert shares[t.key] <= t.requested


@given(st.lists(st.integers(21, 49), min_size=1, max_size=50), states)
def test_adaptive_never_flips_between_the_marks(levels: list[int], s: GpuState) -> None:
    """Contention that stays between the low and high marks never changes the mode."""
    params = AdaptiveParams(50, 20, 25)
    for level in levels:
        nxt = step_adaptive(s, level, params)
        assert nxt.tight == s.tight
        s = nxt


def test_full_load_clock_is_learned_only_at_full_load_under_power_bound_work() -> None:
    learn = policy.learn_full_load_clock
    assert learn(0.0, nvml.ClockReading(1980, 40)) == 0.0  # partly idle: not the reference
    assert learn(0.0, nvml.ClockReading(1470, 99)) == 1470.0
    assert learn(1470.0, nvml.ClockReading(1550, 97)) == 1480.0  # an eighth of the way
    assert learn(1470.0, nvml.ClockReading(0, 100)) == 1470.0
    # Busy, but far from the power limit (small kernels): the top clock is not the reference.
    assert learn(1470.0, nvml.ClockReading(1980, 100, 551.0, 700.0)) == 1470.0
    assert learn(0.0, nvml.ClockReading(1480, 100, 695.0, 700.0)) == 1480.0


# Readings of a 700 W GPU (bench/results/compute-diagnosis.md): clock, utilisation, power.
GEMM_AT_10 = nvml.ClockReading(1965, 10, 187.0, 700.0)  # bf16 12288 at a 10 % duty
GEMM_AT_75 = nvml.ClockReading(1660, 75, 671.0, 700.0)
SMALL_AT_10 = nvml.ClockReading(1980, 10, 148.0, 700.0)  # bf16 1792 (20 us)
SMALL_AT_75 = nvml.ClockReading(1980, 75, 351.0, 700.0)


def test_power_bound_work_is_told_from_work_that_never_reaches_the_limit() -> None:
    assert policy.power_bound_centi(GEMM_AT_10) == policy.WHOLE_GPU_CENTI
    assert policy.power_bound_centi(GEMM_AT_75) == policy.WHOLE_GPU_CENTI
    assert policy.power_bound_centi(SMALL_AT_10) == 0
    assert policy.power_bound_centi(SMALL_AT_75) == 0
    assert policy.power_bound_centi(nvml.ClockReading(1980, 0, 90.0, 700.0)) == 0  # idle
    # In between (flat out it would draw the limit itself): half-way.
    assert policy.power_bound_centi(nvml.ClockReading(1980, 50, 402.5, 700.0)) == 5000
    # No power readings: power-bound, the clock ratio alone decides.
    assert policy.power_bound_centi(nvml.ClockReading(1980, 10)) == policy.WHOLE_GPU_CENTI


def test_clock_scale_is_capped_weighted_bounded_and_zero_until_known() -> None:
    scale = policy.clock_scale_centi
    assert scale(0.0, GEMM_AT_10, 115) == 0
    assert scale(1465.0, GEMM_AT_10, 115) == 11500  # ratio 1.34, capped
    assert scale(1465.0, GEMM_AT_75, 115) == 11331  # ratio 1.13, under the cap
    assert scale(1465.0, GEMM_AT_10, 200) == 13413
    assert scale(1465.0, SMALL_AT_10, 115) == policy.WHOLE_GPU_CENTI  # not power-bound
    assert scale(1500.0, nvml.ClockReading(1500, 100), 115) == policy.WHOLE_GPU_CENTI
    # Read while idle between kernels, or slowed down: never charged below their time.
    assert scale(1500.0, nvml.ClockReading(300, 10), 115) == policy.WHOLE_GPU_CENTI


# ---- turns -------------------------------------------------------------------------


def test_busy_tenants_get_windows_of_the_cycle_in_key_order_by_share() -> None:
    """30 % and 70 %, both busy, a 50 ms cycle: b has 0-15 ms, a 15-50 ms; the idle c none."""
    words = policy.turns(
        [
            policy.TurnInput("b", 3000, busy=True),
            policy.TurnInput("a", 7000, busy=True),
            policy.TurnInput("c", 1000, busy=False),
        ],
        50_000,
    )
    assert {k: abi.unpack_turn(w) for k, w in words.items()} == {
        "a": (50_000, 0, 35_000),
        "b": (50_000, 35_000, 15_000),
        "c": (0, 0, 0),
    }


def test_no_turns_for_a_lone_busy_tenant_or_a_zero_cycle() -> None:
    alone = [policy.TurnInput("a", 3000, busy=True), policy.TurnInput("b", 7000, busy=False)]
    assert set(policy.turns(alone, 50_000).values()) == {0}
    pair = [policy.TurnInput("a", 3000, busy=True), policy.TurnInput("b", 7000, busy=True)]
    assert set(policy.turns(pair, 0).values()) == {0}


def test_a_cycle_is_fitted_to_long_kernels_and_kept_while_they_jitter() -> None:
    """5.3 ms kernels at 30 / 70 % fill windows of a 50 ms cycle with 2.8 and 6.6 kernels:
    the last runs into the neighbour's window or leaves a hole.  53 ms holds 3 and 7.  It
    stays while the kernel times move a little; 20 us and 0.58 ms kernels keep 50 ms."""

    def cycle(kernel_us: tuple[float, float], current: int = 0) -> int:
        pair = [
            policy.TurnInput("a", 3000, busy=True, kernel_us=kernel_us[0]),
            policy.TurnInput("b", 7000, busy=True, kernel_us=kernel_us[1]),
        ]
        words = policy.turns(pair, 50_000, current)
        assert words["a"] and words["b"]
        assert abi.unpack_turn(words["a"])[0] == abi.unpack_turn(words["b"])[0]
        return abi.unpack_turn(words["a"])[0]

    assert cycle((5300, 5300)) == 53_000
    assert cycle((5400, 5200), current=53_000) == 53_000
    assert cycle((21.5, 21.5)) == cycle((580, 580)) == cycle((0, 0)) == 50_000
    assert cycle((21.5, 21.5), current=53_000) == 53_000  # fits as well: no change


@settings(max_examples=200, deadline=None)
@given(
    shares=st.lists(st.integers(min_value=1, max_value=W), min_size=2, max_size=8),
    cycle_ms=st.integers(min_value=10, max_value=1000),
    kernel_us=st.lists(st.floats(min_value=0, max_value=1e6), min_size=8, max_size=8),
)
def test_windows_never_overlap_and_fit_the_cycle(
    shares: list[int], cycle_ms: int, kernel_us: list[float]
) -> None:
    inputs = [
        policy.TurnInput(f"t{i}", s, busy=True, kernel_us=k)
        for i, (s, k) in enumerate(zip(shares, kernel_us, strict=False))
    ]
    words = policy.turns(inputs, cycle_ms * 1000).values()
    turns = [t for t in map(abi.unpack_turn, words) if t[0]]
    cycles = {cycle for cycle, _, _ in turns}
    assert len(cycles) <= 1
    for cycle in cycles:
        assert 0.8 * cycle_ms * 1000 - 1 <= cycle <= min(1.25 * cycle_ms * 1000, abi.TURN_MAX_US)
    spans = sorted((start, start + length) for _, start, length in turns)
    assert all(end <= cycle for _, end in spans for cycle in cycles)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
