"""observer.shares: the policy's shares written into the slots, turns for busy time-sliced
tenants fitted to their kernels, the heartbeat, and the requests given back on stop."""

from __future__ import annotations

import pytest

from fcsp_hook.observer.shares import Shares
from fcsp_hook.observer.tenants import Tenants
from fcsp_hook.slot import abi, files, live
from tests.observer.scene import MS, Scene

STRICT = abi.IsolationMode.STRICT


def _dev(sm: int, **kw: object) -> files.DeviceLimits:
    return files.DeviceLimits(host_index=0, sm_requested_centi=sm, **kw)  # type: ignore[arg-type]


class Ticks:
    """The tenants duty then the shares duty, tick by tick, with busy tenants working."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.shares = Shares()
        self.tenants = Tenants()

    def step(self, busy: set[str], ticks: int = 1, step_ns: int = 10 * MS, **work: int) -> None:
        for _ in range(ticks):
            self.scene.busy(*busy, **work)
            self.scene.run(self.tenants, self.shares, step_ns=step_ns)


@pytest.fixture
def ticks(scene: Scene) -> Ticks:
    return Ticks(scene)


# Four balanced tenants at 25 %: which are busy -> the shares written.  Idle tenants keep
# 1 % to wake on (idle_share_pct), and the shares never sum past the GPU.
WORKDAY = [
    ({"a", "b", "c", "d"}, [2500, 2500, 2500, 2500]),
    ({"a", "b", "c"}, [3300, 3300, 3300, 100]),
    ({"a"}, [9700, 100, 100, 100]),
    ({"a", "d"}, [4900, 100, 100, 4900]),
]


def test_idle_capacity_flows_to_busy_tenants(scene: Scene, ticks: Ticks) -> None:
    """Work conservation, tick by tick: what idle tenants leave goes to the busy ones."""
    for cid in "abcd":
        scene.add(cid)
    for busy, shares in WORKDAY:
        ticks.step(busy, ticks=40)  # 400 ms: past the idle window, the policy settled
        got = [scene.effective(c) for c in "abcd"]
        assert got == shares, busy
        assert sum(got) <= abi.WHOLE_GPU_CENTI


def test_no_share_is_written_as_zero(scene: Scene, ticks: Ticks) -> None:
    """With idle_share_pct = 0 idle tenants get 0.01 %, never 0 (the shim's "unset")."""
    scene.configure(idle_share_pct=0)
    scene.add("a")
    scene.add("b")
    ticks.step(set(), ticks=20)
    assert scene.effective("a") == scene.effective("b") == 1


def test_every_slot_gets_a_heartbeat_that_moves_forward(scene: Scene, ticks: Ticks) -> None:
    """Each tick beats every slot; a slot that appears gets heartbeats from its first tick."""
    scene.add("a")
    ticks.step(set())
    scene.add("late")
    ticks.step(set())
    first = scene.limits("late").observer_heartbeat_ns
    assert first > 0 and scene.limits("a").observer_heartbeat_ns >= first
    ticks.step(set())
    assert first < scene.limits("late").observer_heartbeat_ns <= live.monotonic_ns()


def test_stop_gives_tenants_their_requests_back(scene: Scene, ticks: Ticks) -> None:
    """A stopping observer leaves each slot as no observer would: requests in force, no
    turns, no clock scale, heartbeat 0."""
    scene.add("a", _dev(3000), mode=STRICT)
    scene.add("b", _dev(7000), mode=STRICT)
    ticks.step({"a", "b"}, ticks=10)
    assert scene.turn("a") != (0, 0, 0)
    ticks.shares.stop(scene.state)
    for cid, share in (("a", 3000), ("b", 7000)):
        limits = scene.limits(cid)
        assert limits.device[0].sm_effective_centi == share
        assert limits.device[0].turn == 0 and limits.observer_heartbeat_ns == 0


def test_busy_tenants_take_turns_and_stop_when_one_idles(scene: Scene, ticks: Ticks) -> None:
    """Two strict tenants (30 / 70 %) that use all of their shares get windows of the 50 ms
    cycle by share; when one idles the other launches at any time again; busy again, turns
    again."""
    scene.add("a", _dev(3000), mode=STRICT)
    scene.add("b", _dev(7000), mode=STRICT)
    ticks.step({"a", "b"}, ticks=5)
    assert [scene.turn(c) for c in "ab"] == [(50_000, 0, 15_000), (50_000, 15_000, 35_000)]
    assert scene.state.shares["nvidia0"].turning
    ticks.step({"a"}, ticks=20)
    assert [scene.turn(c) for c in "ab"] == [(0, 0, 0), (0, 0, 0)]
    assert not scene.state.shares["nvidia0"].turning
    ticks.step({"a", "b"}, ticks=5)
    assert scene.turn("a") == (50_000, 0, 15_000)


def test_turns_of_tenants_with_long_kernels_hold_whole_kernels(scene: Scene, ticks: Ticks) -> None:
    """Tenants whose launches take 5.3 ms each at 30 / 70 %: windows of the 50 ms cycle
    would hold 2.8 and 6.6 of their kernels; once their launch size is measured in turns
    (a few half-second spans) the cycle is about 53 ms: 3 and 7 kernels."""
    scene.add("a", _dev(3000), mode=STRICT)
    scene.add("b", _dev(7000), mode=STRICT)
    ticks.step({"a", "b"}, ticks=300, kernel_ns=5_300_000)
    lengths = [scene.turn(c)[2] / 5300 for c in "ab"]
    assert lengths == [pytest.approx(3, abs=0.1), pytest.approx(7, abs=0.1)]


def test_turn_cycles_fit_only_kernels_measured_in_turns(scene: Scene, ticks: Ticks) -> None:
    """Time-sliced, a tenant's launches read long (its estimates hold its neighbour's
    slices): 9.7 ms kernels within their shares for 2.5 s, then 5.3 ms ones wanting more.
    The cycle is fitted to what they launch in turns only: 50 ms until that is known, then
    about 53 ms, never one fitted to 9.7 ms kernels; turns that end while both pause resume
    at the fitted cycle."""
    scene.add("a", _dev(3000), mode=STRICT)
    scene.add("b", _dev(7000), mode=STRICT)
    ticks.step({"a", "b"}, ticks=250, kernel_ns=9_700_000, throttled_ns=0)
    assert scene.turn("a") == (0, 0, 0)  # within their shares: no turns
    cycles = set()
    for _ in range(300):
        ticks.step({"a", "b"}, kernel_ns=5_300_000)
        cycles.add(scene.turn("a")[0])
    assert all(c == 50_000 or abs(c - 53_000) < 800 for c in cycles), cycles
    assert [round(scene.turn(c)[2] / 5300, 1) for c in "ab"] == [3.0, 7.0]
    ticks.step(set(), ticks=30)  # both pause: turns end
    assert scene.turn("a") == (0, 0, 0)
    ticks.step({"a", "b"}, ticks=5, kernel_ns=5_300_000)
    assert abs(scene.turn("a")[0] - 53_000) < 800


def test_latency_and_unlimited_tenants_never_take_turns(scene: Scene, ticks: Ticks) -> None:
    """Busy: a best-effort tenant, a latency-priority one (it must never wait for a window)
    and one in mode none (not limited at all): nobody takes turns, since only one of them
    may.  Once a second best-effort tenant is busy too, those two take turns, alone, each
    for its share of the cycle (the other 40 % is nobody's window: the others run then)."""
    scene.add("a", _dev(3000), mode=STRICT)
    scene.add("b", _dev(3000), mode=STRICT)
    scene.add("lat", _dev(3000), mode=STRICT, priority=abi.Priority.LATENCY)
    scene.add("free", _dev(1000), mode=abi.IsolationMode.NONE)
    ticks.step({"a", "lat", "free"}, ticks=30)
    assert {scene.turn(c) for c in ("a", "b", "lat", "free")} == {(0, 0, 0)}
    ticks.step({"a", "b", "lat", "free"}, ticks=5)
    assert [scene.turn(c) for c in "ab"] == [(50_000, 0, 15_000), (50_000, 15_000, 15_000)]
    assert scene.turn("lat") == scene.turn("free") == (0, 0, 0)


def test_tenants_on_other_gpus_are_decided_apart(scene: Scene, ticks: Ticks) -> None:
    """Each GPU is shared among the tenants that see it: two busy strict tenants on
    different GPUs take no turns; a GPU nobody uses any more is forgotten."""
    scene.add("a", _dev(3000), mode=STRICT)
    scene.add("b", files.DeviceLimits(host_index=1, sm_requested_centi=7000), mode=STRICT)
    ticks.step({"a", "b"}, ticks=5)
    assert set(scene.state.shares) == {"nvidia0", "nvidia1"}
    assert scene.turn("a") == scene.turn("b") == (0, 0, 0)
    files.remove_slot(scene.run_dir, "b")
    ticks.step({"a"}, ticks=1, step_ns=1_100 * MS)
    assert set(scene.state.shares) == {"nvidia0"}
