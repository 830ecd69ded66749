"""Slots created and removed on the host (fcsp_hook.slot.files): the usage file on a
filesystem of its own, and removal that survives whatever is in a slot."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fcsp_hook import procfs
from fcsp_hook.errors import SlotError, SlotVersionError
from fcsp_hook.slot import abi, files, live, rules, uvm

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
USAGE_SIZE = ctypes.sizeof(abi.Usage)
PAGE = os.sysconf("SC_PAGE_SIZE")
USAGE_PAGES_BYTES = -(-USAGE_SIZE // PAGE) * PAGE


def _slot(run_dir: Path, cid: str = "c1", *, mps: bool = False, bounded: bool = False) -> Path:
    files.ensure_tenants_dir(run_dir)
    directory = files.slot_path(run_dir, cid)
    spec = files.SlotSpec(container_id=cid, devices=(files.DeviceLimits(host_index=0),))
    extra = {"ld.so.preload": (b"", 0o644)}
    files.write_slot(directory, spec, extra, with_mps_dir=mps, bounded_usage=bounded)
    return directory


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def test_an_mps_slot_is_removed(tmp_path: Path) -> None:
    """The mps/ directory an MPS tenant's slot holds (the mount point of the daemon's
    client socket inside the container) no longer makes removal fail."""
    directory = _slot(tmp_path, mps=True)
    assert (directory / abi.MPS_DIR).is_dir()
    assert files.remove_slot(tmp_path, "c1")
    assert not directory.exists()


def test_removal_never_follows_a_link_and_never_raises(tmp_path: Path) -> None:
    """Whatever is in a slot (a link out of it where mps/ was, a link to a host file,
    nested directories, a FIFO), removal deletes the slot and never what a link names."""
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "file").write_text("host data\n")
    directory = _slot(tmp_path / "run")
    (directory / abi.MPS_DIR).symlink_to(outside / "keep")
    (directory / "link-to-file").symlink_to(outside / "keep" / "file")
    deep = directory / "a" / "b" / "c" / "d" / "e"
    deep.mkdir(parents=True)
    (deep / "x").write_text("x")
    (deep / "up").symlink_to(outside)
    os.mkfifo(directory / "fifo")
    assert files.remove_slot(tmp_path / "run", "c1")
    assert not os.path.lexists(directory)
    assert (outside / "keep" / "file").read_text() == "host data\n"


def test_removal_of_a_tree_too_deep_to_walk_says_false(tmp_path: Path) -> None:
    """Nothing FCSP makes is that deep: such a slot is left (False), and nothing raises."""
    directory = _slot(tmp_path)
    deep = directory.joinpath(*["d"] * 40)
    deep.mkdir(parents=True)
    assert files.remove_slot(tmp_path, "c1") is False
    assert directory.is_dir()


@pytest.mark.parametrize("cid", ["../escape", "c1\n", "", "."])
def test_removal_of_an_invalid_id_is_false_not_an_error(tmp_path: Path, cid: str) -> None:
    assert files.remove_slot(tmp_path, cid) is False


@needs_root
def test_the_usage_file_is_on_a_filesystem_of_its_own(tmp_path: Path) -> None:
    """bound_usage: <slot>/usage is a file of its own tmpfs, as big as the usage record's
    pages: writes past them fail with ENOSPC, a growing truncate allocates nothing, and the
    host reads it by the same path as before.  Removal detaches it."""
    directory = _slot(tmp_path)
    usage = directory / abi.USAGE_FILE
    files.bound_usage(directory)
    try:
        assert usage.stat().st_dev != directory.stat().st_dev
        assert usage.stat().st_size == USAGE_SIZE
        assert files.read_usage(usage).magic == abi.USAGE_MAGIC
        fd = os.open(usage, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as err:
                for offset in range(0, 32 << 20, 1 << 20):
                    os.pwrite(fd, b"\0" * (1 << 20), offset)
            assert err.value.errno == errno.ENOSPC
            os.ftruncate(fd, 32 << 20)
        finally:
            os.close(fd)
        assert usage.stat().st_blocks * 512 <= USAGE_PAGES_BYTES
        reader = live.UsageReader(usage)  # the observer's way in, unchanged
        reader.close()
    finally:
        assert files.remove_slot(tmp_path, "c1")
    assert not directory.exists()
    assert _mounts_under(tmp_path) == []


@needs_root
def test_a_slot_rewritten_over_a_leftover_mount_is_fresh(tmp_path: Path) -> None:
    """A container restarted after a start whose poststop never ran: the slot is written
    again over the old bounded usage file, gets a fresh one, and removal leaves nothing."""
    directory = _slot(tmp_path, bounded=True)
    (directory / abi.USAGE_FILE).write_bytes(b"\xff" * 64)
    try:
        directory = _slot(tmp_path, bounded=True)
        assert _mounts_under(directory) == [str(directory / abi.USAGE_FILE)]
        assert files.read_usage(directory / abi.USAGE_FILE).magic == abi.USAGE_MAGIC
    finally:
        assert files.remove_slot(tmp_path, "c1")
    assert _mounts_under(tmp_path) == []


REPO = Path(__file__).resolve().parent.parent
REMOVE_AS_OBSERVER = """
import sys
from pathlib import Path
from fcsp_hook import linux
from fcsp_hook.slot import files
assert not linux.may_mount()
print(files.remove_slot(Path(sys.argv[1]), sys.argv[2]))
"""


@needs_root
def test_a_remover_that_may_not_unmount_buries_the_slot_for_the_hook_to_sweep(
    tmp_path: Path,
) -> None:
    """The observer runs without CAP_SYS_ADMIN and under a seccomp filter that kills it for
    a umount2: its reaper makes no mount call, moves a slot still holding the bounded usage
    mount out of the tenants directory (so it is reaped all the same), and the next removal
    by a process that may unmount (the hook's poststop) detaches and deletes it."""
    directory = _slot(tmp_path, "dead", bounded=True)
    argv = [sys.executable, "-c", REMOVE_AS_OBSERVER, str(tmp_path), "dead"]
    reaper = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert reaper.returncode == 0, reaper.stderr
    assert reaper.stdout.strip() == "True"
    assert not os.path.lexists(directory)
    (buried,) = (tmp_path / files.GRAVEYARD_SUBDIR).iterdir()
    assert buried.name.startswith("dead.")
    assert _mounts_under(tmp_path) == [str(buried / abi.USAGE_FILE)]
    assert files.remove_slot(tmp_path, "another") is False  # a poststop, of another slot
    assert list((tmp_path / files.GRAVEYARD_SUBDIR).iterdir()) == []
    assert _mounts_under(tmp_path) == []


READ_USAGE = """
import sys
from pathlib import Path
from fcsp_hook.errors import SlotError
from fcsp_hook.slot import live
print("ready", flush=True)  # this process's mount namespace exists: the slot comes next
sys.stdin.readline()
reader = live.UsageReader(Path(sys.argv[1]))
try:
    reader.devices(1)
except SlotError as exc:
    print(exc)
"""


@needs_root
def test_a_reader_that_cannot_see_the_mount_is_told_so(tmp_path: Path) -> None:
    """A process whose mount namespace does not receive the host's later mounts (an
    observer in a private one) finds the empty file beneath the bounded usage file and is
    told why, rather than reading a record that never moves."""
    files.ensure_tenants_dir(tmp_path)
    directory = files.slot_path(tmp_path, "c1")
    argv = [sys.executable, "-c", READ_USAGE, str(directory / abi.USAGE_FILE)]
    reader = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", *argv],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline() == "ready\n"
        spec = files.SlotSpec(container_id="c1", devices=(files.DeviceLimits(host_index=0),))
        files.write_slot(directory, spec, {}, bounded_usage=True)
        out, _ = reader.communicate("go\n", timeout=30)
    finally:
        reader.kill()
        files.remove_slot(tmp_path, "c1")
    assert "does not receive from the host" in out


def _slot_of(run_dir: Path, cid: str, pid: int, start_time: int) -> Path:
    files.ensure_tenants_dir(run_dir)
    directory = files.slot_path(run_dir, cid)
    spec = files.SlotSpec(container_id=cid, init_host_pid=pid, init_start_time=start_time)
    files.write_slot(directory, spec, {})
    return directory


def test_a_slot_is_removed_only_once_its_container_is_gone(tmp_path: Path) -> None:
    """remove_if_gone (poststop, the observer's reaper): a slot whose recorded init runs is
    a later run of the id (a restart) and is kept; one whose init is gone, or that names
    none, is removed; no slot is absent; the slots lock held elsewhere is a failure to
    retry, not a wait without end."""
    own = procfs.proc_stat(os.getpid())
    assert own is not None
    running = _slot_of(tmp_path, "restarted", os.getpid(), own[1])
    assert files.remove_if_gone(tmp_path, "restarted") is files.Removal.RUNNING
    assert running.is_dir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    _slot_of(tmp_path, "gone", gone.pid, 0)
    assert files.remove_if_gone(tmp_path, "gone") is files.Removal.REMOVED
    _slot_of(tmp_path, "unnamed", 0, 0)
    assert files.remove_if_gone(tmp_path, "unnamed") is files.Removal.REMOVED
    assert files.remove_if_gone(tmp_path, "never") is files.Removal.ABSENT
    _slot_of(tmp_path, "busy", gone.pid, 0)
    holder = os.open(tmp_path / files.LOCKS_SUBDIR / files.SLOTS_LOCK, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert files.remove_if_gone(tmp_path, "busy", timeout_s=0.05) is files.Removal.FAILED
    finally:
        os.close(holder)
    assert files.remove_if_gone(tmp_path, "busy") is files.Removal.REMOVED
    assert [p.name for p in files.tenants_dir(tmp_path).iterdir()] == ["restarted"]


def test_a_spill_slot_carries_its_bound_and_its_profiles_knobs(tmp_path: Path) -> None:
    """What the hook writes for fcsp.mem-mode=spill, fcsp.mem-spill=1.5x and the training
    profile is what the shim and the observer read back."""
    spec = files.SlotSpec(
        container_id="spill",
        mem_mode=abi.MemMode.SPILL,
        devices=(files.DeviceLimits(mem_limit_bytes=8 << 30, mem_spill_centi=15_000),),
        uvm=uvm.PROFILES["training"],
    )
    files.write_slot(tmp_path / "spill", spec, {})
    limits = files.read_limits(tmp_path / "spill" / abi.LIMITS_FILE)
    assert limits.mem_mode == abi.MemMode.SPILL
    assert (limits.device[0].mem_spill_bytes, limits.device[0].mem_spill_centi) == (0, 15_000)
    device = limits.device[0]
    assert rules.memory_spill(device.mem_spill_bytes, device.mem_spill_centi, 8 << 30) == 12 << 30
    assert limits.uvm_profile == abi.UvmProfile.TRAINING
    assert rules.unpack_pressure(limits.pressure_pct) == (80, 90, 97)
    assert limits.prefetch_bytes == 32 << 20
    assert limits.evict_policy == abi.EvictPolicy.FIFO


@pytest.mark.parametrize(("version", "readable"), [(1, True), (2, True), (3, False), (0, False)])
def test_the_init_record_is_read_from_this_and_earlier_slot_versions(
    tmp_path: Path, version: int, readable: bool
) -> None:
    """The reaper's proof (init pid and start time) comes from any limits file up to this
    version, whose layout has not moved since version 1; later or foreign files prove
    nothing, and the full reader names the version it found."""
    files.write_slot(tmp_path / "s", files.SlotSpec("s", init_host_pid=42, init_start_time=7), {})
    path = tmp_path / "s" / abi.LIMITS_FILE
    limits = files.read_limits(path)
    limits.version = version
    path.write_bytes(bytes(limits))
    if readable:
        assert files.read_init_process(path) == (42, 7)
    else:
        with pytest.raises(SlotError, match="not an FCSP limits file"):
            files.read_init_process(path)
    if version != abi.SLOT_VERSION:
        with pytest.raises(SlotVersionError, match=f"slot version {version}, not 2") as err:
            files.read_limits(path)
        assert err.value.version == version
