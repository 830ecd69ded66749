"""Many processes, one tenant: the atomic reservation across processes, release of a killed
process's charge, and forked children with their own records."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.shim.harness import (
    Env,
    GiB,
    MiB,
    live_records,
    make_slot,
    read_until_ready,
    run,
    start,
    usage,
)

ROUNDS = 5
RACERS = 8
CHUNK = 300 * MiB  # 8 x 2 x 300 MiB asked, 1 GiB granted: exactly 3 chunks fit


def _finish(procs: list[subprocess.Popen[str]]) -> list[list[str]]:
    outs = []
    for p in procs:
        out, _ = p.communicate("go\n", timeout=30)
        outs.append(out.splitlines())
    return outs


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_racing_processes_never_exceed_the_quota(tmp_path: Path, round_: int) -> None:
    """Processes released together race for the last bytes of a 1 GiB quota: exactly as many
    chunks as fit are granted, never one more, and the tenant's charge equals their sum."""
    env = Env(state=tmp_path / "sim-state", slot=make_slot(tmp_path / "slot", [GiB]))
    args = ["init", "wait", "alloc", "mem", str(CHUNK), "alloc", "mem", str(CHUNK), "wait"]
    procs = [start(env, *args) for _ in range(RACERS)]
    try:
        for p in procs:
            read_until_ready(p)
        for p in procs:  # release them as close together as we can
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        granted = 0
        for p in procs:
            assert p.stdout is not None
            for raw in p.stdout:
                if raw.strip() == "ready":
                    break
                granted += raw.startswith("ok ")
        assert granted == GiB // CHUNK
        assert usage(env.slot).device[0].mem_used_bytes == granted * CHUNK  # type: ignore[arg-type]
        assert sum(c[0] for c in live_records(env.slot).values()) == granted * CHUNK  # type: ignore[arg-type]
    finally:
        _finish(procs)
    assert usage(env.slot).device[0].mem_used_bytes == 0  # type: ignore[arg-type]


def test_sigkilled_process_charge_is_released_by_the_next_allocation(tmp_path: Path) -> None:
    """A process killed with SIGKILL cannot release its charge; the next allocation that
    would fail finds it dead, releases it, and succeeds."""
    env = Env(state=tmp_path / "sim-state", slot=make_slot(tmp_path / "slot", [GiB]))
    victim = start(env, "init", "alloc", "mem", "600M", "wait")
    read_until_ready(victim)
    assert victim.pid in live_records(env.slot)  # type: ignore[arg-type]
    os.kill(victim.pid, signal.SIGKILL)
    # Not waited for yet: a zombie, whose GPU memory the driver has already freed.
    try:
        r = run(env, "init", "alloc", "mem", "600M", "usage")
        assert r.outcomes() == ["ok 0"]
        assert r.field("used")[2] == str(600 * MiB)
        assert str(victim.pid) not in [
            line.split()[1] for line in r.lines if line.startswith("proc ")
        ]
    finally:
        victim.communicate(timeout=10)


def test_sigkilled_process_charge_is_released_for_mem_get_info(tmp_path: Path) -> None:
    """cuMemGetInfo does not report memory a dead process no longer holds."""
    env = Env(state=tmp_path / "sim-state", slot=make_slot(tmp_path / "slot", [GiB]))
    victim = start(env, "init", "alloc", "mem", "600M", "wait")
    read_until_ready(victim)
    victim.kill()
    victim.wait(timeout=10)
    r = run(env, "init", "meminfo")
    assert r.field("meminfo")[1:3] == [str(GiB), str(GiB)]
    assert live_records(env.slot) == {}  # type: ignore[arg-type]


def test_forked_child_registers_as_its_own_process(tmp_path: Path) -> None:
    """After fork the child charges its own record; the parent's record keeps the parent's."""
    env = Env(state=tmp_path / "sim-state", slot=make_slot(tmp_path / "slot", [GiB]))
    r = run(env, "init", "alloc", "mem", "100M", "fork", "alloc", "mem", "50M", "usage")
    child = int(r.field("forked")[1])
    assert int(r.field("child")[1]) == child
    procs = {
        int(line.split()[1]): int(line.split()[2]) for line in r.lines if line.startswith("proc ")
    }
    assert procs[child] == 50 * MiB
    parents = [pid for pid in procs if pid != child]
    assert len(parents) == 1 and procs[parents[0]] == 100 * MiB
    assert r.field("used")[2] == str(150 * MiB)
    assert usage(env.slot).device[0].mem_used_bytes == 0  # type: ignore[arg-type]


def test_exec_replaces_the_record_of_the_old_image(tmp_path: Path) -> None:
    """A process that execs keeps its pid but the driver frees its memory; when the new image
    registers, the old image's record and charge are reclaimed."""
    env = Env(state=tmp_path / "sim-state", slot=make_slot(tmp_path / "slot", [GiB]))
    r = run(env, "init", "alloc", "mem", "100M", "exec", "init", "alloc", "mem", "50M", "usage")
    assert r.outcomes() == ["ok 0", "ok 0"]
    procs = [line.split()[1:] for line in r.lines if line.startswith("proc ")]
    assert len(procs) == 1 and procs[0][1] == str(50 * MiB)
    assert r.field("used")[2] == str(50 * MiB)
