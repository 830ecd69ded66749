"""Admission in the hook (fcsp_hook.hook.admission) over real slot files: strict shares and
hard memory quotas on a GPU add up to at most the GPU, decided under a host-only lock so
that racing containers cannot both take the last guarantee."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcsp_hook import annotations, gpus, inventory, procfs
from fcsp_hook.errors import SlotError
from fcsp_hook.hook import admission
from fcsp_hook.log import HookLogger
from fcsp_hook.slot import abi, files

UUID = "GPU-8d3b1c52-0000-0000-0000-000000000000"
GPU0 = gpus.Gpu(host_index=0, uuid=UUID)
GiB = 1 << 30


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    files.ensure_tenants_dir(tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def log(tmp_path: Path) -> Iterator[HookLogger]:
    yield HookLogger(path=tmp_path / "hook.log")


def _records(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "hook.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _slot(
    run_dir: Path,
    cid: str,
    *devices: files.DeviceLimits,
    mode: abi.IsolationMode = abi.IsolationMode.STRICT,
    mem_mode: abi.MemMode = abi.MemMode.HARD,
    pid: int | None = None,
    start_time: int | None = None,
) -> None:
    """A slot as the hook writes it, for a container whose init process is `pid` (this
    test's process unless said: alive)."""
    pid = os.getpid() if pid is None else pid
    stat = procfs.proc_stat(pid)
    spec = files.SlotSpec(
        container_id=cid,
        isolation_mode=mode,
        mem_mode=mem_mode,
        devices=devices,
        init_host_pid=pid,
        init_start_time=start_time if start_time is not None else (stat[1] if stat else 0),
    )
    files.write_slot(files.slot_path(run_dir, cid), spec, {})


def _dev(sm: int = 100, mem: int = 0, pct: int = 0) -> files.DeviceLimits:
    return files.DeviceLimits(
        host_index=0,
        uuid=UUID,
        sm_requested_centi=sm * 100,
        mem_limit_bytes=mem,
        mem_limit_basis_points=pct * 100,
    )


def _admit(
    run_dir: Path, log: HookLogger, notes: dict[str, str], policy: str = "refuse", cid: str = "new"
) -> None:
    request = annotations.parse(notes, 1)
    with files.slots_locked(run_dir):
        admission.admit(policy, run_dir, cid, request, [GPU0], log=log)


def _inventory(run_dir: Path, total: int) -> None:
    doc = {"gpus": [{"uuid": UUID, "minor": 0, "memory_total_bytes": total}]}
    (run_dir / inventory.FILE).write_text(json.dumps(doc))


def test_strict_shares_past_the_gpu_are_refused_in_one_line(run_dir: Path, log: HookLogger) -> None:
    """Strict 40 % where strict tenants hold 70 %: refused, naming the GPU, what it asked
    and what is promised; 30 % fits exactly.  Balanced shares are no guarantee, and a
    container that is not strict is never refused for its share."""
    _slot(run_dir, "a", _dev(sm=50))
    _slot(run_dir, "b", _dev(sm=20))
    _slot(run_dir, "c", _dev(sm=100), mode=abi.IsolationMode.BALANCED)
    with pytest.raises(admission.AdmissionError) as info:
        _admit(run_dir, log, {"fcsp.sm": "40", "fcsp.mode": "strict"})
    assert str(info.value) == (
        f"admission: GPU 0 ({UUID}) cannot guarantee fcsp.sm=40% (strict): 70% of its SMs "
        "is already promised to 2 containers, 110% > 100%"
    )
    _admit(run_dir, log, {"fcsp.sm": "30", "fcsp.mode": "strict"})
    _admit(run_dir, log, {"fcsp.sm": "90", "fcsp.mode": "balanced"})
    with pytest.raises(admission.AdmissionError, match=r"fcsp.sm=100% \(strict\)"):
        _admit(run_dir, log, {"fcsp.mode": "strict"})  # strict without fcsp.sm: the whole GPU


def test_hard_quotas_add_up_against_the_gpus_memory(run_dir: Path, log: HookLogger) -> None:
    """With the GPU's total known (the observer's inventory), bytes and percentages of
    hard quotas add up against it; soft quotas promise nothing and are never refused."""
    _inventory(run_dir, 80 * GiB)
    _slot(run_dir, "a", _dev(mem=50 * GiB), mode=abi.IsolationMode.BALANCED)
    _slot(run_dir, "b", _dev(pct=25))
    _slot(run_dir, "c", _dev(mem=70 * GiB), mem_mode=abi.MemMode.SOFT)
    with pytest.raises(admission.AdmissionError) as info:
        _admit(run_dir, log, {"fcsp.mem": "16G"})
    assert str(info.value) == (
        f"admission: GPU 0 ({UUID}) cannot guarantee fcsp.mem=16.0 GiB (hard): 70.0 GiB of "
        "its 80.0 GiB is already promised to 2 containers, 86.0 GiB > 80.0 GiB"
    )
    _admit(run_dir, log, {"fcsp.mem": "10G"})
    _admit(run_dir, log, {"fcsp.mem": "16G", "fcsp.mem-mode": "soft"})
    with pytest.raises(admission.AdmissionError, match=r"fcsp.mem=13% \(hard\)"):
        _admit(run_dir, log, {"fcsp.mem": "13%"})


def test_a_spill_quota_is_promised_on_the_gpu_like_a_hard_one(
    run_dir: Path, log: HookLogger
) -> None:
    """Spill mode keeps the tenant's quota on the GPU (only its excess goes to the host), so
    its quota is a guarantee: held and asked alike."""
    _inventory(run_dir, 80 * GiB)
    _slot(run_dir, "a", _dev(mem=60 * GiB), mem_mode=abi.MemMode.SPILL)
    with pytest.raises(admission.AdmissionError, match=r"fcsp.mem=24.0 GiB \(spill\): 60.0 GiB"):
        _admit(run_dir, log, {"fcsp.mem": "24G", "fcsp.mem-mode": "spill"})
    with pytest.raises(admission.AdmissionError, match=r"\(hard\): 60.0 GiB"):
        _admit(run_dir, log, {"fcsp.mem": "24G"})
    _admit(run_dir, log, {"fcsp.mem": "20G", "fcsp.mem-mode": "spill", "fcsp.mem-spill": "4x"})


def test_without_the_total_only_percentages_decide(run_dir: Path, log: HookLogger) -> None:
    """Before the observer has read the GPU's memory, percentages add up among themselves
    (past 100 %, or all of it with bytes on top); bytes alone cannot be decided."""
    _slot(run_dir, "a", _dev(pct=60))
    _slot(run_dir, "b", _dev(mem=8 * GiB))
    with pytest.raises(admission.AdmissionError) as info:
        _admit(run_dir, log, {"fcsp.mem": "50%"})
    assert str(info.value) == (
        f"admission: GPU 0 ({UUID}) cannot guarantee fcsp.mem=50% (hard): 60% + 8.0 GiB of its "
        "memory is already promised to 2 containers, 110% > 100%"
    )
    with pytest.raises(admission.AdmissionError, match=r"100% and more > 100%"):
        _admit(run_dir, log, {"fcsp.mem": "40%"})
    _admit(run_dir, log, {"fcsp.mem": "30%"})
    _admit(run_dir, log, {"fcsp.mem": "1000G"})


def test_gone_and_own_slots_promise_nothing(run_dir: Path, log: HookLogger) -> None:
    """A slot whose container init process is gone, or whose pid now belongs to another
    process (a different start time), holds no guarantee; nor does the asking container's
    own slot (a restart reuses its id); a MIG instance named by index alone is not
    counted against its GPU."""
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    _slot(run_dir, "gone", _dev(sm=90), pid=gone)
    _slot(run_dir, "reused", _dev(sm=90), start_time=1)
    _slot(run_dir, "mine", _dev(sm=90))
    _admit(run_dir, log, {"fcsp.sm": "100", "fcsp.mode": "strict"}, cid="mine")
    assert admission.promised(run_dir) == {UUID: admission.Promised(9000, 1)}
    request = annotations.parse({"fcsp.sm": "50", "fcsp.mode": "strict"}, 1)
    assert admission.asks(request, [gpus.Gpu(host_index=0, mig=1)]) == []


def test_warn_admits_and_says_why_off_checks_nothing(
    run_dir: Path, log: HookLogger, tmp_path: Path
) -> None:
    """policy warn: the container is admitted and the refusal's line is logged as a
    warning; policy off: nothing is checked."""
    _slot(run_dir, "a", _dev(sm=80))
    _admit(run_dir, log, {"fcsp.sm": "40", "fcsp.mode": "strict"}, policy="warn")
    (record,) = [r for r in _records(tmp_path) if r.get("level") == "warning"]
    assert str(record["event"]).startswith(f"admission: GPU 0 ({UUID}) cannot guarantee")
    assert record["admission"] == "warn"
    _admit(run_dir, log, {"fcsp.sm": "40", "fcsp.mode": "strict"}, policy="off")


def test_the_lock_is_the_hosts_and_no_tenant_can_hold_it(run_dir: Path, log: HookLogger) -> None:
    """Admission runs under the slots lock in <run_dir>/locks (0700, never in a slot, which
    is mounted into its container); a tenant holding flock on its slot's files holds
    nothing admission waits on; a host process holding the lock past the timeout gets a
    one-line error instead of a hang."""
    _slot(run_dir, "a", _dev(sm=10))
    slot = files.slot_path(run_dir, "a")
    fds = [os.open(slot / name, os.O_RDONLY) for name in (abi.LIMITS_FILE, abi.USAGE_FILE)]
    try:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_EX)
        _admit(run_dir, log, {"fcsp.sm": "50", "fcsp.mode": "strict"})
    finally:
        for fd in fds:
            os.close(fd)
    lock = run_dir / files.LOCKS_SUBDIR / files.SLOTS_LOCK
    assert lock.is_file()
    assert lock.parent.stat().st_mode & 0o777 == 0o700
    assert not any(p.name == files.SLOTS_LOCK for p in slot.rglob("*"))
    holder = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with (
            pytest.raises(SlotError, match=r"held the slots lock for 0.05 s; try again$"),
            files.slots_locked(run_dir, timeout_s=0.05),
        ):
            pass
    finally:
        os.close(holder)


def _racer(run_dir: Path, cid: str, start: int, report: int, leave: int) -> None:
    """A container start in a process of its own: wait for the start signal, admit a
    strict 60 % and write the slot under the lock, report, and stay alive (its slot's
    init process) until told to leave."""
    os.read(start, 1)
    outcome = b"+"
    try:
        request = annotations.parse({"fcsp.sm": "60", "fcsp.mode": "strict"}, 1)
        log = HookLogger(path=None)
        with files.slots_locked(run_dir):
            admission.admit("refuse", run_dir, cid, request, [GPU0], log=log)
            stat = procfs.proc_stat(os.getpid())
            spec = files.SlotSpec(
                container_id=cid,
                isolation_mode=abi.IsolationMode.STRICT,
                devices=(_dev(sm=60),),
                init_host_pid=os.getpid(),
                init_start_time=stat[1] if stat else 0,
            )
            files.write_slot(files.slot_path(run_dir, cid), spec, {})
    except admission.AdmissionError:
        outcome = b"-"
    os.write(report, outcome)
    os.read(leave, 1)


def test_racing_containers_cannot_both_take_the_last_guarantee(run_dir: Path) -> None:
    """Eight container starts in eight processes, released at once, each asking strict
    60 % of the same empty GPU: exactly one is admitted and has a slot; the others are
    refused."""
    start_r, start_w = os.pipe()
    report_r, report_w = os.pipe()
    leave_r, leave_w = os.pipe()
    children = []
    for i in range(8):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                _racer(run_dir, f"racer{i}", start_r, report_w, leave_r)
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    try:
        os.write(start_w, b"x" * len(children))
        outcomes = b""
        while len(outcomes) < len(children):
            outcomes += os.read(report_r, len(children))
        assert sorted(outcomes) == sorted(b"+" + b"-" * (len(children) - 1))
        slots = [p for p in files.tenants_dir(run_dir).iterdir() if p.name.startswith("racer")]
        assert len(slots) == 1
    finally:
        os.write(leave_w, b"x" * len(children))
        for pid in children:
            os.waitpid(pid, 0)
        for fd in (start_r, start_w, report_r, report_w, leave_r, leave_w):
            os.close(fd)
