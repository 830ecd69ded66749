"""observer.backstop: a tenant above its share by the driver's count is frozen (its real
cgroup) for part of every period until it is back at its share; an honest tenant never is;
nothing it froze stays frozen."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from fcsp_hook import cgroups, nvml
from fcsp_hook.observer import backstop
from fcsp_hook.observer.backstop import Backstop
from fcsp_hook.observer.mpsd import DaemonState
from fcsp_hook.observer.tenants import Tenants
from fcsp_hook.slot import abi, files
from tests.cgroup import fresh_cgroup, join
from tests.observer.scene import MS, Scene

SECOND = 1_000 * MS


@pytest.fixture
def group() -> Iterator[cgroups.Cgroup]:
    """A tenant's container: a real cgroup with a process in it."""
    with fresh_cgroup() as g:
        proc = subprocess.Popen(["sleep", "600"])
        join(g, proc)
        yield g
        g.set_frozen(False)  # a frozen process cannot die
        proc.kill()
        proc.wait()


def _tenant(scene: Scene, cid: str, group: cgroups.Cgroup | None, sm: int = 1000) -> None:
    scene.add(
        cid, files.DeviceLimits(uuid="GPU-x", sm_requested_centi=sm), mode=abi.IsolationMode.STRICT
    )
    if group is not None:
        (files.slot_path(scene.run_dir, cid) / cgroups.CGROUP_FILE).write_text(group.to_text())
    scene.run(Tenants())


def _quiet(
    scene: Scene, held: set[str], used: dict[str, int], busy: float | None = None
) -> backstop.QuietReading:
    """A quiet reading of GPU-x now, with these tenants held on it."""
    return backstop.QuietReading(scene.now_ns, "GPU-x", frozenset(held), used, busy)


def _read(
    duty: Backstop,
    scene: Scene,
    used: dict[str, int],
    seconds: int = 1,
    quiet: dict[str, int] | None = None,
) -> None:
    """seconds of readings, one a second: each tenant used this percent of GPU-x; and
    quiet readings: the tenants not held used this while the held were frozen."""
    for _ in range(seconds):
        scene.now_ns += SECOND
        duty.record(scene.state, scene.now_ns, {(c, "GPU-x"): u for c, u in used.items()}, SECOND)
        if quiet is not None:
            held = duty.held_by_gpu(scene.state).get("GPU-x", {})
            duty.record_quiet(_quiet(scene, set(held), quiet, sum(quiet.values())))
        duty.judge(scene.state, scene.now_ns)


@pytest.mark.parametrize(
    ("duty", "used", "share", "after"),
    [
        (0.0, 100, 10, 0.9),  # first reading: straight to what holds it at its share
        (0.0, 10, 10, 0.0),
        (0.9, 10, 10, 0.9),  # held at its share: stays held
        (0.5, 50, 10, 0.75),  # once held, the time it runs at most halves per reading
        (0.9, 1, 10, 0.8),  # and at most doubles
        (0.6, 0, 10, 0.2),
        (0.2, 0, 10, 0.0),  # running all the time keeps it at its share: released
        (0.0, 100, 1, 0.95),  # never frozen all the time: its processes must be able to exit
    ],
)
def test_the_duty_that_brings_a_tenant_to_its_share(
    duty: float, used: int, share: int, after: float
) -> None:
    assert backstop.next_duty(duty, used, share) == pytest.approx(after)


def test_a_greedy_tenant_is_frozen_part_of_the_time(scene: Scene, group: cgroups.Cgroup) -> None:
    """10 % strict, 100 % of the GPU by NVML's count: frozen 90 % of each period, the reading
    it is held by published, its cgroup recorded for a later observer; once it keeps to its
    share, thawed and released."""
    duty = Backstop()
    _tenant(scene, "greedy", group)
    _read(duty, scene, {"greedy": 100}, seconds=2)  # judged on two readings at least
    assert duty.holds["greedy"].duty == pytest.approx(0.9)
    assert scene.tenant("greedy").held_pct == 90
    assert scene.tenant("greedy").held_reading_pct == 100
    assert scene.events("tenant above its share by the driver's count: frozen part of the time")
    recorded = json.loads((scene.run_dir / backstop.FROZEN_FILE).read_text())
    assert [cgroups.Cgroup.from_text(t) for t in recorded] == [group]
    duty.actuate(scene.state, 10 * backstop.PERIOD_NS)  # the start of a period: frozen
    assert group.frozen() is True
    duty.actuate(scene.state, 10 * backstop.PERIOD_NS + int(0.95 * backstop.PERIOD_NS))
    assert group.frozen() is False
    duty.actuate(scene.state, 11 * backstop.PERIOD_NS)
    assert group.frozen() is True
    _read(duty, scene, {"greedy": 10}, seconds=6, quiet={})  # held at its share ...
    _read(duty, scene, {"greedy": 0}, seconds=10, quiet={})  # ... then idle: released
    assert duty.holds["greedy"].duty == 0.0 and scene.tenant("greedy").held_pct == 0
    assert scene.tenant("greedy").held_reading_pct < 10 + 3
    duty.actuate(scene.state, 12 * backstop.PERIOD_NS)
    assert group.frozen() is False
    assert scene.events("tenant back at its share: no longer frozen")
    assert not (scene.run_dir / backstop.FROZEN_FILE).exists()


def test_a_held_tenant_that_stays_busy_runs_at_most_its_share_of_each_period(
    scene: Scene, group: cgroups.Cgroup
) -> None:
    """Held at 10 %, a tenant whose readings count less than it runs, and by turns less than
    half its share (as an H100's did for one duty-cycled to 10-35 %), is not let run longer:
    frozen 90 % of each period while its readings over the window average at least a quarter
    of its share; once they average less, let go step by step."""
    duty = Backstop()
    _tenant(scene, "greedy", group)
    _read(duty, scene, {"greedy": 100}, seconds=2)
    for used in [6, 2, 1, 9, 3, 1, 2, 8, 2, 1]:
        _read(duty, scene, {"greedy": used})
        assert duty.holds["greedy"].duty == pytest.approx(0.9)
    _read(duty, scene, {"greedy": 1}, seconds=12)
    assert duty.holds["greedy"].duty == 0.0


@pytest.mark.parametrize("used", [10, 12, 13])
def test_a_tenant_at_its_share_is_never_frozen(
    scene: Scene, group: cgroups.Cgroup, used: int
) -> None:
    """At its share, or a little above it in a reading (within the margin), for a minute."""
    duty = Backstop()
    _tenant(scene, "honest", group)
    _read(duty, scene, {"honest": used}, seconds=60)
    assert "honest" not in duty.holds or duty.holds["honest"].duty == 0.0
    duty.actuate(scene.state, 10 * backstop.PERIOD_NS)
    assert group.frozen() is False


R = backstop.Reading


@pytest.mark.parametrize(
    ("readings", "held", "points"),
    [
        # alone: judged on its reading as it is
        ([R("a", "g", 25, 10, True)], set(), {"a": 15}),
        # next to one further above its share: allowed the time the driver counted for the
        # other, what it may have waited on; the other is judged as read
        ([R("a", "g", 61, 10, True), R("b", "g", 99, 10, True)], set(), {"a": -48, "b": 89}),
        # once that one is held near its share, everyone is judged on what is left
        ([R("a", "g", 30, 10, True), R("b", "g", 12, 10, True)], {"b"}, {"a": 8, "b": -28}),
        ([R("a", "g", 20, 10, True), R("b", "g", 12, 10, True)], {"b"}, {"a": -2, "b": -18}),
        # (with nobody held, the furthest is judged as read, however little above)
        ([R("a", "g", 14, 10, True), R("b", "g", 12, 10, True)], set(), {"a": 4, "b": -12}),
        # an unlimited neighbour is never judged, but its time counts as waited on
        ([R("a", "g", 40, 10, True), R("u", "g", 60, 100, False)], set(), {"a": 30}),
        (
            [R("a", "g", 40, 10, True), R("b", "g", 70, 10, True), R("u", "g", 60, 100, False)],
            set(),
            {"a": -100, "b": 60},
        ),
        # two who both take more: the furthest as read, the other less the first's time
        ([R("a", "g", 50, 10, True), R("b", "g", 45, 10, True)], set(), {"a": 40, "b": -15}),
        # a tenant on two GPUs: its worst GPU's points; neighbours only count on their GPU
        (
            [R("a", "g", 30, 10, True), R("a", "h", 12, 10, True), R("b", "h", 90, 50, True)],
            set(),
            {"a": 20, "b": 40},
        ),
    ],
)
def test_points_above_share_allow_for_time_waited_on_neighbours(
    readings: list[backstop.Reading], held: set[str], points: dict[str, float]
) -> None:
    assert backstop.points_above_share(readings, held) == pytest.approx(points)


@pytest.mark.parametrize(
    ("readings", "unshimmed", "suspect"),
    [
        ([R("a", "g", 79, 40, True), R("b", "g", 58, 40, True)], set(), "a"),
        # processes without the shim: suspected first, whatever they read while they run
        ([R("a", "g", 79, 40, True), R("b", "g", 58, 40, True)], {"b"}, "b"),
        ([R("a", "g", 81, 40, True), R("b", "g", 14, 40, True)], {"b"}, "b"),
        ([R("a", "g", 79, 40, True), R("b", "g", 0, 40, True)], {"b"}, "a"),
    ],
)
def test_a_tenant_with_processes_without_the_shim_is_suspected_first(
    readings: list[backstop.Reading], unshimmed: set[str], suspect: str
) -> None:
    assert backstop.suspect_per_gpu(readings, frozenset(unshimmed)) == {"g": suspect}


def _two(
    scene: Scene, honest_group: cgroups.Cgroup, greedy_sm: int = 1000, honest_sm: int = 1000
) -> Iterator[cgroups.Cgroup]:
    with fresh_cgroup() as greedy_group:
        proc = subprocess.Popen(["sleep", "600"])
        join(greedy_group, proc)
        try:
            _tenant(scene, "honest", honest_group, honest_sm)
            _tenant(scene, "greedy", greedy_group, greedy_sm)
            yield greedy_group
        finally:
            greedy_group.set_frozen(False)
            proc.kill()
            proc.wait()


def test_a_tenant_next_to_a_greedy_one_is_never_frozen(scene: Scene, group: cgroups.Cgroup) -> None:
    """Both at 10 % strict on one GPU, as measured on an H100: the shimmed one's first
    reading comes alone (61 %, its kernels waiting on the other's time slices), then the
    one that bypasses its shim reads 99 %.  The greedy one is frozen; held near its share,
    it still runs in bursts that the neighbour waits on (20 %); neither then nor before is
    the neighbour frozen."""
    duty = Backstop()
    for _ in _two(scene, group):
        _read(duty, scene, {"honest": 61})
        _read(duty, scene, {"greedy": 99, "honest": 61}, seconds=2)
        assert duty.holds["greedy"].duty > 0.5
        _read(duty, scene, {"greedy": 12, "honest": 20}, seconds=60)
        assert duty.holds["greedy"].duty > 0.0
        assert duty.holds["honest"].duty == 0.0
        assert scene.tenant("honest").held_pct == 0


def test_beside_a_held_tenant_a_neighbour_is_judged_while_that_one_is_frozen(
    scene: Scene, group: cgroups.Cgroup
) -> None:
    """As on an H100: once the greedy tenant is held, it runs in bursts that the shimmed
    one waits on, which the driver counts as the shimmed one's (40 % against the greedy's
    11 %); while the greedy one is frozen, the shimmed one reads its 10 %.  It is judged on
    those quiet readings alone, and before there are two of them not at all: never
    frozen."""
    duty = Backstop()
    for _ in _two(scene, group):
        _read(duty, scene, {"greedy": 99, "honest": 61}, seconds=2)
        assert duty.holds["greedy"].duty >= 0.75  # frozen 750 ms of a 1 s period
        for _ in range(30):
            _read(duty, scene, {"greedy": 11, "honest": 40}, quiet={"honest": 10})
            assert duty.holds["honest"].duty == 0.0
        assert duty.holds["greedy"].duty > 0.0


def test_two_greedy_tenants_on_one_gpu_are_both_frozen(scene: Scene, group: cgroups.Cgroup) -> None:
    """Two tenants at 10 % that both bypass their shims and share the GPU evenly: the
    allowance for the other's time hides neither.  The one first held is let go once the
    other is found above its share while it was frozen, and held again, for good, once it
    is found so while the other is."""
    duty = Backstop()
    for _ in _two(scene, group):
        _read(duty, scene, {"greedy": 50, "honest": 48}, seconds=2)
        assert duty.holds["greedy"].duty > 0.0 and not duty.holds["greedy"].proven
        _read(duty, scene, {"greedy": 10, "honest": 90}, seconds=3, quiet={"honest": 100})
        assert duty.holds["honest"].duty > 0.0 and duty.holds["honest"].proven
        assert duty.holds["greedy"].duty == 0.0
        _read(duty, scene, {"greedy": 90, "honest": 10}, seconds=5, quiet={"greedy": 100})
        assert duty.holds["greedy"].proven and duty.holds["honest"].proven
        _read(duty, scene, {"greedy": 10, "honest": 10}, seconds=3)
        assert duty.holds["greedy"].duty > 0.0 and duty.holds["honest"].duty > 0.0


def _honest_never_held_beside_greedy_held_at_40(duty: Backstop, scene: Scene) -> None:
    """30 s of the greedy tenant held, the shimmed one reading 60 % while it runs (waiting
    on it) and its 40 % while it is frozen: the shimmed one is never held."""
    for _ in range(30):
        _read(duty, scene, {"greedy": 30, "honest": 60}, quiet={"honest": 40})
        assert duty.holds["honest"].duty == 0.0
    assert duty.holds["greedy"].duty > 0.0


def test_a_neighbour_held_first_is_let_go_once_the_greedy_one_is_found(
    scene: Scene, group: cgroups.Cgroup
) -> None:
    """Both at 40 % strict, as on an H100: the shimmed tenant, waiting on the one that
    bypasses its shim, reads 79 %, more than that one, so the shimmed one is held first.
    While it is frozen, the other reads 100 %: held on that, and the shimmed one let go.
    While the greedy one is frozen, the shimmed one reads its 40 %: never held again."""
    duty = Backstop()
    for _ in _two(scene, group, greedy_sm=4000, honest_sm=4000):
        while "honest" not in duty.holds or duty.holds["honest"].duty == 0.0:
            _read(duty, scene, {"greedy": 58, "honest": 79})
        assert duty.holds["greedy"].duty == 0.0
        _read(duty, scene, {"greedy": 70, "honest": 30}, seconds=3, quiet={"greedy": 100})
        assert duty.holds["greedy"].duty > 0.0 and duty.holds["greedy"].proven
        assert duty.holds["honest"].duty == 0.0 and scene.tenant("honest").held_pct == 0
        assert scene.events("no longer frozen: a neighbour ran above its share while it was")
        _honest_never_held_beside_greedy_held_at_40(duty, scene)


def test_beside_a_tenant_without_the_shim_a_shimmed_one_is_never_held(
    scene: Scene, group: cgroups.Cgroup
) -> None:
    """The same at 40 %, but the driver lists processes of the greedy tenant that run
    without the shim: it is suspected first, though it reads less, and the shimmed one,
    judged on quiet readings from then on, is never held."""
    duty = Backstop()
    for _ in _two(scene, group, greedy_sm=4000, honest_sm=4000):
        scene.tenant("greedy").unshimmed = [GREEDY_PID]
        while "greedy" not in duty.holds or duty.holds["greedy"].duty == 0.0:
            _read(duty, scene, {"greedy": 58, "honest": 79})
            assert duty.holds["honest"].duty == 0.0
        _honest_never_held_beside_greedy_held_at_40(duty, scene)


def test_a_hold_too_short_for_quiet_readings_leaves_the_allowance(
    scene: Scene, group: cgroups.Cgroup
) -> None:
    """A greedy tenant at an 80 % share is frozen a fifth of the time, 500 ms of the longest
    period (half the window), too little for a quiet reading: its neighbour is judged on its
    readings less the time the driver counted for the greedy one, and held once that leaves
    it above its share."""
    duty = Backstop()
    for _ in _two(scene, group, greedy_sm=8000):
        while "greedy" not in duty.holds or duty.holds["greedy"].duty == 0.0:
            _read(duty, scene, {"greedy": 100, "honest": 10})
        duties = [duty.holds["greedy"].duty]
        assert max(duties) * backstop.hold_period_ns(duties, 5 * SECOND) < 750 * MS
        _read(duty, scene, {"greedy": 80, "honest": 30}, seconds=2)
        assert duty.holds["honest"].duty == 0.0
        _read(duty, scene, {"greedy": 50, "honest": 80}, seconds=5)
        assert duty.holds["honest"].duty > 0.0


@pytest.mark.parametrize(
    ("duties", "window_s", "period_ms"),
    [
        ([], 5, 1000),
        ([0.9], 5, 1000),  # frozen 900 ms of the shortest period: quiet readings
        ([0.5], 5, 1700),  # made long enough to be frozen 850 ms
        ([0.9, 0.4], 5, 2125),  # for the least held
        ([0.2], 5, 2500),  # at most half the window, which is to hold two quiet readings
        ([0.5], 1, 1000),
    ],
)
def test_a_hold_period_is_long_enough_for_quiet_readings(
    duties: list[float], window_s: int, period_ms: int
) -> None:
    assert backstop.hold_period_ns(duties, window_s * SECOND) == period_ms * MS


@pytest.mark.parametrize(
    ("duties", "on_mps", "period_ms"),
    [
        ([0.5], [0.5], 1700),  # running 850 ms: samples of it
        ([0.8], [0.6, 0.8], 1250),  # made long enough for the most held to run 250 ms
        ([0.5, 0.9], [0.9], 2500),  # at most half the window
    ],
)
def test_a_hold_beside_an_mps_server_runs_long_enough_for_samples_of_it(
    duties: list[float], on_mps: list[float], period_ms: int
) -> None:
    assert backstop.hold_period_ns(duties, 5 * SECOND, on_mps) == pytest.approx(period_ms * MS)


def test_an_mps_tenant_is_read_by_its_processes_outside_mps(scene: Scene) -> None:
    """On its MPS GPU a tenant's MPS clients say nothing of it (the driver's per-process
    utilisation does not tell them apart, and the daemon caps their SMs): only its processes
    NVML lists outside MPS count.  A time-sliced tenant's processes all do."""
    scene.add("mps", files.DeviceLimits(uuid="GPU-x", backend=abi.Backend.MPS))
    scene.add("sliced", files.DeviceLimits(uuid="GPU-x"))
    scene.run(Tenants())
    scene.state.members = {1: ("mps", 1), 2: ("mps", 2), 3: ("sliced", 3), 4: ("sliced", 4)}
    scene.tenant("mps").outside_mps = [2]
    used = backstop._by_tenant(scene.state, "GPU-x", {1: 50, 2: 30, 3: 15, 4: 5, 9: 99})
    assert used == {"mps": 30, "sliced": 20}


@pytest.mark.parametrize(("server_busy", "frozen"), [(100.0, 0.8), (20.0, 1 - 10 / 80), (0.0, 0.9)])
def test_beside_a_busy_mps_server_a_held_tenant_is_charged_the_time_it_is_left(
    scene: Scene, group: cgroups.Cgroup, server_busy: float, frozen: float
) -> None:
    """A strict 10 % MPS tenant's process outside MPS, held beside the MPS server: the GPU
    time-slices the two contexts, and the driver counts the process's wait for the server's
    slices as its own, all the time it runs (its own samples: 100 %).  With the server busy
    all the time the tenant is frozen (its quiet readings), it runs half of the time it is
    let run: charged 100 % of a fifth of each period at half, 10 %, and left frozen 0.8 of
    each period, not 0.9 (which held an H100's to 4.2-4.8 % of its solo throughput).  A
    server busy 20 % of the time leaves it 80 %; an idle one, all."""
    scene.add(
        "greedy",
        files.DeviceLimits(uuid="GPU-x", sm_requested_centi=1000, backend=abi.Backend.MPS),
        mode=abi.IsolationMode.STRICT,
    )
    (files.slot_path(scene.run_dir, "greedy") / cgroups.CGROUP_FILE).write_text(group.to_text())
    scene.run(Tenants())
    scene.state.backends["GPU-x"] = DaemonState("GPU-x", backend="mps", pid=1)
    duty = Backstop()
    duty.holds["greedy"] = backstop.Hold(readings=5, duty=frozen, changed_ns=scene.now_ns)
    held = {"greedy"}
    duty.record_quiet(_quiet(scene, held, {}, server_busy))
    scene.now_ns += 2 * SECOND
    duty.running.extend((scene.now_ns - i * 200 * MS, "greedy", "GPU-x", 100) for i in range(5))
    worst = duty.worst_over_period(scene.state, "greedy", frozen, scene.now_ns)
    assert worst.used_pct == pytest.approx(100 * (1 - frozen) * (1 - min(server_busy, 50) / 100))
    duty.adjust_hold(scene.state, "greedy", worst, True, scene.now_ns)
    assert duty.holds["greedy"].duty == pytest.approx(frozen)


def test_a_period_keeps_the_length_it_started_with(scene: Scene, group: cgroups.Cgroup) -> None:
    """Held half the time: periods of 1.7 s, frozen for the first 850 ms of each; a duty
    that changes within a period changes the length of the next."""
    duty = Backstop()
    _tenant(scene, "greedy", group, sm=5000)
    duty.holds["greedy"] = backstop.Hold(readings=2, duty=0.5)
    start = 10 * SECOND
    for at_ms, frozen in [(0, True), (800, True), (900, False), (1650, False), (1700, True)]:
        duty.actuate(scene.state, start + at_ms * MS)
        assert group.frozen() is frozen, at_ms
    duty.holds["greedy"].duty = 0.9
    duty.actuate(scene.state, start + 3300 * MS)  # 0.9 of the 1.7 s that started at 1700
    assert group.frozen() is False
    duty.actuate(scene.state, start + 3400 * MS)
    assert group.frozen() is True
    assert duty.hold_period_ns == SECOND


def test_one_burst_is_judged_over_the_window(scene: Scene, group: cgroups.Cgroup) -> None:
    """A tenant just seen, above its share for one reading (a shim's first burst), is
    averaged over the whole window: not frozen."""
    duty = Backstop()
    _tenant(scene, "new", group)
    _read(duty, scene, {"new": 20})
    _read(duty, scene, {"new": 10}, seconds=10)
    assert duty.holds["new"].duty == 0.0


def test_a_paused_container_is_left_paused(scene: Scene, group: cgroups.Cgroup) -> None:
    """Frozen by someone else (an engine's pause): the backstop neither freezes nor thaws it."""
    duty = Backstop()
    _tenant(scene, "paused", group)
    group.set_frozen(True)
    _read(duty, scene, {"paused": 100})
    duty.actuate(scene.state, 10 * backstop.PERIOD_NS)
    duty.actuate(scene.state, 10 * backstop.PERIOD_NS + int(0.95 * backstop.PERIOD_NS))
    assert group.frozen() is True
    assert duty.holds["paused"].frozen is None


def test_stopping_thaws_and_a_new_observer_thaws_what_an_old_one_left(
    scene: Scene, group: cgroups.Cgroup
) -> None:
    duty = Backstop()
    _tenant(scene, "greedy", group)
    _read(duty, scene, {"greedy": 100}, seconds=2)
    duty.actuate(scene.state, 10 * backstop.PERIOD_NS)
    assert group.frozen() is True
    duty.stop(scene.state)
    assert group.frozen() is False
    # An observer killed while the tenant was frozen: the next one thaws it at start.
    _read(duty, scene, {"greedy": 100})
    duty.actuate(scene.state, 20 * backstop.PERIOD_NS)
    assert group.frozen() is True and (scene.run_dir / backstop.FROZEN_FILE).exists()
    Backstop().start(scene.state)
    assert group.frozen() is False
    assert not (scene.run_dir / backstop.FROZEN_FILE).exists()


def test_a_tenant_whose_slot_goes_while_frozen_is_thawed(
    scene: Scene, group: cgroups.Cgroup
) -> None:
    """Its slot removed by hand while its processes still run: the cgroup it froze is
    thawed, and no longer recorded as frozen."""
    duty = Backstop()
    _tenant(scene, "greedy", group)
    _read(duty, scene, {"greedy": 100}, seconds=2)
    duty.actuate(scene.state, 10 * backstop.PERIOD_NS)
    assert group.frozen() is True
    files.remove_slot(scene.run_dir, "greedy")
    scene.run(Tenants())
    _read(duty, scene, {})
    assert group.frozen() is False
    assert "greedy" not in duty.holds
    assert not (scene.run_dir / backstop.FROZEN_FILE).exists()


def test_tenants_without_a_cgroup_or_a_limit_are_not_held(scene: Scene) -> None:
    """No cgroup recorded (a slot from before), or mode none: readings, no hold."""
    duty = Backstop()
    _tenant(scene, "old", None)
    scene.add("free", files.DeviceLimits(uuid="GPU-x", sm_requested_centi=1000),
              mode=abi.IsolationMode.NONE)  # fmt: skip
    scene.run(Tenants())
    _read(duty, scene, {"old": 100, "free": 100}, seconds=5)
    assert duty.holds == {}
    assert scene.tenant("old").devices[0].driver_used_pct == 100


class DriverSamples:
    """pynvml's per-process utilisation as the driver answers it: a sample every 200 ms of
    its clock (us, here the scene's), the newest one if it ends after lastSeenTimeStamp;
    pct(pid, end_us) says what each process ran in the sample ending at end_us, 0 for none.
    The whole GPU's samples, every one after lastSeenTimeStamp of the last 4 s: busy(end_us)
    (default: the processes' summed)."""

    NVML_GPU_UTILIZATION_SAMPLES = 1

    def __init__(
        self,
        scene: Scene,
        pct: Callable[[int, int], int],
        busy: Callable[[int], int] | None = None,
    ) -> None:
        self.scene, self.pct = scene, pct
        self.busy = busy or (lambda end: sum(pct(p, end) for p in (GREEDY_PID, HONEST_PID)))

    def nvmlInit(self) -> None:  # pynvml's names
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetProcessUtilization(self, handle: int, since_us: int) -> list[Any]:
        end = self.scene.now_ns // 1000 // nvml.SAMPLE_US * nvml.SAMPLE_US
        if end <= since_us:
            raise RuntimeError("Not Found")
        ran = ((pid, self.pct(pid, end)) for pid in (GREEDY_PID, HONEST_PID))
        return [SimpleNamespace(pid=p, timeStamp=end, smUtil=u) for p, u in ran if u]

    def nvmlDeviceGetSamples(self, handle: int, kind: int, since_us: int) -> tuple[int, list[Any]]:
        newest = self.scene.now_ns // 1000 // nvml.SAMPLE_US * nvml.SAMPLE_US
        ends = range(newest - 19 * nvml.SAMPLE_US, newest + 1, nvml.SAMPLE_US)
        return 0, [
            SimpleNamespace(timeStamp=end, sampleValue=SimpleNamespace(uiVal=self.busy(end)))
            for end in ends
            if end > since_us
        ]


GREEDY_PID, HONEST_PID = 1_000_001, 1_000_002


def _held_beside_honest(
    duty: Backstop, scene: Scene, group: cgroups.Cgroup, driver: DriverSamples, seconds: int
) -> Iterator[int]:
    """The greedy tenant held at 0.9 beside the honest one, the driver's samples from
    driver: the duty run tick by tick (50 ms) for seconds, each tick's number yielded once
    it ran; the honest tenant is never frozen."""
    scene.state.nv = nvml.Nvml(lambda: driver)
    scene.state.gpus = [nvml.GpuInfo(0, "GPU-x", 0, 80 << 30)]
    scene.state.interval_ns = 50 * MS
    for _ in _two(scene, group):
        scene.state.members = {GREEDY_PID: ("greedy", 0), HONEST_PID: ("honest", 0)}
        scene.now_ns = 100 * backstop.PERIOD_NS
        duty.holds["greedy"] = backstop.Hold(readings=2, duty=0.9, changed_ns=scene.now_ns)
        for tick in range(seconds * backstop.PERIOD_NS // (50 * MS)):
            duty.run(scene.state, scene.now_ns)
            scene.now_ns += 50 * MS
            assert duty.holds.get("honest", backstop.Hold()).duty == 0.0
            yield tick


def test_quiet_readings_are_of_samples_wholly_inside_the_frozen_time(
    scene: Scene, group: cgroups.Cgroup
) -> None:
    """The greedy tenant held, the driver's samples as an H100 gives them: 40 % for the
    shimmed neighbour in every sample that overlaps the greedy one's running time or the
    50 ms after its freeze, 10 % in the others.  Read by the duty itself, tick by tick, the
    quiet readings are all 10 %, and the neighbour is never frozen."""
    period_us = backstop.PERIOD_NS // 1000

    def pct(pid: int, end_us: int) -> int:
        quiet = 50_000 <= (end_us - nvml.SAMPLE_US) % period_us <= 900_000 - nvml.SAMPLE_US
        if pid == GREEDY_PID:
            return 0 if quiet else 50
        return 10 if quiet else 40

    duty = Backstop()
    for _ in _held_beside_honest(duty, scene, group, DriverSamples(scene, pct), seconds=10):
        pass
    quiet = [q.used.get("honest") for q in duty.quiet_history]
    assert len(quiet) >= 4 and set(quiet) == {10}
    assert duty.holds["greedy"].duty > 0.0


def test_a_held_tenant_is_charged_by_the_whole_gpus_samples(
    scene: Scene, group: cgroups.Cgroup
) -> None:
    """The driver keeps no per-process sample for a process frozen when the sample ends: the
    greedy tenant, frozen 0.9 of each period, has none, as on an H100.  The whole GPU's
    samples count it (50 % in the sample over its 100 ms, with the honest tenant's 8 %):
    charged those less what the quiet samples give the others, it reads its share and
    stays held at 0.9 for a minute, never less than all but the time it takes to use its
    share of the 90 % the honest one leaves (read at 8 % of its 10 %, it counts at its
    share); the honest one is never frozen."""
    period_us = backstop.PERIOD_NS // 1000

    def runs(end_us: int) -> int:  # percent of the sample the greedy tenant ran: [0.9, 1) P
        start_us = end_us - nvml.SAMPLE_US
        burst_us = (start_us // period_us + 1) * period_us - period_us // 10
        overlap = min(end_us, burst_us + period_us // 10) - max(start_us, burst_us)
        return max(overlap, 0) * 100 // nvml.SAMPLE_US

    def pct(pid: int, end_us: int) -> int:
        if pid == GREEDY_PID:
            return 0  # frozen at every sample's end
        return 40 if runs(end_us) else 8  # its wait behind the greedy one counted as its own

    duty = Backstop()
    driver = DriverSamples(scene, pct, lambda end: runs(end) + 8)
    for tick in _held_beside_honest(duty, scene, group, driver, seconds=60):
        if tick * 50 * MS > 10 * backstop.PERIOD_NS:
            assert 1 - 10 / 90 - 1e-9 <= duty.holds["greedy"].duty <= 0.91
    assert scene.tenant("greedy").devices[0].driver_used_pct in range(8, 13)


def test_a_neighbour_at_its_share_counts_at_it_in_what_the_held_one_is_left(
    scene: Scene, group: cgroups.Cgroup
) -> None:
    """Held beside a shimmed tenant at 40 % that the driver reads at 35 % while the greedy
    one is frozen (as an H100 read one that ran 42 % of its solo throughput): the greedy one
    is left 60 %, not 65, so it is frozen at most a third of each period for its 40 %, and
    charged the whole GPU's 78 % less those 40, not less 35.  A neighbour read at half its
    share counts as read."""
    scene.state.nv = nvml.Nvml(lambda: DriverSamples(scene, lambda pid, end: 0, lambda end: 78))
    gpu = nvml.GpuInfo(0, "GPU-x", 0, 80 << 30)
    duty = Backstop()
    for _ in _two(scene, group, greedy_sm=4000, honest_sm=4000):
        held = {"greedy"}
        for quiet in ({"honest": 35}, {"honest": 36}):
            duty.record_quiet(_quiet(scene, held, quiet, 35.5))
        assert duty.others_use(scene.state, "GPU-x", held) == pytest.approx(40)
        duty.holds["greedy"] = backstop.Hold(readings=5, duty=0.3)
        reading = R("greedy", "GPU-x", 40, 40, True)
        duty.adjust_hold(scene.state, "greedy", reading, True, scene.now_ns)
        assert duty.holds["greedy"].duty == pytest.approx(1 - 40 / 60)
        used: dict[tuple[str, str], int] = {}
        duty.charge_held(scene.state, gpu, duty.holds, used)
        scene.now_ns += 200 * MS
        duty.charge_held(scene.state, gpu, duty.holds, used)
        assert used == {("greedy", "GPU-x"): 78 - 40}
        duty.quiet_history.clear()
        duty.record_quiet(_quiet(scene, held, {"honest": 20}, 20))
        assert duty.others_use(scene.state, "GPU-x", held) == pytest.approx(20)


def test_a_held_tenant_is_charged_at_least_what_its_own_samples_say_it_ran() -> None:
    """Running 0.6 of the time beside a neighbour it takes from, its own samples (of it
    running: none of a frozen process, the first and last in part) say 70 %: charged 42,
    not the 36 the whole GPU's less the others' say; samples before the period do not
    count, and with none the reading stands."""
    duty = Backstop()
    duty.running.extend((at * SECOND, "greedy", "GPU-x", pct) for at, pct in
                        [(1, 99), (11, 30), (12, 70), (13, 70), (14, 70)])  # fmt: skip
    reading = R("greedy", "GPU-x", 36, 40, True)
    assert duty.at_least_as_ran(reading, 10 * SECOND, 0.4).used_pct == pytest.approx(42)
    assert duty.at_least_as_ran(reading, 20 * SECOND, 0.4) == reading
    assert duty.at_least_as_ran(R("greedy", "GPU-x", 50, 40, True), 10 * SECOND, 0.4).used_pct == 50


def test_held_tenants_of_one_gpu_share_its_excess_by_the_time_each_runs(scene: Scene) -> None:
    """The whole GPU at 38 % where the quiet samples gave the others 8 %: 30 points, split
    between a tenant frozen 0.9 and one frozen 0.8 of each period as 1 to 2.  Before the
    first quiet reading, and on the first read (the driver's whole buffer), their own
    samples stand."""
    scene.state.nv = nvml.Nvml(lambda: DriverSamples(scene, lambda pid, end: 0, lambda end: 38))
    gpu = nvml.GpuInfo(0, "GPU-x", 0, 80 << 30)
    held = {"a": backstop.Hold(duty=0.9), "b": backstop.Hold(duty=0.8)}
    duty = Backstop()
    own = {("a", "GPU-x"): 1, ("b", "GPU-x"): 2}
    scene.now_ns = 100 * backstop.PERIOD_NS
    used = dict(own)
    duty.charge_held(scene.state, gpu, held, used)
    assert used == own
    duty.record_quiet(_quiet(scene, {"a", "b"}, {}, 8.0))
    duty.charge_held(scene.state, gpu, held, used)
    assert used == own
    scene.now_ns += 200 * MS
    duty.charge_held(scene.state, gpu, held, used)
    assert used == {("a", "GPU-x"): 10, ("b", "GPU-x"): 20}
