"""observer.clocks: the full-load clock learned from NVML's readings, the speed-up of a
partly idle GPU published to its tenants, none while tenants take turns, kept across
restarts (a bad file ignored with the reason)."""

from __future__ import annotations

import pytest

from fcsp_hook.nvml import ClockReading
from fcsp_hook.observer import clockstore
from fcsp_hook.observer.clocks import Clocks
from fcsp_hook.observer.shares import Shares
from fcsp_hook.observer.tenants import Tenants
from fcsp_hook.slot import abi, files
from tests.observer.scene import Scene

GPU = "GPU-00000000-0000-0000-0000-0000000000c1"
FULL_LOAD = ClockReading(1500, 100, 690.0, 700.0)  # saturated, at its power limit
PARTLY_IDLE = ClockReading(1980, 40, 600.0, 700.0)  # throttled tenants: clocked up
FAR_FROM_POWER = ClockReading(1980, 40, 200.0, 700.0)  # small kernels: no speed-up to charge


def _tenant(scene: Scene, cid: str, mode: abi.IsolationMode = abi.IsolationMode.BALANCED) -> None:
    scene.add(cid, files.DeviceLimits(uuid=GPU, sm_requested_centi=5000), mode=mode)


def _scale(scene: Scene, cid: str) -> int:
    return int(scene.limits(cid).device[0].clock_scale_centi)


@pytest.mark.parametrize(
    ("readings", "max_speedup_pct", "scale"),
    [
        ([FULL_LOAD], 120, 10_000),  # at full load: kernels charged as measured
        ([FULL_LOAD, PARTLY_IDLE], 125, 12_500),  # 1980 / 1500 = 1.32, capped at 1.25
        ([FULL_LOAD, PARTLY_IDLE], 120, 12_000),
        ([FULL_LOAD, FAR_FROM_POWER] + [FAR_FROM_POWER] * 4, 120, 10_000),
        ([PARTLY_IDLE], 120, 0),  # never seen at full load: nothing to scale by
    ],
)
def test_the_speed_up_of_a_partly_idle_gpu_is_charged(
    scene: Scene, readings: list[ClockReading], max_speedup_pct: int, scale: int
) -> None:
    """Each round's reading; the scale the tenant's slot carries after the last one."""
    scene.configure(clock_max_speedup_pct=max_speedup_pct)
    _tenant(scene, "t")
    scene.run(Tenants())
    clocks = Clocks()
    for reading in readings:
        clocks.apply(scene.state, {GPU: reading}, on=True)
    assert _scale(scene, "t") == scale
    assert scene.state.clocks[GPU].scale_centi == scale


def test_turned_off_every_scale_is_taken_back(scene: Scene) -> None:
    _tenant(scene, "t")
    scene.run(Tenants())
    clocks = Clocks()
    clocks.apply(scene.state, {GPU: FULL_LOAD}, on=True)
    clocks.apply(scene.state, {GPU: PARTLY_IDLE}, on=True)
    assert _scale(scene, "t") == 12_000
    clocks.apply(scene.state, {}, on=False)
    assert _scale(scene, "t") == 0 and scene.state.clocks == {}


def test_no_scale_while_busy_tenants_take_turns(scene: Scene) -> None:
    """Tenants taking turns keep the GPU busy: a clock above the full-load one then comes
    from the gaps between turns, and nobody is charged for it (scale 1)."""
    tenants, shares, clocks = Tenants(), Shares(), Clocks()
    for cid in "ab":
        _tenant(scene, cid, abi.IsolationMode.STRICT)
    clocks.apply(scene.state, {GPU: FULL_LOAD}, on=True)
    for _ in range(5):
        scene.busy("a", "b")
        scene.run(tenants, shares)
    assert scene.state.shares[GPU].turning
    clocks.apply(scene.state, {GPU: PARTLY_IDLE}, on=True)
    assert _scale(scene, "a") == _scale(scene, "b") == 10_000
    for _ in range(30):
        scene.busy("a")
        scene.run(tenants, shares)
    assert not scene.state.shares[GPU].turning
    clocks.apply(scene.state, {GPU: PARTLY_IDLE}, on=True)
    assert _scale(scene, "a") == 12_000


def test_what_was_learned_outlives_the_observer(scene: Scene) -> None:
    """Saved on stop; the next observer, on a GPU never saturated again, scales at once."""
    _tenant(scene, "t")
    scene.run(Tenants())
    first = Clocks()
    first.apply(scene.state, {GPU: FULL_LOAD}, on=True)
    first.stop(scene.state)
    assert clockstore.load(scene.state.cfg.paths.state_dir) == ({GPU: 1500.0}, "")
    second = Clocks()
    second.apply(scene.state, {GPU: PARTLY_IDLE}, on=True)
    assert _scale(scene, "t") == 12_000


def test_a_bad_clocks_file_is_ignored_with_the_reason(scene: Scene) -> None:
    state_dir = scene.state.cfg.paths.state_dir
    state_dir.mkdir()
    (state_dir / clockstore.FILE).write_text('{"GPU-x": 99999}')
    _tenant(scene, "t")
    scene.run(Tenants())
    Clocks().apply(scene.state, {GPU: PARTLY_IDLE}, on=True)
    assert _scale(scene, "t") == 0
    (problem,) = scene.events("full-load clocks not restored")
    assert "GPU-x" in problem["reason"]
