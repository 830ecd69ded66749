"""observer.reaper: slots of containers that are gone are removed (the container's init
process, as the hook recorded it, is the authority); dead per-process records are reported,
not released; each container's processes are found by pid namespace."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import time
from collections.abc import Iterator

import pytest

from fcsp_hook import procfs
from fcsp_hook.observer import reaper
from fcsp_hook.observer.reaper import Reaper
from fcsp_hook.observer.tenants import Tenants
from fcsp_hook.slot import abi, files
from tests.observer.scene import Scene


@pytest.fixture
def init() -> Iterator[subprocess.Popen[bytes]]:
    """A process playing a container's init."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


def _start_time(pid: int) -> int:
    stat = procfs.proc_stat(pid)
    assert stat is not None
    return stat[1]


def test_a_gone_container_loses_its_slot(scene: Scene, init: subprocess.Popen[bytes]) -> None:
    """Its init exited: the tenant is dropped and its slot removed; the others stay."""
    scene.add("gone", init_pid=init.pid, init_start_time=_start_time(init.pid))
    scene.add("here", init_pid=os.getpid(), init_start_time=_start_time(os.getpid()))
    scene.run(Tenants(), Reaper())
    assert sorted(scene.state.tenants) == ["gone", "here"]
    init.kill()
    init.wait()
    scene.run(Reaper())
    assert sorted(scene.state.tenants) == ["here"]
    assert not files.slot_path(scene.run_dir, "gone").exists()
    assert files.slot_path(scene.run_dir, "here").exists()


@pytest.mark.parametrize(
    ("start_time_delta", "kept"),
    [(0, True), (1, False)],  # a pid that runs something else now: the container is gone
)
def test_a_reused_pid_is_not_the_container(
    scene: Scene, init: subprocess.Popen[bytes], start_time_delta: int, kept: bool
) -> None:
    scene.add("c", init_pid=init.pid, init_start_time=_start_time(init.pid) + start_time_delta)
    scene.run(Tenants(), Reaper())
    assert ("c" in scene.state.tenants) is kept
    assert files.slot_path(scene.run_dir, "c").exists() is kept


def test_a_slot_without_an_init_record_is_never_reaped(scene: Scene) -> None:
    """No record: a dead container cannot be told from an idle one; the slot stays."""
    scene.add("unknown")
    scene.run(Tenants(), Reaper(), ticks=3)
    assert "unknown" in scene.state.tenants
    assert scene.tenant("unknown").dead_processes == []


def test_dead_process_records_are_reported_not_released(scene: Scene) -> None:
    """Records of pids not in the container's namespace are reported with their memory;
    the record itself is the shim's to release (it stays LIVE in the file)."""
    me = os.getpid()  # this test's pid namespace plays the container's
    usage = scene.add("c", init_pid=me, init_start_time=_start_time(me))
    dead = max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 10_000
    usage.process(0, me, (1 << 20,))
    usage.process(1, dead, (1 << 30,))
    scene.run(Tenants(), Reaper())
    tenant = scene.tenant("c")
    assert tenant.dead_processes == [dead] and tenant.dead_bytes == 1 << 30
    assert scene.state.members[me] == ("c", me)
    assert [r.pid for r in tenant.usage.live_processes()] == [me, dead]


def test_processes_map_to_their_tenant_by_pid_namespace() -> None:
    """A host process in a tenant's pid namespace belongs to that tenant, with its pid inside
    the namespace; a namespace two tenants share (e.g. both run with --pid=host) is
    ambiguous and attributes nothing, instead of giving every process to one of them."""
    own = os.getpid()
    members = reaper.namespace_members({"solo": own})
    assert members[own] == ("solo", own)  # this test runs in the host's pid namespace
    assert reaper.namespace_members({"a": own, "b": own}) == {}


def test_a_proc_that_cannot_be_read_proves_nothing(
    scene: Scene, init: subprocess.Popen[bytes]
) -> None:
    """Out of descriptors, /proc cannot be read: the container is not taken for gone and
    its slot stays (a gone one is reaped once /proc can be read again)."""
    scene.add("c", init_pid=init.pid, init_start_time=_start_time(init.pid))
    scene.run(Tenants())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        assert procfs.process_alive(init.pid, 0) is True
        scene.run(Reaper())
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "c" in scene.state.tenants and files.slot_path(scene.run_dir, "c").exists()


def test_a_tenants_processes_are_those_of_its_cgroup(scene: Scene) -> None:
    """Every process of the recorded cgroup, one in a pid namespace of its own included,
    with the pid it sees itself as; a process outside is nobody's, whatever its records."""
    from fcsp_hook import cgroups  # noqa: PLC0415
    from tests.cgroup import fresh_cgroup, spawn  # noqa: PLC0415

    with fresh_cgroup() as group:
        plain = spawn(group, ["sleep", "600"])
        nested = spawn(group, ["unshare", "--pid", "--fork", "sleep", "600"])
        outside = subprocess.Popen(["sleep", "600"])
        try:
            deadline = time.monotonic() + 20
            while len(group.processes()) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)  # until unshare has forked its child
            usage = scene.add("c", init_pid=plain.pid, init_start_time=_start_time(plain.pid))
            (files.slot_path(scene.run_dir, "c") / cgroups.CGROUP_FILE).write_text(group.to_text())
            usage.process(0, outside.pid)  # a record naming a process that is not its own
            scene.run(Tenants(), Reaper())
            members = scene.state.members
            assert members[plain.pid] == ("c", plain.pid)
            assert members[nested.pid][0] == "c"
            inner = [pid for pid, (cid, ns) in members.items() if cid == "c" and ns == 1]
            assert inner, members  # the process unshare forked is pid 1 of its namespace
            assert outside.pid not in members
        finally:
            for proc in (plain, nested, outside):
                proc.kill()
                proc.wait()


def _as_version_1(scene: Scene, cid: str) -> None:
    """Rewrite the slot as an earlier install's hook wrote it: the same limits layout,
    version 1 (every later word was reserved, 0); its usage file of the older size."""
    directory = files.slot_path(scene.run_dir, cid)
    limits = files.read_limits(directory / abi.LIMITS_FILE)
    limits.version = 1
    (directory / abi.LIMITS_FILE).write_bytes(bytes(limits))
    with open(directory / abi.USAGE_FILE, "r+b") as usage:
        usage.truncate(12880)


def test_an_earlier_installs_slot_is_said_and_reaped_once_gone(
    scene: Scene, init: subprocess.Popen[bytes]
) -> None:
    """A slot of slot version 1 (its container started before an upgrade) is not watched,
    says so once, and is removed like any other once its container's init is gone."""
    scene.add("old", init_pid=init.pid, init_start_time=_start_time(init.pid))
    _as_version_1(scene, "old")
    scene.run(Tenants(), Reaper(), ticks=3)
    assert "old" not in scene.state.tenants
    (line,) = scene.events("tenant not watched")
    assert line["container_id"] == "old"
    assert "slot version 1, not 2 (an earlier FCSP)" in line["error"]
    assert files.slot_path(scene.run_dir, "old").exists()  # its container runs
    init.kill()
    init.wait()
    scene.run(Tenants(), Reaper())
    assert not files.slot_path(scene.run_dir, "old").exists()
    assert scene.events("unwatched slot's container gone")[0]["slot"] == "removed"


def test_an_unwatched_slot_without_proof_stays(scene: Scene) -> None:
    """An unwatched slot whose limits name no init process is never removed."""
    scene.add("old")
    _as_version_1(scene, "old")
    scene.run(Tenants(), Reaper(), ticks=3)
    assert files.slot_path(scene.run_dir, "old").exists()
