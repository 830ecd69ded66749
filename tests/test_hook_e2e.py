"""The container path end to end: podman + runc run the real hook from hooks.d, which
gives a glibc process in the container libvgpu.so, its slot and a merged ld.so.preload."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from fcsp_hook import procfs
from fcsp_hook.slot import abi, files, rules
from tests.containers import GLIBC_IN_ROOTFS, ULIMITS, HookSetup, add_cuda_sim, podman

pytestmark = pytest.mark.e2e

GPU = {"NVIDIA_VISIBLE_DEVICES": "0"}
LIB = "/run/fcsp/libvgpu.so"
CAT = str(GLIBC_IN_ROOTFS)


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=120, check=False
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_fcsp_traces(hook: HookSetup, rootfs: Path) -> None:
    assert hook.slots() == []
    assert not (rootfs / "run" / "fcsp").exists()
    assert not (rootfs / "etc" / "ld.so.preload").exists()


def test_cuda_process_maps_shim_and_slot_and_rm_removes_slot(hook: HookSetup, rootfs: Path) -> None:
    """A CUDA process in the container (a driver-API client over the simulated driver) has
    libvgpu.so and both slot files mapped, has claimed a process record in the host's slot
    and charged its allocation there, and the slot is gone once the container is removed."""
    add_cuda_sim(rootfs)
    name = f"fcsp-e2e-{uuid.uuid4().hex[:8]}"
    started = podman(
        hook,
        rootfs,
        ["/usr/bin/fcsp-sim-client", "init", "alloc", "mem", "64M", "wait"],
        {"fcsp.sm": "40", "fcsp.mem": "8G", "fcsp.tenant": "team-a"},
        GPU,
        extra=("-d", "-i", "--name", name),
    )
    assert started.returncode == 0, started.stderr
    try:
        maps = _podman("exec", name, CAT, "/proc/1/maps")
        assert maps.returncode == 0, maps.stderr
        for mapped in (LIB, "/run/fcsp/limits", "/run/fcsp/usage"):
            assert mapped in maps.stdout
        preload = _podman("exec", name, CAT, "/etc/ld.so.preload")
        assert preload.stdout == f"{LIB}\n"

        container_id = _podman("inspect", "--format", "{{.Id}}", name).stdout.strip()
        slot_dir = hook.run_dir / "tenants" / container_id
        assert hook.slots() == [slot_dir]
        limits = files.read_limits(slot_dir / "limits")
        assert limits.container_id.decode() == container_id
        assert limits.tenant == b"team-a"
        assert limits.device_count == 1
        assert limits.device[0].host_index == 0
        assert limits.device[0].sm_requested_centi == 4000
        assert limits.device[0].mem_limit_bytes == 8 << 30
        host_pid = int(_podman("inspect", "--format", "{{.State.Pid}}", name).stdout)
        assert limits.init_host_pid == host_pid
        assert limits.init_start_time == procfs.proc_stat(host_pid)[1]  # type: ignore[index]

        def record_of_pid_1() -> abi.UsageProc | None:
            usage = files.read_usage(slot_dir / "usage")
            live = [p for p in usage.proc if p.state == abi.ProcState.LIVE and p.pid == 1]
            return live[0] if live and live[0].mem_used_bytes[0] == 64 << 20 else None

        deadline = time.monotonic() + 30
        while record_of_pid_1() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert record_of_pid_1() is not None
        assert files.read_usage(slot_dir / "usage").device[0].mem_used_bytes == 64 << 20
        # A program that never touches CUDA (cat) loads the shim but claims no record.
        assert _podman("exec", name, CAT, "/etc/hostname").returncode == 0
        assert len([p for p in files.read_usage(slot_dir / "usage").proc if p.state]) == 1
    finally:
        removed = _podman("rm", "-f", "-t", "0", name)
    assert removed.returncode == 0, removed.stderr
    assert hook.slots() == []


def test_slot_names_gpus_by_uuid_from_the_driver(
    tmp_path: Path, rootfs: Path, hook_python: Path
) -> None:
    """NVIDIA_VISIBLE_DEVICES=2,0 with the driver's procfs files: slot entries in the order
    CUDA numbers the GPUs (0, then 2: fcsp.sm.0 is CUDA device 0) and each carries its
    UUID, so the shim maps CUDA ordinals by UUID."""
    driver = tmp_path / "driver"
    for minor, gpu_uuid in (
        (0, "GPU-00000000-0000-0000-0000-000000000000"),
        (2, "GPU-22222222-2222-2222-2222-222222222222"),
    ):
        info = driver / "gpus" / f"0000:{minor:02x}:00.0" / "information"
        info.parent.mkdir(parents=True)
        info.write_text(f"GPU UUID: \t {gpu_uuid}\nDevice Minor: \t {minor}\n")
    hook = HookSetup.create(tmp_path / "fcsp", hook_python, paths=f'driver_dir = "{driver}"\n')
    name = f"fcsp-e2e-{uuid.uuid4().hex[:8]}"
    started = podman(
        hook,
        rootfs,
        [CAT],
        {"fcsp.sm.0": "30", "fcsp.sm.1": "70"},
        {"NVIDIA_VISIBLE_DEVICES": "2,0"},
        extra=("-d", "-i", "--name", name),
    )
    assert started.returncode == 0, started.stderr
    try:
        (slot_dir,) = hook.slots()
        limits = files.read_limits(slot_dir / "limits")
        entries = [limits.device[i] for i in range(limits.device_count)]
        assert [e.host_index for e in entries] == [0, 2]
        assert [e.uuid for e in entries] == [
            b"GPU-00000000-0000-0000-0000-000000000000",
            b"GPU-22222222-2222-2222-2222-222222222222",
        ]
        assert all(e.flags & abi.DEV_SELECTED_BY_UUID for e in entries)
        assert [e.sm_requested_centi for e in entries] == [3000, 7000]
    finally:
        _podman("rm", "-f", "-t", "0", name)


def test_limits_are_read_only_inside_the_container(hook: HookSetup, rootfs: Path) -> None:
    """Even root in the container cannot write its limits: the slot is mounted read-only,
    while the usage file the shim reports into stays writable."""
    script = (
        "echo x > /run/fcsp/limits && echo limits-writable; "
        "test -w /run/fcsp/usage && echo usage-writable; "
        "grep ' /run/fcsp ' /proc/self/mountinfo"
    )
    result = podman(hook, rootfs, ["/bin/sh", "-c", script], {"fcsp.sm": "40"}, GPU)
    assert result.returncode == 0, result.stderr
    assert "limits-writable" not in result.stdout
    assert "usage-writable" in result.stdout
    assert " ro," in result.stdout


def test_image_preload_entries_are_merged_after_the_shim(hook: HookSetup, rootfs: Path) -> None:
    """The image's own /etc/ld.so.preload entries survive, after libvgpu.so, and the image's
    file itself is left as it was."""
    own = rootfs / "etc" / "ld.so.preload"
    own.write_text("/lib/x86_64-linux-gnu/libc.so.6\n")
    result = podman(hook, rootfs, [CAT, "/etc/ld.so.preload"], {"fcsp.sm": "40"}, GPU)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{LIB}\n/lib/x86_64-linux-gnu/libc.so.6\n"
    assert own.read_text() == "/lib/x86_64-linux-gnu/libc.so.6\n"


def test_an_image_without_libdl_and_libpthread_runs_with_the_shim(
    hook: HookSetup, rootfs: Path
) -> None:
    """An image with glibc's libc.so.6 (2.34 or later) but neither libdl.so.2 nor
    libpthread.so.0, as hand-assembled images are: its glibc programs start, with
    libvgpu.so mapped, and a CUDA process in it is the shim's (its allocation is charged
    in the slot).  ld.so.preload names the shim alone: such a glibc keeps everything the
    shim needs in libc.so.6."""
    add_cuda_sim(rootfs)
    for name in ("libdl.so.2", "libpthread.so.0"):
        for found in rootfs.rglob(name):
            found.unlink()
    script = (
        f"{CAT} /proc/self/maps; echo ===; {CAT} /etc/ld.so.preload; echo ===;"
        " fcsp-sim-client init alloc mem 64M usage"
    )
    result = podman(
        hook, rootfs, ["/bin/sh", "-c", script], {"fcsp.sm": "40", "fcsp.mem": "1G"}, GPU
    )
    assert result.returncode == 0, result.stderr
    maps, preload, client = result.stdout.split("===\n")
    assert LIB in maps, result.stderr
    assert preload == f"{LIB}\n"
    assert "init 0" in client and "ok 0" in client, (client, result.stderr)
    assert f"used 0 {64 << 20} " in client, client


def test_static_binaries_do_not_load_the_shim(hook: HookSetup, rootfs: Path) -> None:
    """The documented limitation holds: a static binary (busybox) ignores ld.so.preload,
    while a glibc program in the same container loads the shim."""
    result = podman(
        hook,
        rootfs,
        ["/bin/sh", "-c", f"/bin/busybox cat /proc/self/maps; echo ===; {CAT} /proc/self/maps"],
        {"fcsp.sm": "40"},
        GPU,
    )
    assert result.returncode == 0, result.stderr
    static, dynamic = result.stdout.split("===")
    assert LIB not in static
    assert LIB in dynamic


def test_container_without_gpu_is_left_untouched(hook: HookSetup, rootfs: Path) -> None:
    """fcsp annotations on a container that asks for no GPU: no slot, no mounts, a log line."""
    result = podman(hook, rootfs, [CAT, "/proc/self/maps"], {"fcsp.sm": "40"})
    assert result.returncode == 0, result.stderr
    assert LIB not in result.stdout
    _no_fcsp_traces(hook, rootfs)
    assert any(
        r["event"] == "no GPU requested; container left untouched" for r in hook.log_records()
    )


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (("fcsp.sm", "abc"), 'annotation fcsp.sm="abc" is invalid: expected a percentage'),
        (("fcsp.mem", "8GB?"), 'annotation fcsp.mem="8GB?" is invalid: expected bytes'),
        (("fcsp.smm", "40"), "annotation fcsp.smm is unknown"),
        (("fcsp.sm.1", "40"), "GPU index 1 is out of range"),
    ],
)
def test_bad_annotation_fails_the_start_with_one_line(
    hook: HookSetup, rootfs: Path, annotation: tuple[str, str], message: str
) -> None:
    """podman run fails, podman's stderr carries the hook's one-line reason, and nothing is
    left behind: no slot, no mount point, no preload file."""
    result = podman(hook, rootfs, [CAT, "/proc/self/maps"], dict([annotation]), GPU)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    hook_lines = [line for line in result.stderr.split("stderr: ")[-1].splitlines() if line.strip()]
    assert len(hook_lines) == 1
    _no_fcsp_traces(hook, rootfs)


def test_a_spill_tenant_gets_its_bound_and_profile_and_spills_past_its_quota(
    hook: HookSetup, rootfs: Path
) -> None:
    """fcsp.mem-mode=spill: the slot carries the bound and the profile's knobs, and a CUDA
    process in the container holds its quota on the device and the rest in host memory."""
    add_cuda_sim(rootfs)
    name = f"fcsp-e2e-{uuid.uuid4().hex[:8]}"
    annotations = {
        "fcsp.mem": "64M",
        "fcsp.mem-mode": "spill",
        "fcsp.mem-spill": "0.5x",
        "fcsp.uvm-profile": "llm_inference",
    }
    program = ["/usr/bin/fcsp-sim-client", "init", "alloc", "mem", "48M", "alloc", "mem", "24M"]
    started = podman(
        hook, rootfs, [*program, "wait"], annotations, GPU, extra=("-d", "-i", "--name", name)
    )
    assert started.returncode == 0, started.stderr
    try:
        (slot_dir,) = hook.slots()
        limits = files.read_limits(slot_dir / "limits")
        assert limits.mem_mode == abi.MemMode.SPILL
        assert (limits.device[0].mem_spill_bytes, limits.device[0].mem_spill_centi) == (0, 5000)
        assert limits.uvm_profile == abi.UvmProfile.LLM_INFERENCE
        assert rules.unpack_pressure(limits.pressure_pct) == (70, 85, 95)
        assert limits.prefetch_bytes == 64 << 20

        def spilled() -> tuple[int, int]:
            device = files.read_usage(slot_dir / "usage").device[0]
            return device.mem_used_bytes, device.mem_spilled_bytes

        deadline = time.monotonic() + 30
        while spilled() != (48 << 20, 24 << 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spilled() == (48 << 20, 24 << 20)
    finally:
        _podman("rm", "-f", "-t", "0", name)
    assert hook.slots() == []


def test_a_spill_bound_past_the_hosts_memory_is_refused(hook: HookSetup, rootfs: Path) -> None:
    """A bound the host could not back fails the start with one line naming the key."""
    annotations = {"fcsp.mem": "8G", "fcsp.mem-mode": "spill", "fcsp.mem-spill": "1024T"}
    result = podman(hook, rootfs, [CAT, "/proc/self/maps"], annotations, GPU)
    assert result.returncode != 0
    assert "annotation fcsp.mem-spill asks for up to 1073741824 MiB of host memory" in result.stderr
    assert "Traceback" not in result.stderr
    _no_fcsp_traces(hook, rootfs)


def test_fail_open_policy_starts_the_container_without_fcsp(
    tmp_path: Path, rootfs: Path, hook_python: Path
) -> None:
    """With failure_policy = fail-open, a bad annotation is logged and the container runs
    without the shim."""
    hook = HookSetup.create(tmp_path / "open", hook_python, failure_policy="fail-open")
    result = podman(hook, rootfs, [CAT, "/proc/self/maps"], {"fcsp.sm": "abc"}, GPU)
    assert result.returncode == 0, result.stderr
    assert LIB not in result.stdout
    _no_fcsp_traces(hook, rootfs)
    assert any(r["level"] == "error" for r in hook.log_records())


def test_restarted_container_reuses_its_slot(hook: HookSetup, rootfs: Path) -> None:
    """Starting a stopped container again gives it the same slot path (keyed by its id)."""
    name = f"fcsp-e2e-{uuid.uuid4().hex[:8]}"
    first = podman(
        hook, rootfs, [CAT, "/etc/ld.so.preload"], {"fcsp.sm": "40"}, GPU, extra=("--name", name)
    )
    try:
        assert first.returncode == 0, first.stderr
        second = _podman("--hooks-dir", str(hook.hooks_dir), "start", "-a", name)
        assert second.returncode == 0, second.stderr
        assert second.stdout == first.stdout == f"{LIB}\n"
    finally:
        _podman("rm", "-f", "-t", "0", name)
    ready = [r["slot"] for r in hook.log_records() if r["event"] == "tenant slot ready"]
    assert len(ready) == 2
    assert ready[0] == ready[1]
    assert hook.slots() == []
    assert _mounts_under(hook.run_dir) == []


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def test_the_usage_file_cannot_grow_past_its_pages(hook: HookSetup, rootfs: Path) -> None:
    """Root in the container writing 32 MiB into its usage file, or truncating it to 32 MiB,
    cannot take the host's memory: the file is on a tmpfs of its own as big as the usage
    record's pages, so dd fails with ENOSPC and on the host the file holds at most those
    pages, read by the same path as ever; the container and its slot go away cleanly."""
    name = f"fcsp-e2e-{uuid.uuid4().hex[:8]}"
    script = (
        "/bin/busybox dd if=/dev/zero of=/run/fcsp/usage bs=1M count=32 conv=notrunc 2>&1;"
        " echo dd=$?; /bin/busybox truncate -s 32M /run/fcsp/usage; echo truncated;"
        " exec /bin/busybox sleep 600"
    )
    started = podman(
        hook,
        rootfs,
        ["/bin/sh", "-c", script],
        {"fcsp.sm": "40"},
        GPU,
        extra=("-d", "--name", name),
    )
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 30
        while "truncated" not in (logs := _podman("logs", name).stdout):
            assert time.monotonic() < deadline, logs
            time.sleep(0.05)
        assert "dd=0" not in logs
        assert "No space left on device" in logs
        (slot_dir,) = hook.slots()
        usage = slot_dir / "usage"
        page = os.sysconf("SC_PAGE_SIZE")
        assert usage.stat().st_blocks * 512 <= -(-ctypes.sizeof(abi.Usage) // page) * page
        assert usage.stat().st_dev != slot_dir.stat().st_dev
    finally:
        removed = _podman("rm", "-f", "-t", "0", name)
    assert removed.returncode == 0, removed.stderr
    assert hook.slots() == []
    assert _mounts_under(hook.run_dir) == []


# Malicious images: the rootfs is the tenant's, the hook is root on the host.


def test_etc_symlinked_to_an_absolute_path_stays_inside_the_rootfs(
    hook: HookSetup, rootfs: Path
) -> None:
    """/etc -> /tmp/elsewhere resolves inside the rootfs, as the container sees it; the
    host's /tmp/elsewhere is never created or written."""
    elsewhere = f"/tmp/fcsp-elsewhere-{uuid.uuid4().hex[:8]}"
    (rootfs / elsewhere.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (rootfs / "etc").rename(rootfs / elsewhere.lstrip("/"))
    (rootfs / "etc").symlink_to(elsewhere)
    result = podman(hook, rootfs, [CAT, "/etc/ld.so.preload"], {"fcsp.sm": "40"}, GPU)
    assert not Path(elsewhere).exists()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{LIB}\n"


@pytest.mark.parametrize("target", ["host-file", "/etc/passwd"])
def test_preload_symlinked_to_a_file_is_refused(
    hook: HookSetup, rootfs: Path, tmp_path: Path, target: str
) -> None:
    """/etc/ld.so.preload -> a host file, or -> /etc/passwd: the hook refuses to mount over a
    link, the start fails with a clear reason, and neither file changes."""
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("host secret\n")
    link_target = str(sentinel) if target == "host-file" else target
    (rootfs / "etc" / "ld.so.preload").symlink_to(link_target)
    before = {p: _digest(p) for p in (sentinel, Path("/etc/passwd"), rootfs / "etc" / "passwd")}
    result = podman(hook, rootfs, [CAT, "/etc/passwd"], {"fcsp.sm": "40"}, GPU)
    assert result.returncode != 0
    assert "/etc/ld.so.preload in the image is a symlink" in result.stderr
    assert {p: _digest(p) for p in before} == before
    assert hook.slots() == []
    assert not (rootfs / "run" / "fcsp").exists()


def test_relative_dotdot_symlink_never_leaves_the_rootfs(hook: HookSetup, rootfs: Path) -> None:
    """/etc -> ../../../../tmp/x climbs no higher than the rootfs: the host's /tmp/x is
    never created, and the container either starts with the preload or fails clearly."""
    name = f"fcsp-rel-{uuid.uuid4().hex[:8]}"
    (rootfs / "tmp" / name).mkdir()
    for entry in (rootfs / "etc").iterdir():
        entry.rename(rootfs / "tmp" / name / entry.name)
    (rootfs / "etc").rmdir()
    (rootfs / "etc").symlink_to(f"../../../../../../tmp/{name}")
    result = podman(hook, rootfs, [CAT, "/etc/ld.so.preload"], {"fcsp.sm": "40"}, GPU)
    assert not Path("/tmp", name).exists()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{LIB}\n"
    assert (rootfs / "tmp" / name / "ld.so.preload").exists()


def test_missing_etc_is_created_inside_the_rootfs(hook: HookSetup, rootfs: Path) -> None:
    """An image without /etc still starts and gets the preload."""
    subprocess.run(["rm", "-rf", str(rootfs / "etc")], check=True)
    result = podman(hook, rootfs, [CAT, "/etc/ld.so.preload"], {"fcsp.sm": "40"}, GPU)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{LIB}\n"


def test_run_symlinked_inside_the_rootfs_is_followed(hook: HookSetup, rootfs: Path) -> None:
    """/run -> /var/run (common in images) is followed inside the rootfs."""
    (rootfs / "run").rmdir()
    (rootfs / "var" / "run").mkdir(parents=True)
    (rootfs / "run").symlink_to("/var/run")
    result = podman(hook, rootfs, [CAT, "/proc/self/maps"], {"fcsp.sm": "40"}, GPU)
    assert result.returncode == 0, result.stderr
    assert LIB in result.stdout
    assert (rootfs / "var" / "run" / "fcsp").is_dir()


def test_hook_ignores_the_engines_and_the_containers_environment(
    hook: HookSetup, rootfs: Path, tmp_path: Path
) -> None:
    """A PYTHONPATH planted in podman's environment and in the container's env never reaches
    the hook (explicit env in hooks.d, python -I): the planted module does not run."""
    evil = tmp_path / "evil" / "fcsp_hook"
    evil.mkdir(parents=True)
    marker = tmp_path / "evil-ran"
    (evil / "__init__.py").write_text(f"open('{marker}', 'w').write('ran')\n")
    (evil / "hook.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(evil.parent), "PYTHONSTARTUP": str(evil / "__init__.py")}
    argv = [
        "podman",
        "--hooks-dir",
        str(hook.hooks_dir),
        "run",
        "--rm",
        "--runtime",
        "runc",
        *ULIMITS,
        "--annotation",
        "fcsp.sm=40",
        "-e",
        "NVIDIA_VISIBLE_DEVICES=0",
        "-e",
        f"PYTHONPATH={evil.parent}",
        "--rootfs",
        str(rootfs),
        CAT,
        "/etc/ld.so.preload",
    ]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{LIB}\n"
    assert not marker.exists()
