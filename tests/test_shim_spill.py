"""Spill mode on the simulated driver: allocations past the quota served from managed memory
kept in host memory (advised host-preferred, accessed by the device) up to a bound, their
release, the tenant's unchanged view of memory, the families that never spill, and BUD_*
variables that may only make a slot stricter."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from fcsp_hook.slot import abi
from tests.shim.harness import (
    Env,
    GiB,
    MiB,
    Result,
    live_records,
    make_slot,
    read_until_ready,
    run,
    start,
    steps,
    usage,
)

QUOTA = 256 * MiB
ONE_X = abi.WHOLE_GPU_CENTI
OOM = "err 2"  # CUDA_ERROR_OUT_OF_MEMORY


def spill_env(
    tmp_path: Path,
    *,
    mode: abi.MemMode = abi.MemMode.SPILL,
    spill_bytes: int = 0,
    spill_centi: int = ONE_X,
    quota: int = QUOTA,
    extra: dict[str, str] | None = None,
    uvm_profile: str = "default",
) -> Env:
    slot = make_slot(
        tmp_path / "slot",
        [quota],
        mode=mode,
        spill_bytes=spill_bytes,
        spill_centi=spill_centi,
        uvm_profile=uvm_profile,
    )
    return Env(state=tmp_path / "sim-state", slot=slot, extra=extra)


def bare_env(tmp_path: Path, extra: dict[str, str]) -> Env:
    return Env(state=tmp_path / "sim-state", extra={"BUD_MEMORY_LIMIT": "256M", **extra})


def used(r: Result) -> list[int]:
    """Device 0's charge at each `usage` (no line: nothing charged)."""
    return [int(line.split()[2]) for line in r.lines if line.startswith("used 0 ")]


def spilled(r: Result) -> list[int]:
    """Device 0's spill charge at each `usage` that printed one."""
    return [int(line.split()[2]) for line in r.lines if line.startswith("spill 0 ")]


MOVES = ("in", "out")  # how often the sim moved an allocation: tests/test_shim_uvm.py


def advice(r: Result) -> list[dict[str, str]]:
    """Every `advice` line as its key=value pairs: where the allocation is and is advised."""
    return [
        {k: v for k, v in (word.split("=", 1) for word in line.split()[1:]) if k not in MOVES}
        for line in r.lines
        if line.startswith("advice ")
    ]


HOST_MAPPED = {"managed": "1", "preferred": "host", "accessed_by": "1", "resident": "0"}


def warnings(r: Result, name: str) -> list[str]:
    return [line for line in r.stderr.splitlines() if name in line]


def test_allocations_past_the_quota_spill_to_host_memory_up_to_the_bound(tmp_path: Path) -> None:
    """With a 256 MiB quota and a 1x bound: allocations to the quota are managed memory kept
    on the device (what eviction may later move); the next ones (cuMemAlloc and
    cuMemAllocManaged) succeed as managed memory that prefers the host and is accessed by
    device 0, charged as spilled while the device charge stays at the quota; past quota +
    bound, CUDA_ERROR_OUT_OF_MEMORY, counted as a refusal."""
    env = spill_env(tmp_path)
    r = run(
        env,
        *steps("init alloc mem 128M alloc mem 128M alloc mem 64M alloc managed 128M alloc"),
        *steps("mem 64M usage alloc mem 1M advice 0 advice 2 advice 3 advice 4"),
    )
    assert r.outcomes() == ["ok 0", "ok 1", "ok 2", "ok 3", "ok 4", OOM]
    assert used(r) == [QUOTA]
    assert spilled(r) == [QUOTA]
    device, *spills = advice(r)
    assert device == {
        "managed": "1",
        "preferred": "device0",
        "accessed_by": "1",
        "resident": str(128 * MiB),
    }
    assert spills == [HOST_MAPPED] * 3
    u = usage(env.slot)  # type: ignore[arg-type]
    assert u.device[0].mem_rejected == 1
    assert u.device[0].mem_spill_peak_bytes == QUOTA
    assert u.device[0].mem_spilled_bytes == 0  # released at exit, with the device charge
    assert u.device[0].mem_used_bytes == 0


def test_a_spill_is_logged_once_at_info_level(tmp_path: Path) -> None:
    """The first spill of a process logs one info line; later ones and the default level
    (warnings only) log nothing."""
    args = ("init", "alloc", "mem", "256M", "alloc", "mem", "8M", "alloc", "mem", "8M")
    info = run(spill_env(tmp_path, extra={"BUD_LOG_LEVEL": "info"}), *args)
    assert len(warnings(info, "served from host memory")) == 1
    quiet = run(spill_env(tmp_path), *args)
    assert quiet.outcomes() == ["ok 0", "ok 1", "ok 2"]
    assert quiet.stderr == ""


def test_freeing_a_spilled_allocation_releases_its_charge(tmp_path: Path) -> None:
    """cuMemFree of a spilled allocation gives its spill charge back (the device charge is
    untouched), so the whole bound can be spilled again."""
    env = spill_env(tmp_path)
    r = run(
        env,
        *steps("init alloc mem 256M alloc mem 200M usage free 1 usage alloc mem 256M usage"),
    )
    assert r.outcomes() == ["ok 0", "ok 1", "ok 2"]
    assert r.field("free")[1] == "0"
    assert spilled(r) == [200 * MiB, 0, QUOTA]
    assert used(r) == [QUOTA] * 3


def test_destroying_a_context_releases_its_spill_charge(tmp_path: Path) -> None:
    """Destroying a context frees its spilled allocations too, and their spill charge."""
    env = spill_env(tmp_path)
    r = run(
        env,
        *steps("init ctx 0 alloc mem 256M alloc mem 100M usage destroyctx 0 usage"),
    )
    assert r.outcomes() == ["ok 0", "ok 1", "ok 2"]
    assert spilled(r) == [100 * MiB, 0]
    assert used(r) == [QUOTA]  # and nothing after the destroy


def test_sigkilled_process_spill_charge_is_released(tmp_path: Path) -> None:
    """A SIGKILLed process's spill charge (in its record, like its device charge) is released
    by the next process that finds it dead, which can then spill the whole bound."""
    env = spill_env(tmp_path)
    victim = start(env, "init", "alloc", "mem", "256M", "alloc", "mem", "200M", "wait")
    try:
        assert read_until_ready(victim)[-2:] == ["ok 0", "ok 1"]
        record = next(p for p in usage(env.slot).proc if p.pid == victim.pid)  # type: ignore[arg-type]
        assert record.mem_spilled_bytes[0] == 200 * MiB
        assert record.mem_used_bytes[0] == QUOTA
        os.kill(victim.pid, signal.SIGKILL)
        # Not waited for yet: a zombie, whose memory the driver has already freed.
        r = run(env, "init", "alloc", "mem", "256M", "alloc", "mem", "256M", "usage")
        assert r.outcomes() == ["ok 0", "ok 1"]
        assert spilled(r) == [QUOTA]
        assert used(r) == [QUOTA]
        assert victim.pid not in live_records(env.slot)  # type: ignore[arg-type]
    finally:
        victim.communicate(timeout=10)


def test_processes_of_a_tenant_share_one_spill_bound(tmp_path: Path) -> None:
    """The bound holds across the tenant's processes: with 200 MiB of a 256 MiB bound
    spilled by one, another cannot spill 100 MiB more, but can spill 56 MiB."""
    env = spill_env(tmp_path)
    holder = start(env, "init", "alloc", "mem", "256M", "alloc", "mem", "200M", "wait")
    try:
        read_until_ready(holder)
        r = run(env, "init", "alloc", "mem", "100M", "alloc", "mem", "56M", "usage")
        assert r.outcomes() == [OOM, "ok 0"]
        assert spilled(r) == [QUOTA]
    finally:
        holder.communicate("go\n", timeout=10)


def test_racing_processes_never_spill_past_the_bound(tmp_path: Path) -> None:
    """Processes released together race for the last bytes of the bound: the spill charge is
    one compare-and-swap that checks it, so exactly as many spills as fit are granted."""
    env = spill_env(tmp_path, quota=64 * MiB)
    holder = start(env, "init", "alloc", "mem", "64M", "wait")
    racers: list[subprocess.Popen[str]] = []
    try:
        read_until_ready(holder)
        racers = [start(env, "init", "wait", "alloc", "mem", "30M", "wait") for _ in range(8)]
        for p in racers:
            read_until_ready(p)
        for p in racers:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        granted = sum("ok 0" in read_until_ready(p) for p in racers)
        assert granted == 2  # 2 x 30 MiB fit a 64 MiB bound, a third does not
        assert usage(env.slot).device[0].mem_spilled_bytes == 60 * MiB  # type: ignore[arg-type]
    finally:
        for p in [*racers, holder]:
            p.communicate("go\n", timeout=10)


def test_the_tenant_still_sees_its_quota_as_total(tmp_path: Path) -> None:
    """While spilling, cuMemGetInfo (both versions) and cuDeviceTotalMem report the quota as
    the total and nothing free: spill never changes what frameworks size themselves to."""
    env = spill_env(tmp_path)
    r = run(
        env,
        *steps("init alloc mem 256M alloc mem 100M meminfo meminfo1 totalmem 0"),
    )
    assert r.outcomes() == ["ok 0", "ok 1"]
    assert r.field("meminfo")[1:3] == ["0", str(QUOTA)]
    assert r.field("meminfo1")[1:3] == ["0", str(QUOTA)]
    assert r.field("totalmem")[1] == str(QUOTA)


def test_nvml_counts_only_device_resident_memory(tmp_path: Path) -> None:
    """NVML inside the tenant shows the quota; the driver's per-process figure (the host's
    cross-check) counts the spilling process's device memory only, not what it holds in
    host memory, so it never looks over its quota."""
    env = spill_env(tmp_path)
    holder = start(env, "init", "alloc", "mem", "256M", "alloc", "mem", "200M", "wait")
    try:
        read_until_ready(holder)
        r = run(env, prog="nvmlq")
        assert r.rc == 0, r.stderr
        assert r.field("nvml")[2:] == [str(QUOTA), "0", str(QUOTA)]
        procs = {int(p[2]): int(p[3]) for p in (line.split() for line in r.lines) if p[0] == "proc"}
        assert procs == {holder.pid: QUOTA}
    finally:
        holder.communicate("go\n", timeout=10)


# family -> (SIZE for about 40 MiB, whether it spills past a 64 MiB quota)
FAMILIES = {
    "mem": ("40M", True),
    "managed": ("40M", True),
    "mem1": ("40M", False),  # cuMemAlloc: no managed pointer fits its 32 bits
    "pitch": ("10M", False),  # 4 rows
    "async": ("40M", False),
    "pool": ("40M", False),
    "vmm": ("40M", False),
    "array": ("40M", False),
    "array3d": ("40M", False),
    "mipmap": ("27M", False),  # two levels: 27M + 13.5M
}


@pytest.mark.parametrize("prog", ["drv_procaddr", "drv_direct"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_which_families_spill(tmp_path: Path, family: str, prog: str) -> None:
    """In spill mode a second ~40 MiB allocation under a 64 MiB quota spills for cuMemAlloc_v2
    and cuMemAllocManaged; every other family fails with CUDA_ERROR_OUT_OF_MEMORY exactly as
    in hard mode, nothing stays charged as spilled, and the refusal is counted."""
    size, spills = FAMILIES[family]
    env = spill_env(tmp_path, quota=64 * MiB)
    r = run(env, "init", "alloc", family, size, "alloc", family, size, "usage", prog=prog)
    assert r.outcomes() == ["ok 0", "ok 1" if spills else OOM], r.lines
    assert 40 * MiB <= used(r)[0] <= 64 * MiB
    assert spilled(r) == ([40 * MiB] if spills else [])
    assert usage(env.slot).device[0].mem_rejected == (0 if spills else 1)  # type: ignore[arg-type]


# ---- BUD_* variables: only ever stricter inside a slot -----------------------------------


@pytest.mark.parametrize(
    "extra", [{"BUD_MEMORY_LIMIT_MODE": "spill"}, {"BUD_UVM_ENABLED": "1"}], ids=["mode", "uvm"]
)
def test_bud_cannot_make_a_hard_slot_spill(tmp_path: Path, extra: dict[str, str]) -> None:
    """A hard slot stays hard whatever BUD_* asks: spill is laxer than hard."""
    env = spill_env(tmp_path, mode=abi.MemMode.HARD, extra=extra)
    r = run(env, "init", "alloc", "mem", "256M", "alloc", "mem", "1M", "usage")
    assert r.outcomes() == ["ok 0", OOM]
    assert spilled(r) == []


@pytest.mark.parametrize(
    "extra", [{"BUD_MEMORY_LIMIT_MODE": "hard"}, {"BUD_UVM_ENABLED": "0"}], ids=["mode", "uvm"]
)
def test_bud_can_make_a_spill_slot_hard(tmp_path: Path, extra: dict[str, str]) -> None:
    """BUD_MEMORY_LIMIT_MODE=hard or BUD_UVM_ENABLED=0 make a spill slot refuse past its
    quota, the stricter choice."""
    env = spill_env(tmp_path, extra=extra)
    r = run(env, "init", "alloc", "mem", "256M", "alloc", "mem", "1M", "usage")
    assert r.outcomes() == ["ok 0", OOM]
    assert spilled(r) == []


def test_bud_soft_mode_cannot_loosen_a_spill_slot(tmp_path: Path) -> None:
    """BUD_MEMORY_LIMIT_MODE=soft under a spill slot changes nothing: past quota + bound the
    allocation still fails."""
    env = spill_env(tmp_path, extra={"BUD_MEMORY_LIMIT_MODE": "soft"})
    r = run(env, "init", "alloc", "mem", "256M", "alloc", "mem", "256M", "alloc", "mem", "1M")
    assert r.outcomes() == ["ok 0", "ok 1", OOM]


def test_bud_spill_tightens_a_soft_slot(tmp_path: Path) -> None:
    """BUD_MEMORY_LIMIT_MODE=spill under a soft slot (which has no bound of its own) spills
    up to 1x the quota and then refuses: stricter than soft."""
    env = spill_env(
        tmp_path, mode=abi.MemMode.SOFT, spill_centi=0, extra={"BUD_MEMORY_LIMIT_MODE": "spill"}
    )
    r = run(
        env,
        *steps("init alloc mem 256M alloc mem 256M alloc mem 1M advice 1"),
    )
    assert r.outcomes() == ["ok 0", "ok 1", OOM]
    assert advice(r) == [HOST_MAPPED]


@pytest.mark.parametrize("value", ["64M", "0.25x"])
def test_bud_uvm_max_lowers_the_slot_bound(tmp_path: Path, value: str) -> None:
    """BUD_UVM_MAX below a 1x bound (as a size or a multiple of the quota) is the bound."""
    env = spill_env(tmp_path, extra={"BUD_UVM_MAX": value})
    r = run(env, "init", "alloc", "mem", "256M", "alloc", "mem", "64M", "alloc", "mem", "1M")
    assert r.outcomes() == ["ok 0", "ok 1", OOM]


@pytest.mark.parametrize("value", ["4G", "2x"])
def test_bud_uvm_max_cannot_raise_the_slot_bound(tmp_path: Path, value: str) -> None:
    """BUD_UVM_MAX above the slot's bound leaves the slot's."""
    env = spill_env(tmp_path, extra={"BUD_UVM_MAX": value})
    r = run(env, "init", "alloc", "mem", "256M", "alloc", "mem", "256M", "alloc", "mem", "1M")
    assert r.outcomes() == ["ok 0", "ok 1", OOM]


def test_bud_uvm_max_cannot_raise_a_byte_bound(tmp_path: Path) -> None:
    """A slot's bound in bytes holds against a larger BUD_UVM_MAX too."""
    env = spill_env(tmp_path, spill_bytes=32 * MiB, spill_centi=0, extra={"BUD_UVM_MAX": "1x"})
    r = run(env, "init", "alloc", "mem", "256M", "alloc", "mem", "32M", "alloc", "mem", "1M")
    assert r.outcomes() == ["ok 0", "ok 1", OOM]


@pytest.mark.parametrize(
    ("extra", "bound"),
    [
        ({"BUD_UVM_ENABLED": "1"}, QUOTA),
        ({"BUD_MEMORY_LIMIT_MODE": "spill"}, QUOTA),
        ({"BUD_MEMORY_LIMIT_MODE": "spill", "BUD_UVM_MAX": "1.5x"}, 384 * MiB),
        ({"BUD_UVM_ENABLED": "1", "BUD_UVM_MAX": "100M"}, 100 * MiB),
    ],
    ids=["enabled", "mode", "ratio", "bytes"],
)
def test_bare_process_spills_up_to_its_bound(
    tmp_path: Path, extra: dict[str, str], bound: int
) -> None:
    """Without a slot, BUD_MEMORY_LIMIT=256M with spill mode spills up to 1x its quota, or
    BUD_UVM_MAX, as host-preferred managed memory; past that it refuses."""
    env = bare_env(tmp_path, extra)
    r = run(
        env,
        *steps("init alloc mem 256M alloc mem"),
        str(bound),
        *steps("alloc mem 1M advice 1 meminfo"),
    )
    assert r.outcomes() == ["ok 0", "ok 1", OOM]
    assert advice(r) == [HOST_MAPPED]
    assert r.field("meminfo")[1:3] == ["0", str(QUOTA)]


@pytest.mark.parametrize(
    ("name", "value", "form"),
    [
        ("BUD_UVM_MAX", "lots", "1.5x"),
        ("BUD_UVM_MAX", "50%", "1.5x"),
        ("BUD_UVM_MAX", "200x", "100x"),
        ("BUD_MEMORY_LIMIT_MODE", "loose", "hard, spill or soft"),
        ("BUD_UVM_ENABLED", "yes please", "1 or 0"),
        ("BUD_UVM_PROFILE", "fast", "default, llm_inference or training"),
        ("BUD_UVM_PRESSURE_HIGH_PCT", "101", "from 1 to 100"),
        ("BUD_PREFETCH_ENABLED", "on", "1 or 0"),
        ("BUD_PREFETCH_MAX_SIZE_MB", "64M", "from 1 to"),
    ],
)
def test_malformed_bud_value_warns_once_and_is_ignored(
    tmp_path: Path, name: str, value: str, form: str
) -> None:
    """A malformed BUD_* value logs one warning line naming the variable and the accepted
    form, and changes nothing: the slot's 1x bound still holds."""
    env = spill_env(tmp_path, extra={name: value})
    r = run(env, "init", "alloc", "mem", "256M", "alloc", "mem", "256M", "alloc", "mem", "1M")
    assert r.outcomes() == ["ok 0", "ok 1", OOM]
    lines = warnings(r, f"{name}={value}")
    assert len(lines) == 1 and form in lines[0] and lines[0].startswith("fcsp"), r.stderr


# ---- spill mode's knobs: performance settings, not limits ---------------------------------


def knobs(r: Result) -> str:
    (line,) = warnings(r, "spill mode: profile")
    return line.split("spill mode: ", 1)[1]


def test_bare_process_knobs_come_from_its_profile_with_overrides(tmp_path: Path) -> None:
    """A bare process takes BUD_UVM_PROFILE's knobs from FCSP_UVM_PROFILES, with single knobs
    overridden by BUD_UVM_PRESSURE_*_PCT and BUD_PREFETCH_MAX_SIZE_MB."""
    env = bare_env(
        tmp_path,
        {
            "BUD_UVM_ENABLED": "1",
            "BUD_UVM_PROFILE": "training",
            "BUD_LOG_LEVEL": "info",
            "BUD_UVM_PRESSURE_WARNING_PCT": "60",
            "BUD_PREFETCH_MAX_SIZE_MB": "8",
        },
    )
    r = run(env, "init")
    assert (
        knobs(r) == "profile training, pressure 60/90/97 %, prefetch 8388608 bytes, eviction fifo"
    )


def test_slot_profile_wins_over_bud_uvm_profile(tmp_path: Path) -> None:
    """Inside a slot its profile applies, not BUD_UVM_PROFILE; single knobs still override
    (BUD_PREFETCH_ENABLED=0 turns prefetching off)."""
    env = spill_env(
        tmp_path,
        uvm_profile="llm_inference",
        extra={"BUD_UVM_PROFILE": "training", "BUD_PREFETCH_ENABLED": "0", "BUD_LOG_LEVEL": "info"},
    )
    r = run(env, "init")
    assert knobs(r) == "profile llm_inference, pressure 70/85/95 %, prefetch 0 bytes, eviction lru"


def test_pressure_levels_that_do_not_rise_are_refused(tmp_path: Path) -> None:
    """Pressure overrides that would not rise (warning 90 over high 85) warn once and leave
    the profile's levels."""
    env = spill_env(tmp_path, extra={"BUD_UVM_PRESSURE_WARNING_PCT": "90", "BUD_LOG_LEVEL": "info"})
    r = run(env, "init")
    assert len(warnings(r, "BUD_UVM_PRESSURE_*_PCT")) == 1
    assert knobs(r).startswith("profile default, pressure 70/85/95 %")


def test_no_knobs_are_logged_outside_spill_mode(tmp_path: Path) -> None:
    """A hard slot does not run spill mode: its processes say nothing of it."""
    env = spill_env(tmp_path, mode=abi.MemMode.HARD, extra={"BUD_LOG_LEVEL": "info"})
    assert warnings(run(env, "init"), "spill mode") == []


def test_a_gib_quota_spills_a_gib(tmp_path: Path) -> None:
    """The bound scales with the quota: 1x of 1 GiB is 1 GiB."""
    env = spill_env(tmp_path, quota=GiB)
    r = run(env, "init", "alloc", "mem", "1G", "alloc", "mem", "1G", "alloc", "mem", "1M")
    assert r.outcomes() == ["ok 0", "ok 1", OOM]


def test_a_spill_never_takes_more_than_the_gpu_has_free(tmp_path: Path) -> None:
    """On a 384 MiB GPU with 256 MiB of it the tenant's, 128 MiB are free: spilling more
    than that in all is refused, within the 1x bound or not, so unified memory never
    exceeds what the device could hold."""
    env = spill_env(tmp_path)
    env.mem_bytes = 384 * MiB
    r = run(
        env,
        *("init", "alloc", "mem", "256M", "alloc", "mem", "200M"),
        *("alloc", "mem", "100M", "alloc", "mem", "30M", "usage"),
    )
    assert r.outcomes() == ["ok 0", OOM, "ok 1", OOM]
    assert spilled(r) == [100 * MiB]
