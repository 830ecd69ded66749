"""Spill mode's eviction and prefetch on the simulated driver: every allocation is managed
memory, a launch brings the spilled ranges its arguments point into to the device, evicting
the process's other resident ranges by the profile's policy to make room, a lowered quota
is shrunk to, and every charge is released whichever side of the bus a range is on.

The sim's functions take a 4-byte count and eight pointers (cuFuncGetParamInfo); drv's
`use FUNC KIND N ID...` launches one with the addresses of allocations ID..., and `advice
ID` tells where the driver keeps an allocation and how often it moved there and back."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fcsp_hook.slot import abi, live
from tests.shim.harness import (
    Env,
    MiB,
    Result,
    make_slot,
    read_until_ready,
    run,
    start,
    steps,
    usage,
)

QUOTA = 64 * MiB
RANGE = 16 * MiB
TWO_X = 2 * abi.WHOLE_GPU_CENTI
# Four ranges fill the quota (ids 0-3, on the device), two more spill (ids 4, 5); id 6 is
# the function every launch runs.
SETUP = ("init", *("alloc", "mem", "16M") * 6, "func", "k_1us")
FUNC = "6"
ON_DEVICE = "D"
IN_HOST = "H"


def uvm_env(
    tmp_path: Path,
    *,
    mode: abi.MemMode = abi.MemMode.SPILL,
    profile: str = "default",
    extra: dict[str, str] | None = None,
) -> Env:
    slot = make_slot(tmp_path / "slot", [QUOTA], mode=mode, spill_centi=TWO_X, uvm_profile=profile)
    return Env(state=tmp_path / "sim-state", slot=slot, extra=extra)


def use(*ids: int, func: str = FUNC, kind: str = "kernel") -> tuple[str, ...]:
    """One launch of the sim function whose pointer arguments are allocations `ids`."""
    return ("use", func, kind, str(len(ids)), *(str(i) for i in ids))


def advise_all(count: int = 6) -> tuple[str, ...]:
    return tuple(word for i in range(count) for word in ("advice", str(i)))


def advice(r: Result) -> list[dict[str, str]]:
    return [
        dict(word.split("=", 1) for word in line.split()[1:])
        for line in r.lines
        if line.startswith("advice ")
    ]


def place(a: dict[str, str]) -> str:
    """D: advised to and held on device 0; H: advised to and held in host memory."""
    if a["preferred"] == "device0" and a["resident"] != "0":
        return ON_DEVICE
    assert a["preferred"] == "host" and a["resident"] == "0", a
    return IN_HOST


def places(r: Result, count: int = 6) -> list[str]:
    """Where the allocations were at each group of `count` advice lines, as D/H strings."""
    marks = [place(a) for a in advice(r)]
    return ["".join(marks[i : i + count]) for i in range(0, len(marks), count)]


def counter(r: Result, word: str) -> list[int]:
    """Device 0's figure at each `usage` that printed a `word` line."""
    return [int(line.split()[2]) for line in r.lines if line.startswith(f"{word} 0 ")]


def migrated(r: Result) -> tuple[int, int]:
    """Bytes moved to the device and to the host, at the last `usage`."""
    lines = [line.split() for line in r.lines if line.startswith("migrated 0 ")]
    return (int(lines[-1][3]), int(lines[-1][5])) if lines else (0, 0)


def uses(r: Result) -> list[str]:
    return [line for line in r.lines if line.startswith("use ")]


# ---- managed memory in spill mode only ---------------------------------------------------


def test_spill_mode_allocations_within_the_quota_are_managed_on_the_device(
    tmp_path: Path,
) -> None:
    """In spill mode a cuMemAlloc_v2 within the quota is managed memory advised to live on
    device 0 and accessed by it, charged to the quota as before."""
    env = uvm_env(tmp_path)
    r = run(env, "init", "alloc", "mem", "16M", "usage", "advice", "0")
    assert advice(r) == [
        {
            "managed": "1",
            "preferred": "device0",
            "accessed_by": "1",
            "resident": str(RANGE),
            "in": "0",
            "out": "0",
        }
    ]
    assert counter(r, "used") == [RANGE]


@pytest.mark.parametrize("mode", [abi.MemMode.HARD, abi.MemMode.SOFT])
def test_hard_and_soft_allocations_stay_plain_device_memory(
    tmp_path: Path, mode: abi.MemMode
) -> None:
    """Outside spill mode cuMemAlloc_v2 is plain device memory with no advice, and a launch
    with pointer arguments moves nothing and asks the driver for no parameter layout."""
    env = uvm_env(tmp_path, mode=mode)
    r = run(
        env,
        *steps("init alloc mem 16M func k_1us"),
        *use(0, func="1"),
        *steps("advice 0 count cuFuncGetParamInfo count cuMemPrefetchAsync_v2"),
    )
    assert uses(r) == ["use 0"]
    assert advice(r)[0] == {
        "managed": "0",
        "preferred": "none",
        "accessed_by": "0",
        "resident": str(RANGE),
        "in": "0",
        "out": "0",
    }
    assert r.field("count")[1:] == ["cuFuncGetParamInfo", "0"]
    assert r.lines[-1].split()[1:] == ["cuMemPrefetchAsync_v2", "0"]


# ---- promotion --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "ptsz"),
    [
        ("kernel", False),
        ("kernel", True),
        ("kernelex", False),
        ("coop", False),
        ("packed", False),  # the pointers inside a structure, as PyTorch and CUTLASS pass them
    ],
    ids=["kernel", "kernel_ptsz", "kernelex", "coop", "packed"],
)
def test_a_launch_promotes_a_spilled_range_when_the_quota_has_room(
    tmp_path: Path, kind: str, ptsz: bool
) -> None:
    """32 + 32 MiB fill the quota, a 16 MiB range spills; once 32 MiB are freed, a launch
    whose argument points into the spilled range (not at its start) moves it to the device:
    advised there and resident, its charge moved from spilled to used, 16 MiB counted as
    migrated in, and the launch's stream made to wait for the move."""
    env = uvm_env(tmp_path)
    prefix = ("--ptsz",) if ptsz else ()
    r = run(
        env,
        *prefix,
        "init",
        "alloc", "mem", "32M",
        "alloc", "mem", "32M",
        "alloc", "mem", "16M",
        "func", "p_k_1us" if kind == "packed" else "k_1us",
        "free", "0",
        "usage",
        *use(2, func="3", kind=kind),
        "usage",
        "advice", "2",
        "count", "cuStreamWaitEvent",
    )  # fmt: skip
    assert uses(r) == ["use 0"]
    assert counter(r, "used") == [32 * MiB, 48 * MiB]
    assert counter(r, "spill") == [RANGE, 0]
    assert places(r, 1) == [ON_DEVICE]
    assert advice(r)[0]["in"] == "1"
    assert migrated(r) == (RANGE, 0)
    assert r.field("count")[1:] == ["cuStreamWaitEvent", "1"]


# ---- eviction by the policy -------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "hot", "expected"),
    [
        # LRU: 3, then 2 are the least recently used when room is needed; 2 comes back in
        # place of nothing, since every resident range was used after 2's previous use.
        ("default", [4, 5, 2], ["DDDHDH", "DDHHDD", "DDHHDD"]),
        # FIFO (training): of the ranges unused since the promoted one's previous use, the
        # oldest allocation goes first, however recently used: 0, then 1, then 2 (for 0,
        # whose previous use came after 2's and 3's).
        ("training", [4, 5, 0], ["HDDDDH", "HHDDDD", "DHHDDD"]),
    ],
    ids=["lru", "fifo"],
)
def test_a_full_quota_evicts_by_the_policy_to_promote(
    tmp_path: Path, profile: str, hot: list[int], expected: list[str]
) -> None:
    """With the quota full of ranges 0-3 and 4, 5 spilled, launches use 3, 2, 1, 0, then 4
    and 5 (which stay in host memory: a first use evicts only ranges never used).  Each
    launch of the moving hot set `hot` then evicts a resident range by the profile's policy
    and promotes the one it uses, if a range unused since that one's previous use can go;
    the device charge never passes the quota at any point, and the driver is asked for the
    function's layout once."""
    warm = [3, 2, 1, 0, 4, 5]
    env = uvm_env(tmp_path, profile=profile)
    steps: list[str] = []
    for i in hot:
        steps += [*use(i), "usage", *advise_all()]
    r = run(env, *SETUP, *(w for i in warm for w in use(i)), *steps, "count", "cuFuncGetParamInfo")
    assert uses(r) == ["use 0"] * (len(warm) + len(hot))
    assert places(r) == expected
    assert all(u <= QUOTA for u in counter(r, "used")), counter(r, "used")
    assert counter(r, "used")[-1] == QUOTA
    before = ["DDDDHH", *expected[:-1]]
    promotions = sum(
        (was, now) == (IN_HOST, ON_DEVICE)
        for old, new in zip(before, expected, strict=True)
        for was, now in zip(old, new, strict=True)
    )
    assert migrated(r) == (promotions * RANGE, promotions * RANGE)  # each evicted one
    # 8 pointers and a count, then the index past the last: 10 questions, once.
    assert r.field("count")[1:] == ["cuFuncGetParamInfo", "10"]


def test_a_launch_never_evicts_the_ranges_it_uses(tmp_path: Path) -> None:
    """A launch that uses all four resident ranges and spilled 4 cannot make room without
    evicting its own: nothing moves, and the kernel still runs (the spilled range is read
    from host memory).  Of two later launches that leave range 3 out, the first evicts
    nothing (3 was used as recently as 4), the second exactly 3."""
    env = uvm_env(tmp_path)
    r = run(
        env,
        *SETUP,
        *use(0, 1, 2, 3, 4),
        "usage",
        *advise_all(),
        *use(0, 1, 2, 4),
        "usage",
        *advise_all(),
        *use(0, 1, 2, 4),
        "usage",
        *advise_all(),
    )
    assert uses(r) == ["use 0"] * 3
    assert places(r) == ["DDDDHH", "DDDDHH", "DDDHDH"]
    assert counter(r, "used") == [QUOTA, QUOTA, QUOTA]
    assert migrated(r) == (RANGE, RANGE)


def test_a_cycle_larger_than_the_quota_settles_instead_of_thrashing(tmp_path: Path) -> None:
    """Five ranges used in turn, over and over, with room for four (a model's layers at
    every forward pass): least recently used eviction alone would move a range in and one
    out at every launch that finds its range in host memory, since the range it evicts is
    always the next one needed.  Ranges come back only in place of ones unused since their
    own previous use (never used, at a first use), so nothing moves: four stay on the
    device, the fifth is read where it is, and the exit line (BUD_LOG_LEVEL=info) counts the
    promotions declined."""
    env = uvm_env(tmp_path, extra={"BUD_LOG_LEVEL": "info"})
    cycle = [w for i in (0, 1, 2, 3, 4) for w in use(i)]
    r = run(env, *SETUP, *(cycle * 4), "usage", *advise_all())
    assert uses(r) == ["use 0"] * 20
    assert places(r) == ["DDDDHH"]
    assert migrated(r) == (0, 0)
    assert counter(r, "used") == [QUOTA]
    report = [line for line in r.stderr.splitlines() if "spill mode: 20 launches" in line]
    assert len(report) == 1, r.stderr
    assert (
        "(0 without a parameter layout), 0 ranges promoted, 0 evicted, 4 promotions" in (report[0])
    )


def test_prefetch_disabled_leaves_spilled_ranges_in_host_memory(tmp_path: Path) -> None:
    """BUD_PREFETCH_ENABLED=0: with room in the quota a launch still promotes nothing; its
    kernel runs on the spilled range where it is."""
    env = uvm_env(tmp_path, extra={"BUD_PREFETCH_ENABLED": "0"})
    r = run(
        env,
        "init",
        "alloc", "mem", "32M",
        "alloc", "mem", "32M",
        "alloc", "mem", "16M",
        "func", "k_1us",
        "free", "0",
        *use(2, func="3"),
        "usage",
        "advice", "2",
        "count", "cuMemPrefetchAsync_v2",
    )  # fmt: skip
    assert uses(r) == ["use 0"]
    assert places(r, 1) == [IN_HOST]
    assert counter(r, "spill") == [RANGE]
    assert counter(r, "used") == [32 * MiB]
    assert migrated(r) == (0, 0)
    assert r.field("count")[1:] == ["cuMemPrefetchAsync_v2", "0"]


# ---- a lowered quota ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "trigger",
    [("use", "4", "kernel", "0"), ("alloc", "mem", "1M")],
    ids=["launch", "allocation"],
)
def test_a_lowered_quota_is_shrunk_to_at_the_next_launch_or_allocation(
    tmp_path: Path, trigger: tuple[str, ...]
) -> None:
    """The host halves the quota (limits rewritten, generation bumped) while the process
    holds 64 MiB on the device: its next launch or allocation evicts, least recently used
    first (2 and 3, never used), until the tenant's device charge fits the new quota."""
    env = uvm_env(tmp_path)
    proc = start(
        env,
        "init",
        *("alloc", "mem", "16M") * 4,
        "func", "k_1us",
        *use(0, func="4"),
        *use(1, func="4"),
        "wait",
        *trigger,
        "usage",
        *advise_all(4),
    )  # fmt: skip
    try:
        read_until_ready(proc)
        assert usage(env.slot).device[0].mem_used_bytes == QUOTA  # type: ignore[arg-type]
        limits = live.LimitsMap(env.slot / abi.LIMITS_FILE)  # type: ignore[operator]
        try:
            with limits.update() as view:
                view.device[0].mem_limit_bytes = QUOTA // 2
        finally:
            limits.close()
        out, err = proc.communicate("go\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    r = Result(proc.returncode, out.splitlines(), err)
    assert places(r, 4) == ["DDHH"]
    assert counter(r, "used") == [QUOTA // 2]
    assert migrated(r) == (0, QUOTA // 2)


# ---- releasing every charge -----------------------------------------------------------------


def test_freeing_ranges_in_either_state_releases_every_charge(tmp_path: Path) -> None:
    """After a promotion and an eviction, freeing all six ranges (resident, evicted,
    promoted, spilled) returns both the device and the spill charge to 0."""
    env = uvm_env(tmp_path)
    frees = [w for i in range(6) for w in ("free", str(i))]
    r = run(env, *SETUP, *use(4), "usage", *advise_all(), *frees, "usage")
    assert places(r) == ["HDDDDH"]
    assert r.lines.count("free 0") == 6
    assert counter(r, "used") == [QUOTA, 0]
    assert counter(r, "spill") == [2 * RANGE, 0]


def test_exit_releases_every_charge_after_migrations(tmp_path: Path) -> None:
    """A process that exits holding resident, evicted and promoted ranges leaves nothing
    charged: its record held each range's charge on the side it was."""
    env = uvm_env(tmp_path)
    r = run(env, *SETUP, *use(4), *use(5), "usage")
    assert counter(r, "used") == [QUOTA]
    u = usage(env.slot)  # type: ignore[arg-type]
    assert (u.device[0].mem_used_bytes, u.device[0].mem_spilled_bytes) == (0, 0)
    assert u.device[0].mem_migrated_in_bytes == 2 * RANGE


def test_a_sigkilled_process_charges_are_released_after_migrations(tmp_path: Path) -> None:
    """A SIGKILLed process that promoted and evicted ranges is reaped by the next process
    of the tenant, which then finds both counters at 0."""
    env = uvm_env(tmp_path)
    victim = start(env, *SETUP, *use(4), "wait")
    try:
        read_until_ready(victim)
        record = next(p for p in usage(env.slot).proc if p.pid == victim.pid)  # type: ignore[arg-type]
        assert (record.mem_used_bytes[0], record.mem_spilled_bytes[0]) == (QUOTA, 2 * RANGE)
        os.kill(victim.pid, signal.SIGKILL)
        r = run(env, "init", "meminfo", "usage")
        assert counter(r, "used") in ([], [0])
        assert counter(r, "spill") in ([], [0])
        u = usage(env.slot)  # type: ignore[arg-type]
        assert (u.device[0].mem_used_bytes, u.device[0].mem_spilled_bytes) == (0, 0)
    finally:
        victim.communicate(timeout=10)


# ---- launches that move nothing ------------------------------------------------------------

# The quota with 16 MiB of room (range 0 freed) and range 4 spilled: a launch using range 4
# with `kernelParams` would promote it (test_a_launch_promotes_a_spilled_range...).
ROOM = (*SETUP, "free", "0", "usage")


def unmoved(r: Result) -> None:
    """At the second `usage` and the five `advice` lines after it: ranges 1-3 still on the
    device and 4, 5 in host memory, charged as before, nothing migrated."""
    assert places(r, 5)[0] == "DDDHH"
    assert counter(r, "used")[:2] == [3 * RANGE, 3 * RANGE]
    assert counter(r, "spill")[:2] == [2 * RANGE, 2 * RANGE]
    second = [i for i, line in enumerate(r.lines) if line == "usage end"][1]
    assert not [line for line in r.lines[:second] if line.startswith("migrated ")]


def test_an_extra_form_launch_moves_nothing(tmp_path: Path) -> None:
    """A launch whose arguments come in one buffer (`extra`, CU_LAUNCH_PARAM_BUFFER_POINTER;
    kernelParams NULL) that points into spilled range 4, with room in the quota: it
    succeeds, nothing moves nor changes charge, and the driver is not asked for a layout
    nor for a prefetch."""
    env = uvm_env(tmp_path)
    r = run(
        env,
        *ROOM,
        *use(4, kind="extra"),
        "usage",
        *steps("advice 1 advice 2 advice 3 advice 4 advice 5"),
        *steps("count cuFuncGetParamInfo count cuMemPrefetchAsync_v2 count cuMemAdvise_v2"),
    )
    assert uses(r) == ["use 0"]
    unmoved(r)
    counts = [line.split()[1:] for line in r.lines if line.startswith("count ")]
    # cuMemAdvise_v2: the six allocations' two pieces of advice each, nothing since
    assert counts == [["cuFuncGetParamInfo", "0"], ["cuMemPrefetchAsync_v2", "0"],
                      ["cuMemAdvise_v2", "12"]]  # fmt: skip


def test_a_library_kernel_is_read_by_its_kernel_layout(tmp_path: Path) -> None:
    """The CUDA runtime launches its libraries' CUkernel handles as functions; the driver
    gives their layout through cuKernelGetParamInfo only (the sim's l_... names).  A launch
    of one pointing into spilled range 2, with room in the quota, promotes it."""
    env = uvm_env(tmp_path)
    r = run(
        env,
        *steps("init alloc mem 32M alloc mem 32M alloc mem 16M func l_k_1us free 0"),
        *use(2, func="3"),
        *steps("usage advice 2 count cuKernelGetParamInfo"),
    )
    assert uses(r) == ["use 0"]
    assert places(r, 1) == [ON_DEVICE]
    assert migrated(r) == (RANGE, 0)
    assert r.field("count")[1:] == ["cuKernelGetParamInfo", "10"]  # 8 pointers, a count, the end


def test_a_function_without_a_layout_moves_nothing_and_is_asked_about_once(
    tmp_path: Path,
) -> None:
    """A function whose layout the driver does not give (the sim's n_... names): three
    launches pointing into spilled range 4, with room in the quota, all succeed and move
    nothing; the driver was asked for the layout once, not at every launch.  A function
    with a layout then promotes the same range in the same process."""
    env = uvm_env(tmp_path)
    r = run(
        env,
        *SETUP[:-2],
        *steps("func n_k_1us free 0 usage"),
        *use(4) * 3,
        "usage",
        *steps("advice 1 advice 2 advice 3 advice 4 advice 5 count cuFuncGetParamInfo"),
        *steps("count cuMemPrefetchAsync_v2 func k_1us"),
        *use(4, func="7"),
        *steps("usage advice 4"),
    )
    assert uses(r) == ["use 0"] * 4
    assert places(r, 5)[0] == "DDDHH"
    assert counter(r, "used") == [3 * RANGE, 3 * RANGE, QUOTA]
    assert counter(r, "spill") == [2 * RANGE, 2 * RANGE, RANGE]
    assert r.field("count")[1:] == ["cuFuncGetParamInfo", "1"]
    assert [line for line in r.lines if "Prefetch" in line] == ["count cuMemPrefetchAsync_v2 0"]
    assert places(r, 1)[-1] == ON_DEVICE
    assert migrated(r) == (RANGE, 0)


@pytest.mark.parametrize("ptsz", [False, True], ids=["legacy", "per_thread"])
def test_a_launch_into_a_capturing_stream_moves_nothing(tmp_path: Path, ptsz: bool) -> None:
    """While the launch's stream is being captured into a graph, a launch pointing into
    spilled range 4 with room in the quota moves nothing and queues nothing on the stream
    (no event wait joins the graph); once capture ends, the same launch promotes it."""
    env = uvm_env(tmp_path)
    query = "cuStreamIsCapturing_ptsz" if ptsz else "cuStreamIsCapturing"
    r = run(
        env,
        *(("--ptsz",) if ptsz else ()),
        *ROOM,
        *steps("capture 1"),
        *use(4),
        "usage",
        *steps(f"advice 1 advice 2 advice 3 advice 4 advice 5 count {query}"),
        *steps("count cuMemPrefetchAsync_v2 count cuStreamWaitEvent capture 0"),
        *use(4),
        *steps("usage advice 4"),
    )
    assert r.lines.count("capture 0") == 2  # the sim's hook was found, both times
    assert uses(r) == ["use 0", "use 0"]
    unmoved(r)
    counts = [line.split()[1:] for line in r.lines if line.startswith("count ")]
    assert counts == [[query, "1"], ["cuMemPrefetchAsync_v2", "0"], ["cuStreamWaitEvent", "0"]]
    assert places(r, 1)[-1] == ON_DEVICE
    assert counter(r, "used")[-1] == QUOTA
    assert migrated(r) == (RANGE, 0)


# ---- contexts ----------------------------------------------------------------------------------

SIX_AND_FUNC = (*("alloc", "mem", "16M") * 6, "func", "k_1us")


@pytest.mark.parametrize("end", ["destroy", "release"], ids=["cuCtxDestroy", "primary_release"])
def test_a_context_destroyed_after_migrations_releases_everything(tmp_path: Path, end: str) -> None:
    """A context (created, or the primary one) whose ranges were promoted and evicted is
    destroyed (cuCtxDestroy, or the primary context's last release): both charges return
    to 0.  A new context (the sim hands out the same handle again) then allocates, spills,
    and promotes again, on a migration stream of its own: the shim forgot the destroyed
    context's stream (cuStreamCreate a second time) rather than queueing on a dead one."""
    env = uvm_env(tmp_path)
    if end == "destroy":  # ids: context 0, ranges 1-6, function 7; context 8, 9-14, 15
        begin, finish, again, first = ("init", "ctx", "0"), ("destroyctx", "0"), ("ctx", "0"), 1
    else:  # ids: ranges 0-5, function 6; ranges 7-12, function 13
        begin, finish, again, first = ("init",), ("releaseprimary", "0"), ("device", "0"), 0
    func = first + 6
    later = func + 1 + first  # the new context's first range
    r = run(
        env,
        *begin,
        *SIX_AND_FUNC,
        *use(first + 4, func=str(func)),  # promotes 4, evicting 0
        *use(first + 5, func=str(func)),  # promotes 5, evicting 1
        "usage",
        *finish,
        "usage",
        *again,
        *SIX_AND_FUNC,
        "usage",
        *use(later + 4, func=str(later + 6)),
        "usage",
        *(w for i in range(later, later + 6) for w in ("advice", str(i))),
        "count", "cuStreamCreate",
    )  # fmt: skip
    assert uses(r) == ["use 0"] * 3, r.lines
    assert ("free 0" if end == "destroy" else "releaseprimary 0") in r.lines  # drv's words
    # before the end, after it (nothing left), with the new context's six, after its launch
    assert counter(r, "used") == [QUOTA, 0, QUOTA, QUOTA]
    assert counter(r, "spill") == [2 * RANGE, 0, 2 * RANGE, 2 * RANGE]
    assert migrated(r) == (3 * RANGE, 3 * RANGE)
    # the process's own record: nothing on the device either
    records = [line.split()[2] for line in r.lines if line.startswith("proc ")]
    assert records[:2] == [str(QUOTA), "0"]
    assert places(r) == ["HDDDDH"]
    assert r.field("count")[1:] == ["cuStreamCreate", "2"]


def test_a_launch_moves_only_its_own_contexts_ranges(tmp_path: Path) -> None:
    """Two contexts on device 0 share the quota: the primary one holds ranges 0, 1, a
    created one (id 2) ranges 3, 4, and spills 5.  A launch in the created context that
    uses 5 evicts its own 3, never the primary context's 0 or 1.  Back in the primary
    context, 7 spills; a launch there that uses the other context's spilled 3 first, then
    7, promotes only 7, evicting the primary context's 0 (LRU: never used), never 4 or 5:
    the other context's ranges are neither promoted nor evicted.  The charges stay equal to
    what the driver holds on the device and in host memory."""
    env = uvm_env(tmp_path)
    r = run(
        env,
        *steps("init alloc mem 16M alloc mem 16M ctx 0 alloc mem 16M alloc mem 16M"),
        *steps("alloc mem 16M func k_1us"),  # 5 spills; function 6
        *use(5, func="6"),
        "usage",
        *(w for i in (0, 1, 3, 4, 5) for w in ("advice", str(i))),
        *steps("device 0 alloc mem 16M"),  # 7 spills
        *use(3, 7, func="6"),
        "usage",
        *(w for i in (0, 1, 3, 4, 5, 7) for w in ("advice", str(i))),
    )
    assert uses(r) == ["use 0", "use 0"]
    marks = "".join(places(r, 1))
    assert (marks[:5], marks[5:]) == ("DDHDD", "HDHDDD"), r.lines
    assert counter(r, "used") == [QUOTA, QUOTA]
    assert counter(r, "spill") == [RANGE, 2 * RANGE]
    assert migrated(r) == (2 * RANGE, 2 * RANGE)


# ---- the range table full ----------------------------------------------------------------------

UVM_MAX_RANGES = 4096  # shim/uvm.c


def test_past_the_range_table_allocations_keep_a_fixed_charge(tmp_path: Path) -> None:
    """Ranges 0-3 fill the quota, 4 and 4091 small ones (5-4095) spill: the table's 4096
    ranges.  Past it 4096 spills as a fixed charge: a launch that uses it and 4 promotes 4
    (evicting 0) but never 4096.  Once 1 is freed, 8 MiB (4098) are managed again and the
    next 8 MiB (4099) are a fixed charge on the device, which eviction never takes: a
    launch that uses everything resident but 4099 and needs room for small spilled 5 moves
    nothing.  Every charge, fixed or managed, is released when freed."""
    env = uvm_env(tmp_path)
    small = UVM_MAX_RANGES - 5
    r = run(
        env,
        "init",
        *("alloc", "mem", "16M") * 5,
        "allocs", "mem", "4K", str(small),
        "alloc", "mem", "16M",  # 4096: fixed, spilled
        "func", "k_1us",  # 4097
        *use(4, 4096, func="4097"),
        *steps("usage advice 0 advice 4 advice 4096"),
        *steps("free 1 alloc mem 8M alloc mem 8M"),  # 4098 managed, 4099 fixed on the device
        *use(0, 4099, func="4097"),  # promotes 0, evicting 2 (LRU), never 4099
        *use(0, 3, 4, 4098, 5, func="4097"),  # room for 5 only by evicting 4099: none
        *steps("usage advice 0 advice 2 advice 3 advice 4 advice 4096 advice 4098 advice 5"),
        *steps("advice 4099"),
        *steps("free 4096 usage free 4099 usage frees 5"), str(small),
        *steps("usage free 0 free 2 free 3 free 4 free 4098 usage"),
    )  # fmt: skip
    small_bytes = small * 4096
    assert r.field("allocs")[1:] == [str(small), "5"]
    assert uses(r) == ["use 0"] * 3
    assert r.field("frees")[1:] == ["0"]
    assert r.lines.count("free 0") == 8
    marks = "".join(places(r, 1))
    assert (marks[:3], marks[3:]) == ("HDH", "DHDDHDHD"), r.lines
    moves = [a for a in advice(r) if a["resident"] != "0"]
    assert moves[-1]["out"] == "0"  # 4099 never left the device
    spilled = 2 * RANGE + small_bytes  # 0 (or 2) and 4096 and the small ones
    assert counter(r, "used") == [QUOTA, QUOTA, QUOTA, QUOTA - 8 * MiB, QUOTA - 8 * MiB, 0]
    assert counter(r, "spill")[:5] == [spilled, spilled, spilled - RANGE, spilled - RANGE, RANGE]
    assert counter(r, "spill")[5] == 0
    assert migrated(r) == (2 * RANGE, 2 * RANGE)


# ---- threads ------------------------------------------------------------------------------------


def test_two_threads_launching_at_once_keep_the_charges_consistent(tmp_path: Path) -> None:
    """Two threads launch at once, 300 times each, each launch using one of the six ranges
    in turn (four fit the quota): ranges are promoted and evicted under both.  Every launch
    succeeds; the device charge ends within the quota; both charges add up to the six
    ranges; the ranges the driver holds on the device are exactly those charged to the
    quota; and what moved in less what moved out is what the device gained."""
    env = uvm_env(tmp_path)
    r = run(
        env,
        *SETUP,
        *steps("usethreads 2 300 6 0 1 2 3 4 5 usage"),
        *advise_all(),
        *steps("usethreads 2 300 6 5 4 3 2 1 0 usage"),
        *advise_all(),
    )
    assert r.rc == 0, r.stderr
    assert [line for line in r.lines if line.startswith("usethreads ")] == ["usethreads 2 0"] * 2
    used, spilled = counter(r, "used"), counter(r, "spill")
    assert all(u <= QUOTA for u in used), used
    assert [u + s for u, s in zip(used, spilled, strict=True)] == [6 * RANGE] * 2
    assert [p.count(ON_DEVICE) * RANGE for p in places(r)] == used
    moved = [line.split() for line in r.lines if line.startswith("migrated 0 ")]
    assert moved, "nothing moved: the threads did not exercise eviction"
    assert [int(m[3]) - int(m[5]) for m in moved] == [u - QUOTA for u in used]
    procs = [int(line.split()[2]) for line in r.lines if line.startswith("proc ")]
    assert procs == used
