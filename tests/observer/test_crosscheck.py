"""observer.crosscheck: what each tenant is granted, against NVML's per-process view:
processes without the shim flagged, memory past the quota warned about or killed, the quota
the one the shim enforces."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcsp_hook import config, nvml
from fcsp_hook.observer import crosscheck
from fcsp_hook.observer.tenants import Tenants
from fcsp_hook.slot import abi, files
from tests.observer.scene import GiB, Scene

GPU = "GPU-00000000-0000-0000-0000-0000000000c2"
TOTAL = 80 * GiB


@pytest.fixture
def gpu_scene(tmp_path: Path) -> Iterator[Scene]:
    scene = Scene.create(tmp_path, gpus=(nvml.GpuInfo(0, GPU, 0, TOTAL),))
    yield scene
    scene.close()


@pytest.mark.parametrize(
    ("limit_bytes", "basis_points", "quota"),
    [
        (8 * GiB, 0, 8 * GiB),
        (0, 2500, 20 * GiB),
        (8 * GiB, 2500, 8 * GiB),  # both set: the smaller, as the shim enforces it
        (30 * GiB, 2500, 20 * GiB),
        (0, 0, 0),
    ],
)
def test_the_quota_checked_is_the_quota_enforced(
    gpu_scene: Scene, limit_bytes: int, basis_points: int, quota: int
) -> None:
    """A slot may carry a byte quota and a percentage: NVML's count is checked against the
    smaller, the one libvgpu.so enforces, never against the byte quota alone."""
    gpu_scene.add(
        "c",
        files.DeviceLimits(
            uuid=GPU, mem_limit_bytes=limit_bytes, mem_limit_basis_points=basis_points
        ),
    )
    gpu_scene.run(Tenants())
    (view,) = crosscheck.views(gpu_scene.state)
    assert view.gpus == {GPU: quota}


def test_shimmed_pids_come_from_the_tenants_process_records(gpu_scene: Scene) -> None:
    usage = gpu_scene.add("c", files.DeviceLimits(uuid=GPU))
    usage.process(0, 7)
    usage.process(3, 9)
    gpu_scene.run(Tenants())
    (view,) = crosscheck.views(gpu_scene.state)
    assert view.shimmed_pids == frozenset({7, 9})


def _mapping(path: Path) -> subprocess.Popen[str]:
    """A process that maps the file at path, as the loader maps a library."""
    code = (
        "import mmap, sys, time\n"
        "f = open(sys.argv[1], 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "print('mapped', flush=True)\n"
        "time.sleep(60)\n"
    )
    argv = [sys.executable, "-c", code, str(path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "mapped"
    return proc


def test_a_forged_record_does_not_make_a_process_shimmed(gpu_scene: Scene, tmp_path: Path) -> None:
    """Of the processes the tenant's records name, shimmed are those that map FCSP's library:
    the file the hook mounts (bind-mounted elsewhere, as into a container), not a copy of
    it, nor a file of the tenant's named libvgpu.so, nor nothing; the library as it was
    before an upgrade too.  Where the library is not installed, the records alone say."""
    library = tmp_path / "lib" / "libvgpu.so"
    library.parent.mkdir()
    library.write_bytes(bytes(range(256)) * 64)
    mounted = tmp_path / "mnt" / "libvgpu.so"
    copy, other = tmp_path / "copy" / "libvgpu.so", tmp_path / "other" / "libvgpu.so"
    for path, content in ((mounted, b""), (copy, library.read_bytes()), (other, bytes(16384))):
        path.parent.mkdir()
        path.write_bytes(content)
    subprocess.run(["mount", "--bind", str(library), str(mounted)], check=True)
    (tmp_path / "data").write_bytes(library.read_bytes())
    procs = []
    try:
        for path in (mounted, other, tmp_path / "data", library, copy):
            procs.append(_mapping(path))
        usage = gpu_scene.add("c", files.DeviceLimits(uuid=GPU))
        for slot in range(len(procs)):
            usage.process(slot, 100 + slot)
        gpu_scene.run(Tenants())
        gpu_scene.state.members = {p.pid: ("c", 100 + i) for i, p in enumerate(procs)}
        live = set(gpu_scene.state.members)
        maps = crosscheck.ShimMaps(library, tmp_path / "state")
        (view,) = crosscheck.views(gpu_scene.state, maps.checker(live))
        assert view.shimmed_pids == frozenset({100, 103})
        # Upgraded, with the observer restarted: what ran the library before still counts.
        library.unlink()
        library.write_bytes(bytes(4096))
        maps = crosscheck.ShimMaps(library, tmp_path / "state")
        (view,) = crosscheck.views(gpu_scene.state, maps.checker(live))
        assert view.shimmed_pids == frozenset({100, 103})
        assert crosscheck.ShimMaps(tmp_path / "absent.so", tmp_path).checker(set()) is None
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        subprocess.run(["umount", str(mounted)], check=False)


def test_cross_check_flags_unshimmed_foreign_and_over_quota() -> None:
    """Pure part: NVML's processes sorted into the tenant's (by pid namespace) and the
    others; of the tenant's, those without a shim record; its memory against its quota,
    naming the unshimmed culprit."""
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
def test_over_quota_action(gpu_scene: Scene, action: str) -> None:
    """Over quota by NVML's count: 'warn' leaves the process (and warns once), 'kill'
    SIGKILLs it; the tenant's unshimmed processes are recorded for fcspctl."""
    gpu_scene.configure(over_quota_action=action)
    gpu_scene.add("c1", files.DeviceLimits(uuid=GPU, mem_limit_bytes=GiB))
    gpu_scene.run(Tenants())
    victim = subprocess.Popen(["sleep", "600"])
    try:
        result = nvml.cross_check(
            crosscheck.views(gpu_scene.state),
            {GPU: [nvml.GpuProcess(victim.pid, 2 * GiB)]},
            {victim.pid: ("c1", 99)}.get,  # in c1's namespace, with no shim record
        )
        duty = crosscheck.CrossCheck()
        duty.apply(gpu_scene.state, result)
        duty.apply(gpu_scene.state, result)
        assert gpu_scene.tenant("c1").unshimmed == [victim.pid]
        events = [e["event"] for e in gpu_scene.events()]
        if action == config.OVER_QUOTA_KILL:
            assert victim.wait(timeout=20) == -signal.SIGKILL
            assert events.count("over memory quota: processes killed") == 2
        else:
            assert victim.poll() is None
            assert events.count("over memory quota") == 1
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def test_without_nvml_the_check_never_runs(gpu_scene: Scene) -> None:
    """No driver here: the duty is never due, whatever the time."""
    assert not gpu_scene.state.nv.available
    assert not crosscheck.CrossCheck().due(gpu_scene.state, 1 << 62, 0)


def _procs(*used: tuple[int, int]) -> list[nvml.GpuProcess]:
    return [nvml.GpuProcess(pid, b) for pid, b in used]


@pytest.mark.parametrize(
    ("processes", "shimmed", "stopped"),
    [
        # An honest tenant at 100 % of its 1 GiB quota with three processes, each with a
        # 300 MiB context NVML counts and the shim does not: never touched.
        (((1, 300 + 512), (2, 300 + 256), (3, 300 + 256)), {1, 2, 3}, ()),
        # 100 MiB past the quota and the contexts: the one bypassing process goes first.
        (((1, 300 + 512), (2, 300 + 612), (3, 300)), {1, 3}, (2,)),
        # A record forged for the bypassing process hides nothing: the largest goes.
        (((1, 300 + 512), (2, 300 + 612), (3, 300)), {1, 2, 3}, (2,)),
        # Far past it: as many as it takes, largest first.
        (((1, 300 + 900), (2, 300 + 900), (3, 300 + 900)), {1, 2, 3}, (1, 2)),
    ],
)
def test_memory_is_held_by_the_drivers_count(
    processes: tuple[tuple[int, int], ...], shimmed: set[int], stopped: tuple[int, ...]
) -> None:
    """The quota plus each process's context: within it nobody is stopped; past it the
    fewest processes that bring the tenant back, bypassing ones first."""
    mib = 1 << 20
    view = nvml.TenantView("t", {GPU: GiB}, frozenset(shimmed))
    result = nvml.cross_check(
        [view],
        {GPU: _procs(*((pid, m * mib) for pid, m in processes))},
        lambda pid: ("t", pid),
        {GPU: 300 * mib},
    )
    if not stopped:
        assert result.over_quota == []
    else:
        (over,) = result.over_quota
        assert over.culprits == stopped
        assert over.quota_bytes == GiB + 3 * 300 * mib


def test_a_soft_quota_is_reported_never_enforced() -> None:
    view = nvml.TenantView("t", {GPU: GiB}, frozenset(), hard=False)
    result = nvml.cross_check([view], {GPU: _procs((1, 4 * GiB))}, lambda pid: ("t", pid))
    (over,) = result.over_quota
    assert over.culprits == ()


def test_the_mps_daemons_the_observer_started_are_nobodys(gpu_scene: Scene) -> None:
    """Processes are told apart by the host's knowledge (the daemon's pid and its
    children), never by a name: a tenant's process called nvidia-cuda-mps-server counts."""
    import os  # noqa: PLC0415

    from fcsp_hook.observer.mpsd import DaemonState  # noqa: PLC0415

    child = subprocess.Popen(["sleep", "600"])
    try:
        gpu_scene.state.backends[GPU] = DaemonState(GPU, backend="mps", pid=os.getpid())
        assert crosscheck.parent(child.pid) == os.getpid()
        assert crosscheck.parent(1 << 30) == 0
    finally:
        child.kill()
        child.wait()


def test_an_mps_tenants_clients_are_counted_into_its_limits(gpu_scene: Scene) -> None:
    """The number of a tenant's MPS processes goes into its limits on its MPS GPU, where its
    shims hold several to its share together; a time-sliced tenant's stays 0, and a count
    that falls is written too."""
    gpu_scene.add("mps", files.DeviceLimits(uuid=GPU, backend=abi.Backend.MPS))
    gpu_scene.add("sliced", files.DeviceLimits(uuid=GPU))
    gpu_scene.run(Tenants())
    duty = crosscheck.CrossCheck()
    three = nvml.CrossCheck(mps_clients={"mps": [11, 12, 13], "sliced": [21, 22]})
    duty.apply(gpu_scene.state, three)
    assert gpu_scene.tenant("mps").limits.mps_processes(0) == 3
    assert gpu_scene.tenant("sliced").limits.mps_processes(0) == 0
    duty.apply(gpu_scene.state, nvml.CrossCheck(mps_clients={"mps": [12]}))
    assert gpu_scene.tenant("mps").limits.mps_processes(0) == 1
