"""observer.tenants: slots found, dropped and reopened; usage folded into activity, unmet
demand and the size of a tenant's launches; hostile usage files survived."""

from __future__ import annotations

import os
import shutil

import pytest

from fcsp_hook import config
from fcsp_hook.observer import tenants
from fcsp_hook.observer.state import Grant, TenantDevice
from fcsp_hook.slot import abi, files, live
from tests.observer.scene import MS, Scene


def test_slots_are_found_dropped_and_reopened(scene: Scene) -> None:
    """A new slot is opened, one that goes is dropped, one a restarted container rewrote is
    reopened (new inode), and entries that are not slots are ignored."""
    duty = tenants.Tenants()
    scene.add("a")
    scene.add("b")
    (scene.run_dir / "tenants" / "not a slot").mkdir()
    os.symlink("/etc", scene.run_dir / "tenants" / "link")
    scene.run(duty)
    assert sorted(scene.state.tenants) == ["a", "b"]
    first = scene.tenant("a")
    files.remove_slot(scene.run_dir, "b")
    scene.add("a")  # the container restarted: the hook wrote its slot afresh
    scene.run(duty, step_ns=1_100 * MS)  # past the rescan period
    assert sorted(scene.state.tenants) == ["a"]
    assert scene.tenant("a") is not first
    assert scene.state.dirty


def test_a_slot_being_written_is_picked_up_once_it_is_whole(scene: Scene) -> None:
    """A limits file of the wrong size (the hook mid-write) is skipped, not fatal."""
    duty = tenants.Tenants()
    directory = files.slot_path(scene.run_dir, "new")
    directory.mkdir()
    (directory / abi.LIMITS_FILE).write_bytes(b"\0" * 100)
    scene.run(duty)
    assert "new" not in scene.state.tenants
    shutil.rmtree(directory)
    scene.add("new")
    scene.run(duty)
    assert "new" in scene.state.tenants


def test_grants_follow_the_limits_generation(scene: Scene) -> None:
    """fcspctl set bumps the generation: the grants are rebuilt, what was learned is kept."""
    duty = tenants.Tenants()
    scene.add("a")
    scene.busy("a")
    scene.run(duty)
    device = scene.tenant("a").devices[0]
    assert device.grant.requested_centi == 2500 and device.grant.mode == abi.IsolationMode.BALANCED
    limits = live.LimitsMap(files.slot_path(scene.run_dir, "a") / abi.LIMITS_FILE)
    try:
        with limits.update() as view:
            view.device[0].sm_requested_centi = 4000
            view.isolation_mode = abi.IsolationMode.STRICT
    finally:
        limits.close()
    scene.run(duty)
    again = scene.tenant("a").devices[0]
    assert again is device and again.launches >= 0
    assert again.grant.requested_centi == 4000 and again.grant.mode == abi.IsolationMode.STRICT


@pytest.mark.parametrize(
    ("dev", "gpu"),
    [
        (abi.LimitsDevice(uuid=b"GPU-1", host_index=-1), "GPU-1"),
        (abi.LimitsDevice(host_index=1), "GPU-1"),  # NVML maps minor 1
        (abi.LimitsDevice(host_index=2), "nvidia2"),  # NVML does not know it
        (abi.LimitsDevice(host_index=-1), "c/0"),  # nothing known: shared with nobody
    ],
)
def test_gpu_keys_prefer_uuids_then_nvml_minors(dev: abi.LimitsDevice, gpu: str) -> None:
    """Tenants naming a GPU by UUID or by index meet on the same key when NVML maps them."""
    assert tenants.gpu_key(dev, "c", 0, {1: "GPU-1"}) == gpu


def _sample(launches: int, throttled: int = 0, demand: int = 0) -> live.DeviceUsage:
    return live.DeviceUsage(launches=launches, throttled_ns=throttled, demand_centi=demand)


def _device() -> TenantDevice:
    grant = Grant("g", "c/0", abi.IsolationMode.BALANCED, 2500, abi.Priority.BEST_EFFORT,
                  abi.Backend.TIMESLICE, 0, 0)  # fmt: skip
    return TenantDevice(grant=grant, last_active_ns=0)


# (launches, throttled ns, demand claimed, now in ms) -> (active, unmet) after the sample
ACTIVITY = [
    ((10, 0, 0, 0), (True, 0)),  # the first sample only sets the baseline
    ((11, 8 * MS, 0, 10), (True, None)),  # throttled 80 % of the tick: unmet demand
    ((0, 0, 0, 200), (False, 0)),  # counters went backwards: rebased; window passed: idle
    ((1, 0, 9000, 210), (True, None)),  # launching again: the throttling it had decays
    ((2, 0, 9000, 220), (True, None)),  # over a few ticks (a smoothed average)
    ((3, 0, 9000, 230), (True, None)),
    ((4, 0, 9000, 240), (True, 1)),  # never throttled, claiming 90 %: keeps its burst (1),
    ((5, 0, 1000, 250), (True, 0)),  # never asks for the 6500 claimed on top; using 40 %
    ((5, 0, 1000, 400), (False, 0)),  # of its share: wants nothing more; then idle
]


def test_activity_idleness_and_unmet_demand() -> None:
    """Launches mark activity; a quiet idle window makes a tenant idle; throttled time is
    unmet demand; counters that go backwards are rebased, not read as activity."""
    obs = config.ObserverConfig(idle_window_ms=100, throttled_min_pct=2)
    device = _device()
    for (launches, throttled, demand, now_ms), (active, unmet) in ACTIVITY:
        tenants.update_track(
            device,
            _sample(launches, throttled, demand),
            effective=2500,
            now_ns=now_ms * MS,
            dt_ns=10 * MS,
            obs=obs,
        )
        assert device.active is active, (launches, now_ms)
        assert device.unmet > 0 if unmet is None else device.unmet == unmet, (launches, now_ms)


def test_launch_size_is_weighted_by_gpu_time_and_bounded() -> None:
    """The size of the launches that take a tenant's GPU time, though the shim reports in
    batches: each 5.3 ms GEMM followed by a 50 us kernel reads 5.25 ms (their plain mean,
    2.7 ms, would fit turn windows to half-GEMMs): from the third span of half a second on,
    the median of the last five; one odd span does not move it; a forged busy_sq gives a
    bounded value."""
    obs = config.ObserverConfig()
    gemm, tiny = 5_300_000, 50_000
    device = _device()
    sample = live.DeviceUsage()
    for tick in range(1, 302):  # 10 ms ticks; 16 pairs of launches reported every 8th tick
        pairs = 16 * (tick // 8)
        sample = live.DeviceUsage(
            launches=2 * pairs,
            busy_ns=pairs * (gemm + tiny),
            busy_sq=pairs * ((gemm >> 10) ** 2 + (tiny >> 10) ** 2),
        )
        tenants.update_track(device, sample, effective=3000, now_ns=tick * 10 * MS,
                             dt_ns=10 * MS, obs=obs)  # fmt: skip
        if tick == 101:  # two spans measured: not yet known
            assert device.kernel_us == 0
    assert device.kernel_us == pytest.approx(5250, rel=0.02)
    slow = 5_730_000
    sample = live.DeviceUsage(
        launches=sample.launches + 200,
        busy_ns=sample.busy_ns + 200 * slow,
        busy_sq=sample.busy_sq + 200 * (slow >> 10) ** 2,
    )
    tenants.update_track(device, sample, effective=3000, now_ns=4100 * MS, dt_ns=10 * MS, obs=obs)
    assert device.kernel_us == pytest.approx(5250, rel=0.02)
    sample = live.DeviceUsage(launches=300, busy_ns=1 + 16 * 12 * (gemm + tiny), busy_sq=2**62)
    tenants.update_track(device, sample, effective=3000, now_ns=5200 * MS, dt_ns=10 * MS, obs=obs)
    assert 0 < device.kernel_us <= abi.TURN_MAX_US


@pytest.mark.parametrize(
    ("forge", "problem"),
    [
        (lambda path: os.truncate(path, 100), "truncated"),
        (lambda path: path.write_bytes(b"\0" * live.USAGE_SIZE), "not an FCSP"),
        (lambda path: os.truncate(path, 0), "truncated"),
    ],
)
def test_a_forged_usage_file_keeps_the_last_view(scene: Scene, forge: object, problem: str) -> None:
    """The usage file is the tenant's: rewritten, truncated or emptied, it is reported as
    the tenant's problem, the last view is kept, and the neighbours are sampled as before."""
    duty = tenants.Tenants()
    scene.add("hostile")
    scene.add("honest")
    scene.busy("hostile", "honest")
    scene.run(duty)
    seen = scene.tenant("hostile").devices[0].launches
    forge(files.slot_path(scene.run_dir, "hostile") / abi.USAGE_FILE)  # type: ignore[operator]
    scene.busy("honest")
    scene.run(duty)
    hostile, honest = scene.tenant("hostile"), scene.tenant("honest")
    assert problem in hostile.problem
    assert hostile.devices[0].launches == seen
    assert honest.problem == "" and honest.devices[0].launches == 2 * seen


def test_absurd_counters_read_as_nothing(scene: Scene) -> None:
    """Counters past what any GPU could report are read as 0, a demand past the whole GPU
    as the whole GPU: a tenant cannot make the observer compute with them."""
    duty = tenants.Tenants()
    usage = scene.add("liar")
    usage.device(mem_used_bytes=1 << 60, busy_ns=1 << 63, launches=5, demand_centi=1 << 40)
    scene.run(duty)
    device = scene.tenant("liar").devices[0]
    assert device.usage.mem_used_bytes == 0 and device.usage.busy_ns == 0
    assert device.usage.launches == 5 and device.usage.demand_centi == abi.WHOLE_GPU_CENTI
