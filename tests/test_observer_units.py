"""The observer's parts in-process: slot reader/writer, demand tracking, sd_notify, NVML.

NVML is simulated by a small Python stand-in for the pynvml module (the same calls, the
same shapes), since this machine has no GPU and no libnvidia-ml.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fcsp_hook import abi, config, notify, nvml, observer, slot, slotio
from fcsp_hook.errors import SlotError

_DEV = abi.Usage.device.offset


def _slot(tmp_path: Path, cid: str = "t1", **kw: Any) -> Path:
    slot.ensure_tenants_dir(tmp_path)
    directory = slot.slot_path(tmp_path, cid)
    dev = slot.DeviceLimits(host_index=0, sm_requested_centi=2500, **kw)
    slot.write_slot(directory, slot.SlotSpec(container_id=cid, devices=(dev,)), {})
    return directory


# ---- slotio -------------------------------------------------------------------------------


def test_seqlocked_update_bumps_seq_twice_and_generation(tmp_path: Path) -> None:
    """A host update leaves seq even (two bumps), generation + 1, and the new values."""
    directory = _slot(tmp_path)
    limits = slotio.LimitsMap(directory / abi.LIMITS_FILE)
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
    assert slot.read_limits(directory / abi.LIMITS_FILE).device[0].sm_requested_centi == 6000


def test_a_writer_that_died_mid_update_is_detected_and_repaired(tmp_path: Path) -> None:
    """seq stuck odd: readers give up with a SlotError; the next writer makes it even again."""
    directory = _slot(tmp_path)
    limits = slotio.LimitsMap(directory / abi.LIMITS_FILE)
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
    """sm_effective_centi and the heartbeat land in the file at their ABI offsets."""
    directory = _slot(tmp_path)
    limits = slotio.LimitsMap(directory / abi.LIMITS_FILE)
    try:
        limits.set_effective(0, 4321)
        limits.set_heartbeat(123456789)
    finally:
        limits.close()
    raw = (directory / abi.LIMITS_FILE).read_bytes()
    eff = abi.Limits.device.offset + abi.LimitsDevice.sm_effective_centi.offset
    assert struct.unpack_from("<I", raw, eff)[0] == 4321
    assert struct.unpack_from("<Q", raw, abi.Limits.observer_heartbeat_ns.offset)[0] == 123456789


def test_usage_values_are_bounded(tmp_path: Path) -> None:
    """Absurd numbers from a tenant read as 0 (or the whole GPU for demand), not as given."""
    directory = _slot(tmp_path)
    fd = os.open(directory / abi.USAGE_FILE, os.O_RDWR)
    try:
        os.pwrite(fd, struct.pack("<9Q", 1 << 60, 0, 0, 0, 5, 5, 1 << 63, 7, 1 << 40), _DEV)
    finally:
        os.close(fd)
    reader = slotio.UsageReader(directory / abi.USAGE_FILE)
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
    reader = slotio.UsageReader(usage)
    try:
        os.truncate(usage, 100)
        with pytest.raises(SlotError, match="truncated"):
            reader.devices(1)
        usage.write_bytes(b"\0" * ctypes.sizeof(abi.Usage))
        with pytest.raises(SlotError, match="not an FCSP"):
            reader.devices(1)
    finally:
        reader.close()


# ---- demand tracking ----------------------------------------------------------------------


def _sample(launches: int, throttled: int = 0, demand: int = 0) -> slotio.DeviceUsage:
    return slotio.DeviceUsage(launches=launches, throttled_ns=throttled, demand_centi=demand)


def test_activity_idleness_and_unmet_demand() -> None:
    """Launches mark activity; a quiet idle window makes a tenant idle; throttled time is
    unmet demand; counters that go backwards are rebased, not read as activity."""
    obs = config.ObserverConfig(idle_window_ms=100, throttled_min_pct=2)
    ms = 1_000_000
    track = observer.DeviceTrack(last_active_ns=0)
    observer.update_track(track, _sample(10), effective=2500, now_ns=0, dt_ns=10 * ms, obs=obs)
    observer.update_track(
        track, _sample(11, 8 * ms), effective=2500, now_ns=10 * ms, dt_ns=10 * ms, obs=obs
    )
    assert track.active and track.unmet > 0
    observer.update_track(
        track, _sample(0, 0), effective=2500, now_ns=200 * ms, dt_ns=10 * ms, obs=obs
    )
    assert not track.active and track.unmet == 0  # went backwards: rebased; window passed
    for tick in range(1, 8):  # launching again, never throttled, claiming a big demand
        observer.update_track(
            track,
            _sample(tick, 0, demand=9000),
            effective=2500,
            now_ns=(200 + 10 * tick) * ms,
            dt_ns=10 * ms,
            obs=obs,
        )
    assert track.active
    # A demand claim without throttling is not unmet demand beyond what it has: 1 keeps
    # the burst it holds (no flapping), it never asks for the 6500 claimed on top.
    assert track.unmet == 1
    observer.update_track(
        track, _sample(9, 0, demand=1000), effective=2500, now_ns=290 * ms, dt_ns=10 * ms, obs=obs
    )
    assert track.active and track.unmet == 0  # using 40 % of its share: wants nothing more


def test_launch_size_is_weighted_by_gpu_time_and_bounded() -> None:
    """The size of the launches that take a tenant's GPU time, though the shim reports in
    batches: each 5.3 ms GEMM followed by a 50 us kernel reads 5.25 ms (their plain mean,
    2.7 ms, would fit turn windows to half-GEMMs): from the third span of half a second on,
    the median of the last five; a forged busy_sq gives a bounded value."""
    obs = config.ObserverConfig()
    ms = 1_000_000
    gemm, tiny = 5_300_000, 50_000
    track = observer.DeviceTrack(last_active_ns=0)
    for tick in range(1, 302):  # 10 ms ticks; 16 pairs of launches reported every 8th tick
        pairs = 16 * (tick // 8)
        sample = slotio.DeviceUsage(
            launches=2 * pairs,
            busy_ns=pairs * (gemm + tiny),
            busy_sq=pairs * ((gemm >> 10) ** 2 + (tiny >> 10) ** 2),
        )
        observer.update_track(
            track, sample, effective=3000, now_ns=tick * 10 * ms, dt_ns=10 * ms, obs=obs
        )
        if tick == 101:  # two spans measured: not yet known
            assert track.kernel_us == 0
    assert track.kernel_us == pytest.approx(5250, rel=0.02)
    # One span of GEMMs that read 5.73 ms (the shim's estimate after a high sample) does
    # not move it: the fitted cycle must not follow such a span.
    slow = 5_730_000
    sample = slotio.DeviceUsage(
        launches=sample.launches + 200,
        busy_ns=sample.busy_ns + 200 * slow,
        busy_sq=sample.busy_sq + 200 * (slow >> 10) ** 2,
    )
    observer.update_track(track, sample, effective=3000, now_ns=4100 * ms, dt_ns=10 * ms, obs=obs)
    assert track.kernel_us == pytest.approx(5250, rel=0.02)
    sample = slotio.DeviceUsage(launches=300, busy_ns=1 + 16 * 12 * (gemm + tiny), busy_sq=2**62)
    observer.update_track(track, sample, effective=3000, now_ns=5200 * ms, dt_ns=10 * ms, obs=obs)
    assert 0 < track.kernel_us <= abi.TURN_MAX_US


# ---- sd_notify ----------------------------------------------------------------------------


def test_notify_abstract_socket_and_watchdog_settings() -> None:
    """'@name' is the abstract namespace; WATCHDOG_USEC for another pid is ignored."""
    name = f"fcsp-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(10)
    try:
        n = notify.Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000"})
        assert n.enabled and n.watchdog_ns == 3_000_000_000
        assert n.ready("2 tenants on 1 GPU, contention 0.10")
        assert server.recv(4096) == b"READY=1\nSTATUS=2 tenants on 1 GPU, contention 0.10"
        n.close()
    finally:
        server.close()
    other = notify.Notifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_ns == 0 and not other.enabled and not other.status("x")


# ---- NVML ---------------------------------------------------------------------------------


class FakePynvml:
    """The pynvml calls the observer makes, over a simulated two-GPU host."""

    def __init__(self, procs: dict[int, list[tuple[int, int]]]) -> None:
        self.procs = procs
        self.shutdown = False

    def nvmlInit(self) -> None:  # pynvml's names
        pass

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return f"GPU-{h}".encode()

    def nvmlDeviceGetMinorNumber(self, h: int) -> int:
        return h

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=80 << 30)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.procs.get(h, [])]


def test_nvml_absent_means_unavailable_with_a_reason() -> None:
    """No driver/library: no exception, just available False and why."""

    def broken() -> Any:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    nv = nvml.Nvml(broken)
    assert not nv.available and "libnvidia-ml.so.1" in nv.reason
    assert nv.inventory() == [] and nv.processes([]) == {}


def test_nvml_inventory_and_process_lists() -> None:
    """Inventory gives UUID, minor and memory; process lists are per GPU UUID."""
    fake = FakePynvml({1: [(4242, 1 << 30)]})
    nv = nvml.Nvml(lambda: fake)
    gpus = nv.inventory()
    assert [(g.uuid, g.minor, g.memory_total) for g in gpus] == [
        ("GPU-0", 0, 80 << 30),
        ("GPU-1", 1, 80 << 30),
    ]
    assert nv.processes(gpus) == {"GPU-0": [], "GPU-1": [nvml.GpuProcess(4242, 1 << 30)]}
    nv.close()
    assert fake.shutdown


def test_cross_check_flags_unshimmed_foreign_and_over_quota() -> None:
    """A tenant's process without a LIVE record is unshimmed; a process of no tenant on a
    tenant's GPU is foreign; memory past the quota names the unshimmed culprit."""
    tenant = nvml.TenantView("c1", {"GPU-0": 1 << 30}, frozenset({7}))
    owners = {100: ("c1", 7), 101: ("c1", 8)}
    result = nvml.cross_check(
        [tenant],
        {
            "GPU-0": [
                nvml.GpuProcess(100, 1 << 29),
                nvml.GpuProcess(101, 1 << 30),
                nvml.GpuProcess(555, 1),
            ]
        },
        owners.get,
    )
    assert result.unshimmed == {"c1": [101]}
    assert result.foreign == {"GPU-0": [555]}
    assert result.memory[("c1", "GPU-0")] == (1 << 29) + (1 << 30)
    (over,) = result.over_quota
    assert over.culprits == (101,) and over.quota_bytes == 1 << 30


@pytest.mark.parametrize("action", [config.OVER_QUOTA_WARN, config.OVER_QUOTA_KILL])
def test_over_quota_action_on_simulated_nvml(tmp_path: Path, action: str) -> None:
    """Over quota by NVML's count: 'warn' leaves the process, 'kill' SIGKILLs it."""
    victim = subprocess.Popen(["sleep", "600"])
    try:
        _slot(tmp_path, "c1", mem_limit_bytes=1 << 30)
        cfg = config.Config(
            paths=config.PathsConfig(run_dir=tmp_path),
            observer=config.ObserverConfig(metrics_port=0, over_quota_action=action),
        )
        fake = FakePynvml({0: [(victim.pid, 2 << 30)]})
        obs = observer.Observer(
            cfg,
            tmp_path / "none.toml",
            observer.configure_logging(),
            notify.Notifier({}),
            nvml_factory=lambda: nvml.Nvml(lambda: fake),
            env={},
        )
        obs.discover(slotio.monotonic_ns())
        obs.members = {victim.pid: ("c1", 99)}  # in c1's namespace, with no shim record
        obs.check_nvml()
        assert obs.tenants["c1"].unshimmed == [victim.pid]
        if action == config.OVER_QUOTA_KILL:
            assert victim.wait(timeout=20) == -signal.SIGKILL
        else:
            assert victim.poll() is None
        obs.release()
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def test_gpu_keys_prefer_uuids_then_nvml_minors() -> None:
    """Tenants naming a GPU by UUID or by index meet on the same key when NVML maps them."""
    by_uuid = abi.LimitsDevice(uuid=b"GPU-1", host_index=-1)
    by_index = abi.LimitsDevice(host_index=1)
    unknown = abi.LimitsDevice(host_index=-1)
    minors = {1: "GPU-1"}
    assert observer.gpu_key(by_uuid, "a", 0, minors) == "GPU-1"
    assert observer.gpu_key(by_index, "b", 0, minors) == "GPU-1"
    assert observer.gpu_key(by_index, "b", 0, {}) == "nvidia1"
    assert observer.gpu_key(unknown, "c", 2, minors) == "c/2"


def test_interval_override_from_the_environment() -> None:
    """BUD_OBSERVER_INTERVAL_US overrides interval_ms; a bad value is a one-line error."""
    cfg = config.Config()
    assert observer.interval_ns(cfg, {}) == 50_000_000
    assert observer.interval_ns(cfg, {"BUD_OBSERVER_INTERVAL_US": "2000"}) == 2_000_000
    with pytest.raises(config.ConfigError, match="BUD_OBSERVER_INTERVAL_US='fast'"):
        observer.interval_ns(cfg, {"BUD_OBSERVER_INTERVAL_US": "fast"})


def test_observer_config_section_is_validated(tmp_path: Path) -> None:
    """[observer] values are range-checked and the over-quota action is a choice."""
    path = tmp_path / "c.toml"
    path.write_text("[observer]\nover_quota_action = 'shoot'\n")
    with pytest.raises(config.ConfigError, match="expected one of warn, kill"):
        config.load(path)
    path.write_text("[observer]\nnvml_interval_ms = 10\n")
    with pytest.raises(config.ConfigError, match="from 1000 to"):
        config.load(path)
    path.write_text("[observer]\ncontention_low_pct = 60\ncontention_high_pct = 50\n")
    with pytest.raises(config.ConfigError, match="must not exceed contention_high_pct"):
        config.load(path)


# ---- pid namespaces -------------------------------------------------------------------------


def test_processes_map_to_their_tenant_by_pid_namespace() -> None:
    """A host process in a tenant's pid namespace belongs to that tenant, with its pid inside
    the namespace; a namespace two tenants share (e.g. both run with --pid=host) is
    ambiguous and attributes nothing, instead of giving every process to one of them."""
    own = os.getpid()
    members = observer.namespace_members({"solo": own})
    assert members[own] == ("solo", own)  # this test runs in the host's pid namespace
    assert observer.namespace_members({"a": own, "b": own}) == {}
