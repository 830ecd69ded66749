"""Memory quotas through every allocation family, the tenant's view of memory, percentages,
soft mode and BUD_* variables, on the simulated driver."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fcsp_hook.slot import abi
from tests.shim.harness import (
    PROG_DIR,
    Env,
    GiB,
    MiB,
    build,
    make_slot,
    read_until_ready,
    run,
    sim_uuid,
    start,
    usage,
)

QUOTA = 64 * MiB
# family -> the SIZE argument that makes one allocation take about 40 MiB
FAMILIES = {
    "mem": "40M",
    "mem1": "40M",
    "managed": "40M",
    "pitch": "10M",  # 4 rows
    "async": "40M",
    "pool": "40M",
    "vmm": "40M",
    "array": "40M",
    "array3d": "40M",
    "mipmap": "27M",  # two levels: 27M + 13.5M
}


def slot_env(tmp_path: Path, limits: list[int], **kwargs: object) -> Env:
    return Env(state=tmp_path / "sim-state", slot=make_slot(tmp_path / "slot", limits, **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("prog", ["drv_procaddr", "drv_direct"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hard_quota_holds_for_every_family(tmp_path: Path, family: str, prog: str) -> None:
    """A second ~40 MiB allocation under a 64 MiB quota fails with CUDA_ERROR_OUT_OF_MEMORY;
    the charge matches the first, is released by its free, and the space can be reused."""
    env = slot_env(tmp_path, [QUOTA])
    size = FAMILIES[family]
    r = run(
        env,
        "init",
        "alloc",
        family,
        size,
        "usage",
        "alloc",
        family,
        size,
        "free",
        "0",
        "usage",
        "alloc",
        family,
        size,
        prog=prog,
    )
    assert r.outcomes() == ["ok 0", "err 2", "ok 1"], r.lines
    used = [int(line.split()[2]) for line in r.lines if line.startswith("used ")]
    assert 40 * MiB <= used[0] <= QUOTA
    assert len(used) == 1  # nothing charged after the free: no 'used' line for device 0
    assert r.field("free")[1] == "0"
    assert usage(env.slot).device[0].mem_rejected == 1  # type: ignore[arg-type]


def test_charges_are_released_at_exit(tmp_path: Path) -> None:
    """A process that exits without freeing gives its charge back and frees its record."""
    env = slot_env(tmp_path, [GiB])
    r = run(env, "init", "alloc", "mem", "600M", "alloc", "vmm", "100M")
    assert r.outcomes() == ["ok 0", "ok 1"]
    u = usage(env.slot)  # type: ignore[arg-type]
    assert u.device[0].mem_used_bytes == 0
    assert u.device[0].mem_peak_bytes == 700 * MiB
    assert all(p.state == abi.ProcState.FREE for p in u.proc)


def test_pitch_is_charged_at_the_pitch_the_driver_chose(tmp_path: Path) -> None:
    """cuMemAllocPitch charges pitch x height (the sim pads rows to 512 bytes), not
    width x height."""
    env = slot_env(tmp_path, [GiB])
    r = run(env, "init", "alloc", "pitch", "1000", "usage")
    assert r.field("used")[2] == str(1024 * 4)


def test_arrays_are_trued_up_to_the_driver_requirement(tmp_path: Path) -> None:
    """An array's charge follows cuArrayGetMemoryRequirements (64 KiB tiles in the sim)."""
    env = slot_env(tmp_path, [GiB])
    r = run(env, "init", "alloc", "array", "1000", "usage")
    assert r.field("used")[2] == str(64 * 1024)


def test_destroying_a_context_releases_its_charges(tmp_path: Path) -> None:
    """Destroying a context releases every charge made in it; VMM handles survive it."""
    env = slot_env(tmp_path, [GiB])
    r = run(
        env,
        "init",
        "ctx",
        "0",
        "alloc",
        "mem",
        "100M",
        "alloc",
        "vmm",
        "50M",
        "usage",
        "destroyctx",
        "0",
        "usage",
    )
    used = [int(line.split()[2]) for line in r.lines if line.startswith("used ")]
    assert used == [150 * MiB, 50 * MiB]


def test_primary_context_release_frees_its_charges(tmp_path: Path) -> None:
    """When the last reference to a primary context goes, its allocations' charges go too."""
    env = slot_env(tmp_path, [GiB])
    r = run(env, "init", "alloc", "mem", "100M", "releaseprimary", "0", "usage", "meminfo")
    assert r.field("releaseprimary")[1] == "0"
    assert not [line for line in r.lines if line.startswith("used ")]


def test_ipc_import_is_charged_to_the_importer(tmp_path: Path) -> None:
    """Opening another process's allocation charges its size; closing it gives it back."""
    exporter_env = Env(state=tmp_path / "sim-state")
    exporter = start(exporter_env, "init", "alloc", "mem", "40M", "ipcget", "0", "wait")
    try:
        handle = read_until_ready(exporter)[-1].split()[1]
        small = Env(state=tmp_path / "sim-state", slot=make_slot(tmp_path / "small", [QUOTA]))
        r = run(small, "init", "alloc", "mem", "30M", "ipcopen", handle)
        assert r.outcomes() == ["ok 0", "err 2"]
        big = Env(state=tmp_path / "sim-state", slot=make_slot(tmp_path / "big", [GiB]))
        r = run(
            big, "init", "alloc", "mem", "30M", "ipcopen", handle, "usage", "free", "1", "usage"
        )
        used = [int(line.split()[2]) for line in r.lines if line.startswith("used ")]
        assert r.outcomes() == ["ok 0", "ok 1"]
        assert used == [70 * MiB, 30 * MiB]
    finally:
        exporter.communicate("go\n", timeout=10)


def test_mem_get_info_and_total_show_the_quota(tmp_path: Path) -> None:
    """cuMemGetInfo reports total = quota and free = quota - used; cuDeviceTotalMem the quota."""
    env = slot_env(tmp_path, [GiB])
    r = run(env, "init", "meminfo", "alloc", "mem", "256M", "meminfo", "totalmem", "0", "meminfo1")
    infos = [line.split()[1:3] for line in r.lines if line.startswith("meminfo ")]
    assert infos == [[str(GiB), str(GiB)], [str(768 * MiB), str(GiB)]]
    assert r.field("totalmem")[1] == str(GiB)
    assert r.field("meminfo1")[1:3] == [str(768 * MiB), str(GiB)]


def test_free_is_capped_by_real_free_memory(tmp_path: Path) -> None:
    """When other tenants leave less real memory than the quota allows, free is the real free."""
    env = slot_env(tmp_path, [GiB])
    env.mem_bytes = 2 * GiB
    neighbour = start(
        Env(state=env.state, mem_bytes=2 * GiB), "init", "alloc", "mem", "1792M", "wait"
    )
    try:
        read_until_ready(neighbour)
        r = run(env, "init", "meminfo")
        assert r.field("meminfo")[1:3] == [str(256 * MiB), str(GiB)]
    finally:
        neighbour.communicate("go\n", timeout=10)


def test_soft_mode_allows_counts_and_warns_once(tmp_path: Path) -> None:
    """Soft quota: allocations past it succeed, the excess is counted, one warning is logged,
    and free memory never underflows."""
    env = slot_env(tmp_path, [QUOTA], mode=abi.MemMode.SOFT)
    r = run(
        env,
        "init",
        "alloc",
        "mem",
        "40M",
        "alloc",
        "mem",
        "40M",
        "alloc",
        "mem",
        "8M",
        "meminfo",
        "usage",
    )
    assert r.outcomes() == ["ok 0", "ok 1", "ok 2"]
    assert r.field("meminfo")[1:3] == ["0", str(QUOTA)]
    assert r.field("used")[2] == str(88 * MiB)
    warnings = [line for line in r.stderr.splitlines() if "soft memory quota" in line]
    assert len(warnings) == 1 and warnings[0].startswith("fcsp")
    u = usage(env.slot)  # type: ignore[arg-type]
    assert u.device[0].mem_soft_excess_bytes == 24 * MiB
    assert u.device[0].mem_rejected == 0


def test_percentage_limit_resolves_against_the_real_total(tmp_path: Path) -> None:
    """A slot quota of 25 % (2500 basis points) on a 1 GiB device is 256 MiB."""
    env = Env(
        state=tmp_path / "sim-state",
        mem_bytes=GiB,
        slot=make_slot(tmp_path / "slot", basis_points=[2500]),
    )
    r = run(env, "init", "meminfo", "alloc", "mem", "200M", "alloc", "mem", "100M")
    assert r.field("meminfo")[2] == str(256 * MiB)
    assert r.outcomes() == ["ok 0", "err 2"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("512M", 512 * MiB),
        ("1.5G", 3 * GiB // 2),
        ("2G", 2 * GiB),
        ("256MiB", 256 * MiB),
        ("50%", 2 * GiB),
        ("1073741824", GiB),
    ],
)
def test_bud_memory_limit_for_a_bare_process(tmp_path: Path, value: str, expected: int) -> None:
    """BUD_MEMORY_LIMIT limits a process without a slot; sizes take binary suffixes or %."""
    env = Env(state=tmp_path / "sim-state", mem_bytes=4 * GiB, extra={"BUD_MEMORY_LIMIT": value})
    r = run(env, "init", "meminfo", "alloc", "mem", str(expected), "alloc", "mem", "1M")
    assert r.field("meminfo")[1:3] == [str(expected), str(expected)]
    assert r.outcomes() == ["ok 0", "err 2"]


def test_bad_bud_value_is_ignored_with_a_warning(tmp_path: Path) -> None:
    """A malformed BUD_MEMORY_LIMIT warns and limits nothing (it cannot raise a slot anyway)."""
    env = Env(state=tmp_path / "sim-state", extra={"BUD_MEMORY_LIMIT": "lots"})
    r = run(env, "init", "alloc", "mem", "8G")
    assert r.outcomes() == ["ok 0"]
    assert "BUD_MEMORY_LIMIT=lots" in r.stderr


def test_bud_can_lower_a_slot_quota(tmp_path: Path) -> None:
    """BUD_MEMORY_LIMIT below the slot's quota is the quota in force."""
    env = slot_env(tmp_path, [GiB])
    env.extra = {"BUD_MEMORY_LIMIT": "256M"}
    r = run(env, "init", "meminfo", "alloc", "mem", "300M")
    assert r.field("meminfo")[2] == str(256 * MiB)
    assert r.outcomes() == ["err 2"]


def test_bud_cannot_raise_a_slot_quota_or_soften_it(tmp_path: Path) -> None:
    """BUD_MEMORY_LIMIT above the slot's quota, or BUD_MEMORY_LIMIT_MODE=soft under a hard
    slot, changes nothing."""
    env = slot_env(tmp_path, [256 * MiB])
    env.extra = {"BUD_MEMORY_LIMIT": "4G", "BUD_MEMORY_LIMIT_MODE": "soft"}
    r = run(env, "init", "meminfo", "alloc", "mem", "200M", "alloc", "mem", "100M")
    assert r.field("meminfo")[2] == str(256 * MiB)
    assert r.outcomes() == ["ok 0", "err 2"]


def test_bud_hard_mode_hardens_a_soft_slot(tmp_path: Path) -> None:
    """BUD_MEMORY_LIMIT_MODE=hard makes a soft slot refuse, the stricter of the two."""
    env = slot_env(tmp_path, [QUOTA], mode=abi.MemMode.SOFT)
    env.extra = {"BUD_MEMORY_LIMIT_MODE": "hard"}
    r = run(env, "init", "alloc", "mem", "40M", "alloc", "mem", "40M")
    assert r.outcomes() == ["ok 0", "err 2"]


def test_per_device_limits(tmp_path: Path) -> None:
    """Each device has its own quota and usage; BUD_MEMORY_LIMIT_DEV1 lowers only device 1."""
    env = Env(
        state=tmp_path / "sim-state",
        devices=2,
        slot=make_slot(tmp_path / "slot", [GiB, GiB]),
        extra={"BUD_MEMORY_LIMIT_DEV1": "128M"},
    )
    r = run(
        env,
        "init",
        "meminfo",
        "alloc",
        "mem",
        "600M",
        "device",
        "1",
        "meminfo",
        "alloc",
        "mem",
        "100M",
        "alloc",
        "mem",
        "100M",
        "usage",
    )
    infos = [line.split()[2] for line in r.lines if line.startswith("meminfo ")]
    assert infos == [str(GiB), str(128 * MiB)]
    assert r.outcomes() == ["ok 0", "ok 1", "err 2"]
    used = {line.split()[1]: int(line.split()[2]) for line in r.lines if line.startswith("used ")}
    assert used == {"0": 600 * MiB, "1": 100 * MiB}


def test_slot_entries_follow_device_uuids(tmp_path: Path) -> None:
    """A slot entry with a UUID applies to the device with that UUID, whatever its ordinal."""
    env = Env(
        state=tmp_path / "sim-state",
        devices=2,
        slot=make_slot(tmp_path / "slot", [100 * MiB, 200 * MiB], uuids=[sim_uuid(1), sim_uuid(0)]),
    )
    r = run(env, "init", "meminfo", "device", "1", "meminfo", "totalmem", "0", "totalmem", "1")
    infos = [line.split()[2] for line in r.lines if line.startswith("meminfo ")]
    assert infos == [str(200 * MiB), str(100 * MiB)]
    totals = [line.split()[1] for line in r.lines if line.startswith("totalmem ")]
    assert totals == [str(200 * MiB), str(100 * MiB)]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_env_slot_dir_is_ignored_when_a_slot_is_mounted(tmp_path: Path) -> None:
    """Inside a container (a slot at /run/fcsp) FCSP_SLOT_DIR cannot point the shim at a
    laxer slot: the mounted one wins."""
    mounted = make_slot(tmp_path / "mounted", [128 * MiB])
    env = Env(state=tmp_path / "sim-state", slot=make_slot(tmp_path / "lax", [4 * GiB]))
    script = (
        "mkdir -p /run/fcsp && mount -t tmpfs fcsp-test /run/fcsp && "
        f"cp {mounted}/limits {mounted}/usage /run/fcsp/ && "
        f"exec {PROG_DIR / 'drv_procaddr'} init meminfo"
    )
    build()
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=env.environ(),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0 and "unshare" in out.stderr:
        pytest.skip(f"cannot make a mount namespace here: {out.stderr.strip()}")
    assert f"meminfo {128 * MiB} {128 * MiB} 0" in out.stdout.splitlines(), out
