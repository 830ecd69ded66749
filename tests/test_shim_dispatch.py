"""Interception: cuGetProcAddress, dlsym (RTLD_NEXT included) and exported symbols reach the
shim's hooks with the variant asked for, and nothing else is touched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.shim.harness import Env, GiB, live_records, make_slot, run

PTDS = "2"  # CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM
LOADERS = ["drv_procaddr", "drv_direct"]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(state=tmp_path / "sim-state", slot=make_slot(tmp_path / "slot", [GiB]))


@pytest.mark.parametrize(
    ("symbol", "version", "flags", "expected"),
    [
        ("cuLaunchKernel", "13000", "0", "cuLaunchKernel"),
        ("cuLaunchKernel", "13000", PTDS, "cuLaunchKernel_ptsz"),
        ("cuLaunchKernelEx", "13000", PTDS, "cuLaunchKernelEx_ptsz"),
        ("cuGraphLaunch", "13000", PTDS, "cuGraphLaunch_ptsz"),
        ("cuMemAllocAsync", "13000", PTDS, "cuMemAllocAsync_ptsz"),
        ("cuMemAllocAsync", "13000", "0", "cuMemAllocAsync"),
        ("cuMemAlloc", "13000", "0", "cuMemAlloc_v2"),
        ("cuMemAlloc", "3000", "0", "cuMemAlloc"),
        ("cuMemGetInfo", "13000", "0", "cuMemGetInfo_v2"),
        ("cuGetProcAddress", "13000", "0", "cuGetProcAddress_v2"),
        ("cuGetProcAddress", "11030", "0", "cuGetProcAddress"),
        ("cuIpcOpenMemHandle", "13000", "0", "cuIpcOpenMemHandle_v2"),
    ],
)
def test_get_proc_address_returns_the_hook_of_the_variant_asked_for(
    env: Env, symbol: str, version: str, flags: str, expected: str
) -> None:
    """cuGetProcAddress hands out the shim's hook for exactly the variant the driver chose by
    version and flags, so a per-thread-stream caller still gets a _ptsz entry point."""
    r = run(env, "resolve", symbol, version, flags)
    assert r.field("resolve") == [
        "resolve",
        symbol,
        "rc=0",
        "status=0",
        "lib=libvgpu.so",
        f"sym={expected}",
    ]


def test_unhooked_symbols_come_from_the_driver(env: Env) -> None:
    """An entry point the shim does not hook is the driver's own pointer, untouched."""
    r = run(env, "resolve", "cuDeviceGetName", "13000", "0")
    assert "lib=libcuda.so.1" in r.field("resolve")
    assert "sym=cuDeviceGetName" in r.field("resolve")


def test_unknown_symbols_keep_the_driver_status(env: Env) -> None:
    """A symbol the driver does not know fails the same way through the shim."""
    r = run(env, "resolve", "cuNoSuchEntryPoint", "13000", "0")
    assert r.field("resolve")[2:4] == ["rc=500", "status=1"]  # CUDA_ERROR_NOT_FOUND


@pytest.mark.parametrize("prog", LOADERS)
@pytest.mark.parametrize("ptsz", [False, True])
def test_launches_keep_their_stream_semantics_and_are_counted(
    env: Env, prog: str, ptsz: bool
) -> None:
    """Every launch family reaches the driver's matching variant (legacy or _ptsz) and is
    counted in the tenant's usage; host functions are passed through but not counted."""
    args = ["--ptsz"] if ptsz else []
    args += ["init", "launch", "kernel", "3", "launch", "kernelex", "2", "launch", "coop", "1"]
    args += ["launch", "graph", "1", "launch", "host", "1"]
    suffix = "_ptsz" if ptsz else ""
    for name in (
        "cuLaunchKernel",
        "cuLaunchKernelEx",
        "cuLaunchCooperativeKernel",
        "cuGraphLaunch",
    ):
        args += ["count", name + suffix, "count", name + ("" if ptsz else "_ptsz")]
    r = run(env, *args, "usage", prog=prog)
    counts = {
        line.split()[1]: int(line.split()[2]) for line in r.lines if line.startswith("count ")
    }
    assert counts[f"cuLaunchKernel{suffix}"] == 3
    assert counts[f"cuLaunchKernelEx{suffix}"] == 2
    assert counts[f"cuLaunchCooperativeKernel{suffix}"] == 1
    assert counts[f"cuGraphLaunch{suffix}"] == 1
    other = "" if ptsz else "_ptsz"
    assert counts[f"cuLaunchKernel{other}"] == 0
    assert counts[f"cuGraphLaunch{other}"] == 0
    assert r.field("used")[4] == "7"  # launches on device 0


def test_pass_through_without_slot_or_limits(tmp_path: Path) -> None:
    """Without a slot and without BUD_* the shim hands out the driver's own pointers and
    changes no answer: pure pass-through."""
    env = Env(state=tmp_path / "sim-state", mem_bytes=4 * GiB)
    r = run(
        env,
        "resolve",
        "cuMemAlloc",
        "13000",
        "0",
        "resolve",
        "cuLaunchKernel",
        "13000",
        PTDS,
        "init",
        "alloc",
        "mem",
        "3G",
        "meminfo",
        "totalmem",
        "0",
    )
    resolved = [line for line in r.lines if line.startswith("resolve")]
    assert all("lib=libcuda.so.1" in line for line in resolved), resolved
    assert r.outcomes() == ["ok 0"]
    assert r.field("meminfo")[1:3] == [str(GiB), str(4 * GiB)]
    assert r.field("totalmem")[1] == str(4 * GiB)
    assert r.stderr == ""


def _rtld(env: Env, preload: bool) -> dict[str, list[str]]:
    r = run(env, prog="rtld_next", preload=preload)
    assert r.rc == 0, r.stderr
    return {line.split()[0]: line.split()[1:] for line in r.lines}


@pytest.mark.parametrize("active", [False, True])
def test_rtld_next_resolves_relative_to_the_caller(tmp_path: Path, active: bool) -> None:
    """dlsym(RTLD_NEXT) from a library finds the next definition after *that* library, as
    without the shim; repeated lookups agree; hooked driver names give the hook only when
    the shim is active."""
    env = Env(
        state=tmp_path / "sim-state", slot=make_slot(tmp_path / "slot", [GiB]) if active else None
    )
    plain = _rtld(env, preload=False)
    shimmed = _rtld(env, preload=True)
    assert shimmed["next_from_a"] == plain["next_from_a"] == ["B"]
    assert shimmed["next_from_main"] == plain["next_from_main"] == ["A"]
    assert shimmed["default"] == ["A"]
    assert shimmed["missing"] == ["NULL"]
    assert shimmed["unhooked"] == ["libcuda.so.1"]
    owner = "libvgpu.so" if active else "libcuda.so.1"
    assert shimmed["cu_next"] == [owner, owner, "same"]
    assert shimmed["cu_handle"] == [owner, "same"]


def test_dlsym_on_the_driver_handle_is_routed(env: Env) -> None:
    """A program that dlopens libcuda.so.1 and dlsyms cuGetProcAddress_v2 (the CUDA runtime's
    way in) gets the shim's resolver: allocations through it are charged."""
    r = run(env, "init", "alloc", "mem", "600M", "alloc", "mem", "600M")
    assert r.outcomes() == ["ok 0", "err 2"]


def test_process_that_never_uses_cuda_loads_no_driver(tmp_path: Path) -> None:
    """With a slot mounted, a process that never calls CUDA does not load libcuda, and the
    process record it held while running is free again once it exits."""
    slot = make_slot(tmp_path / "slot", [GiB])
    env = Env(state=tmp_path / "sim-state", slot=slot)
    out = subprocess.run(
        ["cat", "/proc/self/maps"], env=env.environ(), capture_output=True, text=True, check=True
    ).stdout
    assert "libvgpu.so" in out
    assert "libcuda" not in out
    assert live_records(slot) == {}
