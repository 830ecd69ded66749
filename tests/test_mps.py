"""The MPS backend on the simulated driver: fcsp-observer runs one control daemon per GPU
configured for mps (tests/sim/mps_control.c plays nvidia-cuda-mps-control), restarts it
when it dies or after a client's fatal fault, marks the tenants hit, and falls back to
time-slicing loudly when it cannot start one; the shim makes a tenant's processes clients
with the slot's limits (the simulated libcuda announces itself to the daemon at cuInit,
with the CUDA_MPS_* values it was given); a podman container gets only the control socket.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcsp_hook import config, mps, procfs
from fcsp_hook.ctl import main as ctl
from fcsp_hook.ctl import status as ctl_status
from fcsp_hook.errors import ConfigError
from fcsp_hook.hook import prestart
from fcsp_hook.log import HookLogger
from fcsp_hook.observer import mpsd
from fcsp_hook.slot import abi, files
from tests.containers import HookSetup, add_cuda_sim, podman
from tests.shim.harness import SIM_DIR, Env, build, read_until_ready, run, sim_uuid, start
from tests.test_observer import Host, wait_for
from tests.test_shim_compute import parse_loop

SIM_CONTROL = SIM_DIR / "bin" / "nvidia-cuda-mps-control"
GPU0 = "GPU-00000000-0000-0000-0000-0000000000a0"
GPU1 = "GPU-00000000-0000-0000-0000-0000000000a1"
# The line the real MPS server logs when a client hits an illegal address.
FAULT_LINE = (
    "[2026-11-29 13:17:21.118 Server  1094] Client {PID: 1263, Context: 1} "
    "encountered a fatal GPU error.\n"
)


def _driver_dir(base: Path) -> Path:
    """The driver's procfs files for two GPUs, minors 0 and 1."""
    for minor, gpu in ((0, GPU0), (1, GPU1)):
        info = base / "gpus" / f"0000:{minor:02x}:00.0" / "information"
        info.parent.mkdir(parents=True)
        info.write_text(f"GPU UUID: \t {gpu}\nDevice Minor: \t {minor}\n")
    return base


def _backends(host: Host) -> dict[str, dict[str, object]]:
    value = host.state().get("backends", {})
    return value if isinstance(value, dict) else {}


def _daemon_pid(host: Host, gpu: str) -> int:
    state = _backends(host).get(gpu, {})
    return int(str(state.get("pid", 0))) if state.get("backend") == "mps" else 0


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A socket path must fit in 108 bytes; pytest's tmp_path can be longer than that."""
    path = Path(tempfile.mkdtemp(prefix="fcsp-mps-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mps_host(short_tmp: Path) -> Iterator[Host]:
    tmp_path = short_tmp
    build()
    h = Host(tmp_path)
    h.config.write_text(
        f'[paths]\nrun_dir = "{h.run_dir}"\ndriver_dir = "{_driver_dir(tmp_path / "driver")}"\n'
        "[observer]\ninterval_ms = 10\nidle_window_ms = 300\nmetrics_port = 0\n"
        f'[backend]\ngpus = {{ "1" = "mps" }}\nmps_control = "{SIM_CONTROL}"\n'
    )
    yield h
    h.stop_all()
    for gpu in (GPU0, GPU1):
        pid_file = mps.gpu_dir(h.run_dir, gpu) / "pipe" / mpsd.PID_FILE
        if pid_file.exists():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_backend_config_per_gpu_and_its_errors() -> None:
    cfg = config.from_mapping({"backend": {"default": "mps", "gpus": {"GPU-1": "timeslice"}}})
    assert cfg.backend.for_gpu("GPU-1", 0) == abi.Backend.TIMESLICE
    assert cfg.backend.for_gpu("GPU-2", 1) == abi.Backend.MPS
    assert config.Config().backend.for_gpu("GPU-1", 0) == abi.Backend.TIMESLICE
    bad = [
        (
            {"default": "mig"},
            "[backend] default = 'mig' is invalid: expected one of timeslice, mps",
        ),
        ({"gpus": {"first": "mps"}}, "[backend] gpus key 'first' is invalid"),
        ({"gpus": {"0": "fast"}}, "[backend] gpus.0 = 'fast' is invalid"),
        ({"mps_control": "bin/mps"}, "[backend] mps_control = 'bin/mps' is invalid"),
    ]
    for table, message in bad:
        with pytest.raises(ConfigError) as err:
            config.from_mapping({"backend": table})
        assert str(err.value).startswith(message)


def test_fault_lines_of_the_real_server_are_recognised() -> None:
    log = b"[x Server 1] Client {PID: 7, Context ID: 1} connected\n" + FAULT_LINE.encode()
    assert mps.fault_pids(log) == [1263]
    assert mps.fault_pids(b"[x Server 1] Client process 7 disconnected\n") == []


def test_observer_runs_a_daemon_for_the_mps_gpu_only(mps_host: Host) -> None:
    """GPU 1 is configured for mps: its daemon runs with its pipe directory private (0700)
    and a client directory holding only a hard link to the control socket; GPU 0 has none;
    the STATUS line and the state file name the backend."""
    mps_host.start()
    wait_for("daemon for GPU 1", lambda: _daemon_pid(mps_host, GPU1))
    root = mps.gpu_dir(mps_host.run_dir, GPU1)
    assert (root / "pipe").stat().st_mode & 0o777 == 0o700
    client = root / "client"
    assert sorted(p.name for p in client.iterdir()) == ["control"]
    assert (client / "control").stat().st_ino == (root / "pipe" / "control").stat().st_ino
    assert mps.ready(mps_host.run_dir, GPU1)
    assert not mps.ready(mps_host.run_dir, GPU0)
    assert GPU0 not in _backends(mps_host)
    assert mps.read_state(mps_host.run_dir, GPU1)["backend"] == "mps"


def test_a_dead_daemon_is_restarted_and_the_socket_relinked(mps_host: Host) -> None:
    mps_host.start()
    wait_for("daemon for GPU 1", lambda: _daemon_pid(mps_host, GPU1))
    first = _daemon_pid(mps_host, GPU1)
    os.kill(first, signal.SIGKILL)
    wait_for("a new daemon", lambda: _daemon_pid(mps_host, GPU1) not in (0, first))
    root = mps.gpu_dir(mps_host.run_dir, GPU1)
    assert (root / "client" / "control").stat().st_ino == (root / "pipe" / "control").stat().st_ino
    assert _backends(mps_host)[GPU1]["restarts"] == 1
    assert "MPS daemon died; restarting" in mps_host.log_text()


def test_a_client_fault_marks_the_gpus_tenants_and_restarts_the_daemon(
    mps_host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server's fatal-error line in server.log: the tenant on that GPU is marked (its
    clients were torn down), the time-sliced tenant on the other GPU is not, the daemon is
    replaced; fcspctl status shows the backends and the fault."""
    files.ensure_tenants_dir(mps_host.run_dir)
    for cid, index, gpu, backend in (
        ("on-mps", 1, GPU1, abi.Backend.MPS),
        ("on-timeslice", 0, GPU0, abi.Backend.TIMESLICE),
    ):
        spec = files.SlotSpec(
            container_id=cid,
            devices=(files.DeviceLimits(host_index=index, uuid=gpu, backend=backend),),
        )
        files.write_slot(files.slot_path(mps_host.run_dir, cid), spec, {})
    mps_host.start()
    wait_for("daemon for GPU 1", lambda: _daemon_pid(mps_host, GPU1))
    first = _daemon_pid(mps_host, GPU1)
    with (mps.gpu_dir(mps_host.run_dir, GPU1) / "log" / mpsd.SERVER_LOG).open("a") as f:
        f.write(FAULT_LINE)

    def tenant(cid: str) -> dict[str, object]:
        tenants = mps_host.state().get("tenants", {})
        assert isinstance(tenants, dict)
        value = tenants.get(cid, {})
        assert isinstance(value, dict)
        return value

    wait_for("fault counted", lambda: _backends(mps_host).get(GPU1, {}).get("faults") == 1)
    wait_for("a new daemon", lambda: _daemon_pid(mps_host, GPU1) not in (0, first))
    assert tenant("on-mps")["mps_faults"] == 1
    assert tenant("on-mps")["backend"] == ["mps"]
    assert tenant("on-timeslice")["mps_faults"] == 0
    assert "MPS client fatal GPU error" in mps_host.log_text()

    assert ctl.main(["--config", str(mps_host.config), "status"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("on-")}
    assert rows["on-mps"][3:5] == [GPU1, "mps"] and "fault" in out.split("on-mps")[1]
    assert rows["on-timeslice"][3:5] == [GPU0, "timeslice"]
    assert f"{GPU1}: mps, daemon pid {_daemon_pid(mps_host, GPU1)}, restarts 1, faults 1" in out
    ctl.main(["--config", str(mps_host.config), "doctor"])
    assert "[ok] MPS      a daemon serves each of 1 MPS GPUs" in capsys.readouterr().out


def test_status_shows_what_the_daemon_allows_any_client(
    mps_host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    """The observer sets the ceiling for a strict 30 % tenant already there when it starts
    the daemon, publishes it, and fcspctl status says it; and it publishes the one the hook
    sets as a larger tenant starts."""
    files.ensure_tenants_dir(mps_host.run_dir)
    _tenant_slot(mps_host.run_dir, "small", 3000)
    mps_host.start()
    wait_for("the ceiling", lambda: _backends(mps_host).get(GPU1, {}).get("threads_pct") == 30)
    assert mps.ready(mps_host.run_dir, GPU1)
    assert ctl.main(["--config", str(mps_host.config), "status"]) == 0
    pid = _daemon_pid(mps_host, GPU1)
    assert f"{GPU1}: mps, daemon pid {pid}, any client at most 30 % of the SMs" in (
        capsys.readouterr().out
    )
    with files.slots_locked(mps_host.run_dir):  # what the hook does as a tenant starts
        _tenant_slot(mps_host.run_dir, "large", 7000)
        mps.set_ceiling(mps_host.run_dir, GPU1, str(SIM_CONTROL), 70)
    wait_for("the hook's ceiling", lambda: _backends(mps_host)[GPU1].get("threads_pct") == 70)


def test_a_daemon_that_cannot_start_falls_back_to_timeslice_loudly(
    mps_host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = mps_host.config.read_text().replace(str(SIM_CONTROL), str(tmp_path / "missing"))
    mps_host.config.write_text(text)
    mps_host.start()
    wait_for(
        "the failure in the state file", lambda: _backends(mps_host).get(GPU1, {}).get("error")
    )
    state = _backends(mps_host)[GPU1]
    assert state["backend"] == "timeslice"
    assert "not found" in str(state["error"])
    assert "MPS backend unavailable" in mps_host.log_text()
    assert not mps.ready(mps_host.run_dir, GPU1)
    assert ctl.main(["--config", str(mps_host.config), "doctor"]) == 1
    assert "[!!] MPS      1 of 1 MPS GPUs time-sliced:" in capsys.readouterr().out


# ---- the shim: a tenant's processes become clients with the slot's limits ----------------


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Path]:
    """A simulated control daemon; yields its log directory."""
    build()
    tmp_path = short_tmp
    pipe, log = tmp_path / "pipe", tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(log)}
    subprocess.run([str(SIM_CONTROL), "-d"], env=env, check=True)
    wait_for("control socket", (pipe / "control").is_socket)
    yield log
    subprocess.run([str(SIM_CONTROL)], env=env, input=b"quit\n", check=False, timeout=10)


def _mps_slot(
    tmp_path: Path,
    daemon_log: Path,
    mode: abi.IsolationMode,
    socket: bool,
    *,
    priority: abi.Priority = abi.Priority.BEST_EFFORT,
    threads_centi: int = 0,
) -> Path:
    directory = tmp_path / "slot"
    spec = files.SlotSpec(
        container_id="t",
        isolation_mode=mode,
        priority=priority,
        devices=(
            files.DeviceLimits(
                host_index=0,
                sm_requested_centi=3000,
                mem_limit_bytes=1 << 30,
                backend=abi.Backend.MPS,
                mps_threads_centi=threads_centi,
            ),
        ),
    )
    files.write_slot(directory, spec, {}, with_mps_dir=True)
    if socket:  # what the hook's bind mount gives a container, made here with a hard link
        os.link(daemon_log.parent / "pipe" / "control", directory / abi.MPS_DIR / "control")
    return directory


def _clients(daemon_log: Path) -> list[str]:
    text = (daemon_log / "control.log").read_text()
    return [line.split("NEW CLIENT ", 1)[1] for line in text.splitlines() if "NEW CLIENT" in line]


@pytest.mark.parametrize(
    ("mode", "own", "expected"),
    [
        (abi.IsolationMode.STRICT, {}, "threads=30 pinned=0=1024M"),
        (abi.IsolationMode.BALANCED, {}, "threads=100 pinned=0=1024M"),
        (
            abi.IsolationMode.STRICT,
            {
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "10",
                "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=512M",
            },
            "threads=10 pinned=0=512M",
        ),
        (
            abi.IsolationMode.STRICT,
            {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "90", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=4G"},
            "threads=30 pinned=0=1024M",
        ),
        (
            abi.IsolationMode.BALANCED,
            {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/elsewhere"},
            "threads=100 pinned=0=1024M",
        ),
    ],
    ids=[
        "strict-caps-threads",
        "balanced-leaves-sms-open",
        "tenant-may-lower",
        "not-raise",
        "pipe",
    ],
)
def test_the_shim_makes_the_process_a_client_with_the_slots_limits(
    tmp_path: Path, daemon: Path, mode: abi.IsolationMode, own: dict[str, str], expected: str
) -> None:
    directory = _mps_slot(daemon.parent, daemon, mode, socket=True)
    result = run(Env(state=tmp_path / "sim", slot=directory, extra=own), "init")
    assert result.field("init") == ["init", "0"], result.stderr
    (client,) = _clients(daemon)
    assert client.split(" ", 1)[1] == expected


RAISED = {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=64G"}


@pytest.mark.parametrize(
    ("mode", "threads_centi", "own", "expected"),
    [
        (abi.IsolationMode.STRICT, 0, RAISED, "threads=30 pinned=0=1024M"),
        (abi.IsolationMode.BALANCED, 7000, RAISED, "threads=70 pinned=0=1024M"),
        (
            abi.IsolationMode.STRICT,
            0,
            {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/elsewhere"},
            "threads=30 pinned=0=1024M",
        ),
    ],
    ids=["strict", "best-effort-beside-a-latency-tenant", "pipe"],
)
def test_a_tenant_cannot_raise_its_mps_limits_before_cuda_initialises(
    daemon: Path,
    mode: abi.IsolationMode,
    threads_centi: int,
    own: dict[str, str],
    expected: str,
) -> None:
    """The tenant's own setenv(), after the shim's constructor and before cuInit, of a
    higher thread percentage (100 for a strict 30 % tenant, or for a best-effort one that a
    latency tenant left 70 %), a higher pinned-memory limit (64 GiB for a 1 GiB quota) or
    another daemon's pipe directory: the driver still reads the slot's values, since the
    shim sets them again when CUDA initialises.  The best-effort tenant, whose percentage
    is not its share, is still held to its 30 % by the launch limiter."""
    directory = _mps_slot(daemon.parent, daemon, mode, True, threads_centi=threads_centi)
    sets = [word for name, value in own.items() for word in ("setenv", name, value)]
    loop = ["func", "k_200us", "run", "kernel", "0", "1.0"]
    result = run(Env(state=daemon.parent / "sim", slot=directory), *sets, "init", *loop)
    assert result.field("init") == ["init", "0"], result.stderr
    (client,) = _clients(daemon)
    assert client.split(" ", 1)[1] == expected
    if mode == abi.IsolationMode.BALANCED:
        assert 0.15 <= parse_loop(result.lines, 200).device_fraction <= 0.45, result.lines


def test_a_strict_tenant_that_is_no_mps_client_when_cuda_initialises_is_throttled(
    daemon: Path,
) -> None:
    """The daemon's socket is there when a strict 30 % tenant's process starts and gone
    when it initialises CUDA (the daemon restarting): the driver runs it time-sliced,
    outside any thread percentage, so the shim holds it to its share by launch timing
    rather than trust a cap that is not in force."""
    directory = _mps_slot(daemon.parent, daemon, abi.IsolationMode.STRICT, True)
    env = Env(state=daemon.parent / "sim", slot=directory)
    proc = start(env, "wait", "init", "func", "k_200us", "run", "kernel", "0", "1.0")
    read_until_ready(proc)
    (directory / abi.MPS_DIR / "control").unlink()
    out, err = proc.communicate("go\n", timeout=60)
    assert _clients(daemon) == []
    assert "is not a socket: this process is time-sliced" in err
    assert 0.15 <= parse_loop(out.splitlines(), 200).device_fraction <= 0.45, out


@pytest.mark.parametrize(
    ("mode", "priority", "threads_centi", "expected"),
    [
        (abi.IsolationMode.BALANCED, abi.Priority.LATENCY, 3000, "threads=30"),
        (abi.IsolationMode.BALANCED, abi.Priority.BEST_EFFORT, 7000, "threads=70"),
        (abi.IsolationMode.STRICT, abi.Priority.BEST_EFFORT, 2000, "threads=20"),
    ],
    ids=["latency-gets-its-share", "best-effort-gets-what-is-left", "strict-within-what-is-left"],
)
def test_thread_percentages_around_a_latency_tenant(
    daemon: Path,
    mode: abi.IsolationMode,
    priority: abi.Priority,
    threads_centi: int,
    expected: str,
) -> None:
    """What the hook granted in the slot (mps_threads_centi) is the client's percentage."""
    directory = _mps_slot(
        daemon.parent, daemon, mode, True, priority=priority, threads_centi=threads_centi
    )
    result = run(Env(state=daemon.parent / "sim", slot=directory), "init")
    assert result.field("init") == ["init", "0"], result.stderr
    (client,) = _clients(daemon)
    assert client.split(" ")[1] == expected


def test_thread_grants_reserve_the_sms_of_latency_tenants(tmp_path: Path) -> None:
    """The hook's arithmetic: latency tenants' shares are kept free for them."""
    best, strict, latency = (
        abi.Priority.BEST_EFFORT,
        abi.IsolationMode.STRICT,
        abi.Priority.LATENCY,
    )
    balanced = abi.IsolationMode.BALANCED
    assert mps.threads_centi(3000, balanced, latency, 0) == 3000
    assert mps.threads_centi(5000, balanced, best, 3000) == 7000
    assert mps.threads_centi(5000, strict, best, 3000) == 5000
    assert mps.threads_centi(8000, strict, best, 3000) == 7000
    assert mps.threads_centi(5000, balanced, best, 9800) == mps.MIN_THREADS_CENTI
    files.ensure_tenants_dir(tmp_path)
    for cid, priority, gpu, backend, share in (
        ("lat-a", latency, GPU1, abi.Backend.MPS, 2000),
        ("lat-b", latency, GPU1, abi.Backend.MPS, 1500),
        ("lat-other-gpu", latency, GPU0, abi.Backend.MPS, 4000),
        ("lat-timesliced", latency, GPU1, abi.Backend.TIMESLICE, 4000),
        ("batch", best, GPU1, abi.Backend.MPS, 5000),
    ):
        spec = files.SlotSpec(
            container_id=cid,
            priority=priority,
            devices=(files.DeviceLimits(uuid=gpu, sm_requested_centi=share, backend=backend),),
        )
        files.write_slot(files.slot_path(tmp_path, cid), spec, {})
    (files.tenants_dir(tmp_path) / "garbage").mkdir()
    tenants = files.tenants_dir(tmp_path)
    assert mps.latency_reserve(tenants, GPU1, exclude="new") == 3500
    assert mps.latency_reserve(tenants, GPU1, exclude="lat-a") == 1500


def test_without_the_socket_the_process_runs_time_sliced(tmp_path: Path, daemon: Path) -> None:
    directory = _mps_slot(daemon.parent, daemon, abi.IsolationMode.STRICT, socket=False)
    result = run(Env(state=tmp_path / "sim", slot=directory, extra={}), "init")
    assert result.field("init") == ["init", "0"]
    assert _clients(daemon) == []
    assert "is not a socket: this process is time-sliced" in result.stderr


def _granted(daemon_log: Path) -> list[int]:
    """The thread percentage each client got, in order: what it asked, or its server's
    setting if that is lower."""
    text = (daemon_log / "control.log").read_text()
    return [int(line.split()[-1]) for line in text.splitlines() if " ACTIVE THREADS " in line]


def _tenant_slot(run_dir: Path, cid: str, share_centi: int) -> None:
    """A strict single-GPU MPS tenant of GPU 1, as the hook writes it."""
    mode, best = abi.IsolationMode.STRICT, abi.Priority.BEST_EFFORT
    spec = files.SlotSpec(
        container_id=cid,
        isolation_mode=mode,
        devices=(
            files.DeviceLimits(
                uuid=GPU1,
                sm_requested_centi=share_centi,
                backend=abi.Backend.MPS,
                mps_threads_centi=mps.threads_centi(share_centi, mode, best, 0),
            ),
        ),
    )
    files.write_slot(files.slot_path(run_dir, cid), spec, {})


def test_a_client_that_bypasses_the_shim_gets_no_more_than_the_gpus_largest_grant(
    short_tmp: Path,
) -> None:
    """MPS takes a client's thread percentage from its own environment: a process of a
    strict 30 % tenant that does not load the shim and asks for 100 % got 100 %.  The
    observer's daemon now lets no client of the GPU have more than the largest grant of its
    tenants, and lowers that as they go: 70 % beside a 70 % tenant, 30 % once it is gone."""
    build()
    run_dir = short_tmp / "run"
    files.ensure_tenants_dir(run_dir)
    daemon = mpsd.Daemon(run_dir, GPU1, str(SIM_CONTROL))
    try:
        _tenant_slot(run_dir, "small", 3000)
        _tenant_slot(run_dir, "large", 7000)
        daemon.ensure(time.monotonic())
        assert mps.ready(run_dir, GPU1)
        client = mps.client_dir(run_dir, GPU1)
        bypass = Env(
            state=short_tmp / "sim",
            extra={
                "CUDA_MPS_PIPE_DIRECTORY": str(client),
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100",
            },
        )
        log = mps.gpu_dir(run_dir, GPU1) / "log"
        assert run(bypass, "init", preload=False).field("init") == ["init", "0"]
        files.remove_slot(run_dir, "large")
        daemon.ensure(time.monotonic())
        assert run(bypass, "init", preload=False).field("init") == ["init", "0"]
        assert _granted(log) == [70, 30]
        assert mps.recorded_ceiling(run_dir, GPU1) == 30
    finally:
        daemon.stop()


def test_the_thread_ceiling_waits_for_a_container_start_and_counts_a_joining_tenant(
    short_tmp: Path,
) -> None:
    """While a container start holds the slots lock the observer leaves the ceiling alone
    (a slot may be half made) and links no socket for clients until it can set it; the
    hook's arithmetic counts the tenant it is adding."""
    build()
    run_dir = short_tmp / "run"
    files.ensure_tenants_dir(run_dir)
    _tenant_slot(run_dir, "small", 3000)
    tenants = files.tenants_dir(run_dir)
    assert mps.threads_ceiling(tenants, GPU1) == 30
    assert mps.threads_ceiling(tenants, GPU1, joining_centi=5050) == 51
    assert mps.threads_ceiling(tenants, GPU0) == 0
    daemon = mpsd.Daemon(run_dir, GPU1, str(SIM_CONTROL))
    try:
        with files.slots_locked(run_dir):
            daemon.ensure(time.monotonic())
            assert not mps.ready(run_dir, GPU1)
        daemon.ensure(time.monotonic())
        assert mps.ready(run_dir, GPU1)
        assert mps.recorded_ceiling(run_dir, GPU1) == 30
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    ("allowed", "joins_mps"),
    [(0, True), (20, False), (40, True)],
    ids=["nothing-set-yet", "set-below-its-share", "set-above-its-share"],
)
def test_a_daemon_that_refuses_the_ceiling(tmp_path: Path, allowed: int, joins_mps: bool) -> None:
    """When the daemon will not take the ceiling, a strict 30 % tenant stays on MPS unless
    what the daemon allows now is below its share: then its clients would get less than it
    was granted, and it is time-sliced (its share held by the launch limiter) instead."""
    run_dir = tmp_path / "run"
    cfg = config.from_mapping(
        {"paths": {"run_dir": str(run_dir)}, "backend": {"mps_control": "/bin/false"}}
    )
    mps.gpu_dir(run_dir, GPU1).mkdir(parents=True)
    if allowed:
        (mps.gpu_dir(run_dir, GPU1) / mps.THREADS_FILE).write_text(str(allowed))
    spec = files.SlotSpec(
        container_id="new",
        isolation_mode=abi.IsolationMode.STRICT,
        devices=(
            files.DeviceLimits(
                uuid=GPU1, sm_requested_centi=3000, backend=abi.Backend.MPS, mps_threads_centi=3000
            ),
        ),
    )
    log = HookLogger(tmp_path / "hook.log", stderr=io.StringIO())
    assert prestart.hold_mps_threads(cfg, GPU1, spec, log) is joins_mps
    assert "MPS daemon refused the thread ceiling" in (tmp_path / "hook.log").read_text()


# ---- a container ---------------------------------------------------------------------------


def test_container_gets_only_the_control_socket_read_only(
    short_tmp: Path, rootfs: Path, hook_python: Path
) -> None:
    """podman with the real hook, GPU 1 on mps with a running daemon: /run/fcsp/mps in the
    container holds only `control`, read-only; the CUDA process in it became a client of
    the host's daemon with its strict share; next to a latency tenant holding 30 % of the GPU
    a best-effort container gets the other 70 %; a two-GPU container is time-sliced."""
    build()
    tmp_path = short_tmp
    driver = _driver_dir(tmp_path / "driver")
    run_dir = tmp_path / "fcsp" / "run"
    daemon = mpsd.Daemon(run_dir, GPU1, str(SIM_CONTROL))
    daemon.ensure(time.monotonic())
    assert mps.ready(run_dir, GPU1)
    hook = HookSetup.create(
        tmp_path / "fcsp",
        hook_python,
        paths=f'driver_dir = "{driver}"\n[backend]\ngpus = {{ "1" = "mps" }}\n',
    )
    add_cuda_sim(rootfs)
    try:
        script = (
            "ls -A /run/fcsp/mps; (echo > /run/fcsp/mps/x) 2>/dev/null || echo read-only;"
            " fcsp-sim-client init"
        )
        shell = [_shell(rootfs), "-c", script]
        done = podman(
            hook,
            rootfs,
            shell,
            {"fcsp.sm": "40", "fcsp.mode": "strict"},
            {"NVIDIA_VISIBLE_DEVICES": "1"},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\n")[:3] == ["control", "read-only", "init 0"], done.stdout
        clients = _clients(mps.gpu_dir(run_dir, GPU1) / "log")
        assert [c.split(" ", 1)[1] for c in clients] == ["threads=40 pinned=-"]
        ready = [r for r in hook.log_records() if r.get("event") == "tenant slot ready"]
        assert ready[-1]["backend"] == ["mps"]

        # A latency tenant holds 30 % of GPU 1: a best-effort container gets the other 70 %.
        latency = files.SlotSpec(
            container_id="serving",
            priority=abi.Priority.LATENCY,
            devices=(
                files.DeviceLimits(uuid=GPU1, sm_requested_centi=3000, backend=abi.Backend.MPS),
            ),
        )
        files.write_slot(files.slot_path(run_dir, "serving"), latency, {})
        done = podman(hook, rootfs, shell, {"fcsp.sm": "40"}, {"NVIDIA_VISIBLE_DEVICES": "1"})
        assert done.returncode == 0, done.stderr
        clients = _clients(mps.gpu_dir(run_dir, GPU1) / "log")
        assert clients[-1].split(" ", 1)[1] == "threads=70 pinned=-"
        files.remove_slot(run_dir, "serving")

        two = podman(hook, rootfs, shell, {"fcsp.sm": "40"}, {"NVIDIA_VISIBLE_DEVICES": "0,1"})
        assert two.returncode == 0, two.stderr
        assert len(_clients(mps.gpu_dir(run_dir, GPU1) / "log")) == 2
        assert "single-GPU containers only" in hook.log_file.read_text()
    finally:
        daemon.stop()


def _shell(rootfs: Path) -> str:
    for candidate in ("bin/sh", "usr/bin/sh", "bin/busybox"):
        if (rootfs / candidate).exists():
            return "/" + candidate
    pytest.skip(f"no shell in the test rootfs {rootfs}")
    raise AssertionError  # unreachable


def test_processes_outside_mps_and_several_inside_are_named(short_tmp: Path) -> None:
    """NVML (simulated) lists MPS clients apart: of three processes of a strict 30 % MPS
    tenant, the one that started while the daemon's socket was missing ran time-sliced,
    outside the MPS server's SM limits, and the observer names it; the two clients are
    not named so, but counted: MPS caps each one's SMs at 30 %, not the two together."""
    build()
    h = Host(short_tmp)
    sim = Env(state=short_tmp / "sim")
    h.config.write_text(
        f'[paths]\nrun_dir = "{h.run_dir}"\ndriver_dir = "{short_tmp / "no-driver"}"\n'
        "[observer]\ninterval_ms = 10\nmetrics_port = 0\nnvml_interval_ms = 1000\n"
        f'[backend]\ngpus = {{ "0" = "mps" }}\nmps_control = "{SIM_CONTROL}"\n'
    )
    h.start(
        env={
            "LD_LIBRARY_PATH": str(SIM_DIR),
            "FCSP_SIM_STATE": str(sim.state),
            "FCSP_SIM_DEVICES": "1",
        }
    )
    procs: list[subprocess.Popen[str]] = []
    try:
        gpu = sim_uuid(0)
        wait_for("daemon for GPU 0", lambda: _daemon_pid(h, gpu))
        files.ensure_tenants_dir(h.run_dir)
        directory = files.slot_path(h.run_dir, "t1")
        spec = files.SlotSpec(
            container_id="t1",
            devices=(
                files.DeviceLimits(
                    host_index=0, uuid=gpu, sm_requested_centi=3000, backend=abi.Backend.MPS
                ),
            ),
            isolation_mode=abi.IsolationMode.STRICT,
        )
        files.write_slot(directory, spec, {})
        own = procfs.proc_stat(os.getpid())
        assert own is not None
        h.set_init("t1", os.getpid(), own[1])  # the tenant's "container" is this pid namespace
        client_env = Env(state=sim.state, slot=directory)
        mps_dir = directory / abi.MPS_DIR
        direct = start(client_env, "init", "alloc", "mem", "64M", "wait")  # no socket yet
        procs.append(direct)
        read_until_ready(direct)
        mps_dir.symlink_to(mps.client_dir(h.run_dir, gpu))
        clients = [start(client_env, "init", "alloc", "mem", "64M", "wait") for _ in range(2)]
        procs += clients
        for client in clients:
            read_until_ready(client)

        def named(key: str) -> list[int]:
            tenant = h.state().get("tenants", {}).get("t1", {})  # type: ignore[union-attr]
            return list(tenant.get(key, []))  # type: ignore[union-attr]

        # flagged, maybe before the clients started: a later check counts them both
        wait_for("the process outside MPS is flagged", lambda: named("outside_mps_host_pids"))
        wait_for("both MPS clients counted", lambda: len(named("mps_client_host_pids")) == 2)
        assert named("outside_mps_host_pids") == [direct.pid]
        assert sorted(named("mps_client_host_pids")) == sorted(c.pid for c in clients)
        assert "run outside MPS" in h.log_text()
        assert "MPS caps each process's SMs, not the tenant's" in h.log_text()
        status = ctl_status.status_text(h.run_dir).split("\n", 2)[1]
        assert "1 outside MPS, 2 MPS processes" in status, status
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
        h.stop_all()
        with contextlib.suppress(OSError, ValueError):
            pid_file = mpsd.PID_FILE
            os.kill(int((mps.gpu_dir(h.run_dir, sim_uuid(0)) / "pipe" / pid_file).read_text()), 9)


def test_a_config_without_mps_stops_the_daemon(mps_host: Host) -> None:
    """SIGHUP with GPU 1 no longer on mps: its daemon is told to quit and tenants see no
    control socket (new containers are time-sliced)."""
    proc = mps_host.start()
    wait_for("daemon for GPU 1", lambda: _daemon_pid(mps_host, GPU1))
    pid = _daemon_pid(mps_host, GPU1)
    text = mps_host.config.read_text().replace('gpus = { "1" = "mps" }', "gpus = {}")
    mps_host.config.write_text(text)
    proc.send_signal(signal.SIGHUP)
    wait_for("daemon gone", lambda: not Path(f"/proc/{pid}").exists())
    wait_for("no backend in the state file", lambda: not _backends(mps_host))
    assert not mps.ready(mps_host.run_dir, GPU1)
    assert "MPS backend no longer configured" in mps_host.log_text()


def test_mps_daemons_are_in_the_metrics() -> None:
    """Per GPU on MPS: whether its daemon serves tenants, its restarts and faults; per
    tenant, its MPS processes."""
    from prometheus_client import generate_latest  # noqa: PLC0415  # this test only

    from fcsp_hook.observer import metrics  # noqa: PLC0415

    exporter = metrics.Metrics()
    tenant = metrics.TenantGpuSample(
        "t1", "team", GPU0, "strict", 3000, 3000, 0, 0, 0, 0, True, 0, mps_processes=2
    )
    exporter.publish(
        metrics.Snapshot(samples=(tenant,), mps={GPU0: (True, 2, 1), GPU1: (False, 0, 0)})
    )
    body = generate_latest(exporter.registry).decode()
    line = next(x for x in body.splitlines() if x.startswith("fcsp_mps_processes{"))
    assert 'container_id="t1"' in line and line.endswith(" 2.0"), line
    assert f'fcsp_mps_daemon_up{{gpu="{GPU0}"}} 1.0' in body
    assert f'fcsp_mps_daemon_up{{gpu="{GPU1}"}} 0.0' in body
    assert f'fcsp_mps_daemon_restarts_total{{gpu="{GPU0}"}} 2.0' in body
    assert f'fcsp_mps_gpu_faults_total{{gpu="{GPU0}"}} 1.0' in body


def test_fcspctl_set_on_an_mps_tenant_says_running_processes_keep_their_cap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    files.ensure_tenants_dir(run_dir)
    for cid, backend in (("on-mps", abi.Backend.MPS), ("sliced", abi.Backend.TIMESLICE)):
        spec = files.SlotSpec(
            container_id=cid,
            devices=(files.DeviceLimits(uuid=GPU1, sm_requested_centi=3000, backend=backend),),
        )
        files.write_slot(files.slot_path(run_dir, cid), spec, {})
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[paths]\nrun_dir = "{run_dir}"\n')
    assert ctl.main(["--config", str(cfg), "set", "on-mps", "--sm", "40"]) == 0
    assert "note: this tenant is on MPS" in capsys.readouterr().out
    assert ctl.main(["--config", str(cfg), "set", "sliced", "--sm", "40"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert (
        files.read_limits(files.slot_path(run_dir, "on-mps") / abi.LIMITS_FILE)
        .device[0]
        .sm_requested_centi
        == 4000
    )


# ---- slots of MPS tenants: removed, and refusals that say why ------------------------------


@pytest.fixture
def mps_hook(short_tmp: Path, hook_python: Path) -> Iterator[HookSetup]:
    """The real hook with GPU 1 on mps and its (simulated) daemon running."""
    build()
    driver = _driver_dir(short_tmp / "driver")
    daemon = mpsd.Daemon(short_tmp / "fcsp" / "run", GPU1, str(SIM_CONTROL))
    daemon.ensure(time.monotonic())
    assert mps.ready(daemon.run_dir, GPU1)
    try:
        yield HookSetup.create(
            short_tmp / "fcsp",
            hook_python,
            paths=f'driver_dir = "{driver}"\n[backend]\ngpus = {{ "1" = "mps" }}\n'
            f'mps_control = "{SIM_CONTROL}"\n',
        )
    finally:
        daemon.stop()


def test_an_mps_tenants_slot_is_removed_when_it_stops(mps_hook: HookSetup, rootfs: Path) -> None:
    """The mps/ directory in an MPS tenant's slot no longer keeps poststop from removing
    the slot: after `podman run --rm` nothing is left under the run directory."""
    done = podman(
        mps_hook,
        rootfs,
        ["/bin/sh", "-c", "ls -A /run/fcsp/mps"],
        {"fcsp.sm": "40"},
        {"NVIDIA_VISIBLE_DEVICES": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "control\n"
    assert mps_hook.slots() == []
    assert "could not be removed" not in mps_hook.log_file.read_text()


def test_the_hook_sets_the_thread_ceiling_before_the_container_runs(
    mps_hook: HookSetup, rootfs: Path
) -> None:
    """A strict 30 % container on the MPS GPU: by the time its first process runs, the
    daemon lets no client have more than 30 % of the SMs, so one that bypasses the shim
    and asks for 100 % gets 30 %."""
    done = podman(
        mps_hook,
        rootfs,
        ["/bin/sh", "-c", "true"],
        {"fcsp.sm": "30", "fcsp.mode": "strict"},
        {"NVIDIA_VISIBLE_DEVICES": "1"},
    )
    assert done.returncode == 0, done.stderr
    log = mps.gpu_dir(mps_hook.run_dir, GPU1) / "log"
    assert (
        "set_default_active_thread_percentage 30 (privileged)" in (log / "control.log").read_text()
    )
    bypass = Env(
        state=mps_hook.run_dir.parent / "sim",
        extra={
            "CUDA_MPS_PIPE_DIRECTORY": str(mps.client_dir(mps_hook.run_dir, GPU1)),
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100",
        },
    )
    assert run(bypass, "init", preload=False).field("init") == ["init", "0"]
    assert _granted(log) == [30]


def test_a_refused_mps_container_says_why_in_one_line(mps_hook: HookSetup, rootfs: Path) -> None:
    """A container the hook refuses on an MPS GPU (its image links /etc/ld.so.preload to a
    host file) is told the real reason, not "internal error: OSError" (the slot's cleanup
    used to fail on mps/ and hide it), and its slot is gone."""
    (rootfs / "etc" / "ld.so.preload").symlink_to("/etc/passwd")
    done = podman(
        mps_hook,
        rootfs,
        ["/bin/sh", "-c", "true"],
        {"fcsp.sm": "40"},
        {"NVIDIA_VISIBLE_DEVICES": "1"},
    )
    assert done.returncode != 0
    assert "/etc/ld.so.preload in the image is a symlink" in done.stderr
    assert "internal error" not in done.stderr
    hook_lines = [line for line in done.stderr.split("stderr: ")[-1].splitlines() if line.strip()]
    assert len(hook_lines) == 1
    assert mps_hook.slots() == []


def test_an_mps_client_directory_that_is_a_link_means_time_slicing(
    mps_hook: HookSetup, rootfs: Path
) -> None:
    """A client directory the hook would refuse to mount (a link where the observer makes a
    directory) is no MPS daemon to the hook: the container starts, time-sliced, and says
    so in the log, instead of failing with "internal error: OSError"."""
    client = mps.client_dir(mps_hook.run_dir, GPU1)
    client.rename(client.with_name("client.real"))
    client.symlink_to("client.real")
    done = podman(
        mps_hook,
        rootfs,
        ["/bin/sh", "-c", "ls -A /run/fcsp"],
        {"fcsp.sm": "40"},
        {"NVIDIA_VISIBLE_DEVICES": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "mps" not in done.stdout.split()
    assert "no daemon serves it" in mps_hook.log_file.read_text()
    assert mps_hook.slots() == []
