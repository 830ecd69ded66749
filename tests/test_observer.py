"""fcsp-observer as a real process over real slot files, with shims simulated by the test.

Each test creates slots with fcsp_hook.slot.write_slot in a temporary run_dir, starts
`python -m fcsp_hook.observer`, plays the shim's part by writing usage counters, and
waits (generously) for the observer to react.  Nothing asserts a duration.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fcsp_hook import observer
from fcsp_hook.ctl import main as ctl
from fcsp_hook.slot import abi, files, live

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0
_DEV = abi.Usage.device.offset
_PROC = abi.Usage.proc.offset
_PROC_SIZE = ctypes.sizeof(abi.UsageProc)


def wait_for(what: str, predicate: Callable[[], object], timeout: float = TIMEOUT) -> None:
    """Poll until predicate() is true; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for: {what}")


@dataclass
class Host:
    """A run_dir with tenants, a config.toml, and the observer process."""

    root: Path
    config_text: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def log(self) -> Path:
        return self.root / "observer.log"

    def write_config(self, observer_extra: str = "", metrics_port: int = 0) -> None:
        self.config.write_text(
            f'[paths]\nrun_dir = "{self.run_dir}"\nstate_dir = "{self.root / "state"}"\n'
            "[observer]\ninterval_ms = 10\nidle_window_ms = 300\nreap_interval_ms = 200\n"
            f"metrics_port = {metrics_port}\n{observer_extra}"
        )

    def add(
        self,
        cid: str,
        sm: int = 2500,
        mode: abi.IsolationMode = abi.IsolationMode.BALANCED,
        host_index: int = 0,
        mem: int = 0,
        *,
        priority: abi.Priority = abi.Priority.BEST_EFFORT,
        uuid: str = "",
        backend: abi.Backend = abi.Backend.TIMESLICE,
    ) -> Path:
        files.ensure_tenants_dir(self.run_dir)
        directory = files.slot_path(self.run_dir, cid)
        spec = files.SlotSpec(
            container_id=cid,
            tenant=f"team-{cid}",
            isolation_mode=mode,
            priority=priority,
            devices=(
                files.DeviceLimits(
                    host_index=host_index,
                    uuid=uuid,
                    sm_requested_centi=sm,
                    mem_limit_bytes=mem,
                    backend=backend,
                ),
            ),
        )
        files.write_slot(directory, spec, {})
        return directory

    def set_init(self, cid: str, pid: int, start_time: int) -> None:
        """What the hook records at prestart: the container's init process on the host."""
        limits = live.LimitsMap(files.slot_path(self.run_dir, cid) / abi.LIMITS_FILE)
        try:
            with limits.update() as view:
                view.init_host_pid = pid
                view.init_start_time = start_time
        finally:
            limits.close()

    def limits(self, cid: str) -> abi.Limits:
        return files.read_limits(files.slot_path(self.run_dir, cid) / abi.LIMITS_FILE)

    def effective(self, cid: str) -> int:
        return int(self.limits(cid).device[0].sm_effective_centi)

    def heartbeat(self, cid: str) -> int:
        return int(self.limits(cid).observer_heartbeat_ns)

    def state(self) -> dict[str, object]:
        try:
            doc = json.loads((self.run_dir / observer.STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def start(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        if not self.config.exists():
            self.write_config()
        full_env = {
            k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC"}
        }
        full_env.update({"PYTHONPATH": str(REPO), **(env or {})})
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fcsp_hook.observer", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env=full_env,
                cwd=REPO,
            )
        self.procs.append(proc)
        return proc

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=TIMEOUT)


class Shim:
    """Plays a tenant's libvgpu.so: bumps its usage counters while `busy` is set, with
    launches of kernel_ns each."""

    def __init__(self, directory: Path, kernel_ns: int = 100_000) -> None:
        self.fd = os.open(directory / abi.USAGE_FILE, os.O_RDWR)
        self.kernel_ns = kernel_ns
        self.launches = self.busy_ns = self.busy_sq = self.throttled_ns = 0
        self.mem = 0

    def report(self, busy_ns: int = 2_000_000, throttled_ns: int = 3_000_000) -> None:
        self.launches = (self.busy_ns + busy_ns) // self.kernel_ns
        self.busy_sq += busy_ns * (self.kernel_ns >> 10) ** 2 // self.kernel_ns
        self.busy_ns += busy_ns
        self.throttled_ns += throttled_ns
        fields = struct.pack(
            "<9Q",
            self.mem,
            self.mem,
            0,
            0,
            self.launches,
            self.launches,
            self.busy_ns,
            self.throttled_ns,
            0,
        )
        os.pwrite(self.fd, fields, _DEV)
        os.pwrite(self.fd, struct.pack("<Q", self.busy_sq), _DEV + abi.UsageDevice.busy_sq.offset)

    def add_process(self, index: int, pid: int, mem: int = 0) -> None:
        record = struct.pack("<IiQQ", abi.ProcState.LIVE, pid, 0, 1) + struct.pack(
            f"<{abi.MAX_DEVICES}Q", mem, *([0] * (abi.MAX_DEVICES - 1))
        )
        os.pwrite(self.fd, record, _PROC + index * _PROC_SIZE)

    def close(self) -> None:
        os.close(self.fd)


class Workload(threading.Thread):
    """Every 5 ms, each busy tenant reports launches, GPU time and time spent throttled."""

    def __init__(self, shims: dict[str, Shim]) -> None:
        super().__init__(daemon=True)
        self.shims = shims
        self.busy: set[str] = set(shims)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.005):
            for cid in list(self.busy):
                self.shims[cid].report()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    yield h
    h.stop_all()


@pytest.fixture
def workload() -> Iterator[Callable[[dict[str, Shim]], Workload]]:
    started: list[Workload] = []

    def start(shims: dict[str, Shim]) -> Workload:
        w = Workload(shims)
        w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        w.halt.set()
        w.join()


def _four_tenants(host: Host) -> dict[str, Shim]:
    return {cid: Shim(host.add(cid)) for cid in ("a", "b", "c", "d")}


def test_workday_pattern_end_to_end(
    host: Host, workload: Callable[[dict[str, Shim]], Workload]
) -> None:
    """4 busy tenants at 25 %: 25 each; one idles: 33; three idle: the last one gets ~all
    (97 %: each idle tenant keeps 1 % to wake on); an idle one that starts gets its share back."""
    shims = _four_tenants(host)
    load = workload(shims)
    host.start()
    wait_for("25 % each", lambda: [host.effective(c) for c in "abcd"] == [2500] * 4)
    load.busy.discard("d")
    wait_for(
        "33 % each, d idle",
        lambda: [host.effective(c) for c in "abcd"] == [3300, 3300, 3300, 100],
    )
    load.busy -= {"b", "c"}
    wait_for("a alone gets the GPU", lambda: host.effective("a") == 9700)
    assert sum(host.effective(c) for c in "abcd") <= abi.WHOLE_GPU_CENTI
    load.busy.add("d")
    wait_for("d reclaims its share", lambda: host.effective("d") >= 2500)
    assert sum(host.effective(c) for c in "abcd") <= abi.WHOLE_GPU_CENTI


def test_sigterm_gives_tenants_their_requests_back(
    host: Host, workload: Callable[[dict[str, Shim]], Workload]
) -> None:
    """On SIGTERM: exit 0, each tenant's share is its request again, heartbeat 0, no state."""
    shims = {"a": Shim(host.add("a", sm=3000)), "b": Shim(host.add("b", sm=3000))}
    load = workload(shims)
    load.busy = {"a"}
    proc = host.start()
    wait_for("a borrows b's idle share", lambda: host.effective("a") > 3000)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT) == 0
    assert host.effective("a") == 3000 and host.effective("b") == 3000
    assert host.heartbeat("a") == 0 and host.heartbeat("b") == 0
    assert not (host.run_dir / observer.STATE_FILE).exists()
    assert '"stopping"' in host.log_text()


def test_sighup_reloads_and_keeps_the_old_config_when_bad(host: Host) -> None:
    """SIGHUP with a bad config.toml: one clear log line, old config kept, still ticking.
    SIGHUP with a good one: applied (here: idle tenants' wake-up share 1 % -> 5 %)."""
    host.add("a")
    host.add("b")
    proc = host.start()
    wait_for("both idle at 1 %", lambda: host.effective("a") == host.effective("b") == 100)
    host.config.write_text("[observer]\ninterval_ms = 'fast'\n")
    proc.send_signal(signal.SIGHUP)
    wait_for("rejection logged", lambda: "config reload rejected" in host.log_text())
    assert "interval_ms = 'fast' is invalid" in host.log_text()
    beat = host.heartbeat("a")
    wait_for("still ticking", lambda: host.heartbeat("a") > beat)
    assert proc.poll() is None
    host.write_config("idle_share_pct = 5\n")
    proc.send_signal(signal.SIGHUP)
    wait_for("new idle share", lambda: host.effective("a") == 500)
    assert '"config reloaded"' in host.log_text()


def test_sd_notify_protocol_on_a_real_socket(host: Host) -> None:
    """READY=1 with a STATUS line, WATCHDOG=1 pings, RELOADING=1 on SIGHUP, STOPPING=1."""
    host.add("a")
    address = str(host.root / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(TIMEOUT)
    messages: list[str] = []

    def receive_until(needle: str) -> None:
        while not any(needle in m for m in messages):
            messages.append(sock.recv(4096).decode())

    try:
        proc = host.start({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
        receive_until("READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=1 tenant on 1 GPU, contention 0.00" in ready.splitlines()
        receive_until("WATCHDOG=1")
        proc.send_signal(signal.SIGHUP)
        receive_until("RELOADING=1")
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in messages)
        proc.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        sock.close()


def test_hostile_usage_files_do_not_stop_the_observer(
    host: Host, workload: Callable[[dict[str, Shim]], Workload]
) -> None:
    """A truncated usage file and absurd counters are survived: every tenant keeps getting
    heartbeats and the shares still fit the GPU."""
    shims = _four_tenants(host)
    load = workload({k: v for k, v in shims.items() if k in "ab"})
    assert load.is_alive()
    host.start()
    wait_for("running", lambda: host.heartbeat("d") > 0)
    os.truncate(files.slot_path(host.run_dir, "c") / abi.USAGE_FILE, 10)
    os.pwrite(shims["d"].fd, struct.pack("<9Q", *([2**64 - 1] * 9)), _DEV)
    wait_for("complaint logged", lambda: "usage unreadable" in host.log_text())
    beats = {c: host.heartbeat(c) for c in "abcd"}
    wait_for("heartbeats go on", lambda: all(host.heartbeat(c) > beats[c] for c in "abcd"))
    assert sum(host.effective(c) for c in "abcd") <= abi.WHOLE_GPU_CENTI


def test_a_restarted_observer_rebuilds_from_the_slots(
    host: Host, workload: Callable[[dict[str, Shim]], Workload]
) -> None:
    """After SIGKILL a new observer picks up every tenant and reaches the same shares."""
    shims = _four_tenants(host)
    load = workload(shims)
    load.busy = {"a", "b", "c"}
    first = host.start()
    wait_for("33 % each", lambda: [host.effective(c) for c in "abc"] == [3300] * 3)
    first.kill()
    first.wait()
    beat = host.heartbeat("a")
    host.start()
    wait_for("heartbeat resumes", lambda: host.heartbeat("a") > beat)
    wait_for(
        "same shares again",
        lambda: [host.effective(c) for c in "abcd"] == [3300, 3300, 3300, 100],
    )


def test_fcspctl_set_resizes_a_running_tenant(
    host: Host,
    workload: Callable[[dict[str, Shim]], Workload],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """set --sm/--mem/--mode changes the slot in place and the observer applies it; a bad
    value is refused with the annotation's one-line message."""
    shims = {"alpha": Shim(host.add("alpha")), "beta": Shim(host.add("beta"))}
    workload(shims)
    host.start()
    wait_for("running", lambda: host.heartbeat("alpha") > 0)
    generation = host.limits("alpha").generation
    cfg = ["--config", str(host.config)]
    assert ctl.main([*cfg, "set", "alp", "--sm", "60", "--mem", "1G", "--mode", "strict"]) == 0
    limits = host.limits("alpha")
    assert limits.device[0].sm_requested_centi == 6000
    assert limits.device[0].mem_limit_bytes == 1 << 30
    assert limits.isolation_mode == abi.IsolationMode.STRICT
    assert limits.generation == generation + 1 and limits.seq % 2 == 0
    wait_for("strict 60 % in force", lambda: host.effective("alpha") == 6000)
    assert ctl.main([*cfg, "set", "team-beta", "--sm", "abc"]) == 1
    err = capsys.readouterr().err
    assert 'annotation fcsp.sm="abc" is invalid: expected a percentage' in err
    assert ctl.main([*cfg, "set", "nobody", "--sm", "10"]) == 1


def test_fcspctl_set_without_observer_sets_the_share_itself(host: Host) -> None:
    """With no observer heartbeat, set also writes the effective share (no one else will)."""
    host.add("solo")
    host.write_config()
    assert ctl.main(["--config", str(host.config), "set", "solo", "--sm", "12.5"]) == 0
    assert host.effective("solo") == 1250


def test_fcspctl_status_and_top_show_the_observer(
    host: Host,
    workload: Callable[[dict[str, Shim]], Workload],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """status shows the observer line, each tenant's state and throttling; top redraws it;
    doctor reports the observer as running."""
    shims = {"busy1": Shim(host.add("busy1")), "idle1": Shim(host.add("idle1"))}
    load = workload(shims)
    load.busy = {"busy1"}
    host.start()
    wait_for("idle1 idle", lambda: host.effective("idle1") == 100)
    wait_for("state published", lambda: host.state().get("tenants", {}).get("idle1"))  # type: ignore[union-attr]
    # On a loaded machine the busy tenant's reports can pause past the idle window.
    wait_for("busy1 active", lambda: host.state()["tenants"]["busy1"]["active"] == [True])  # type: ignore[index]
    cfg = ["--config", str(host.config)]
    assert ctl.main([*cfg, "status"]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[0]: line for line in out.splitlines() if line.startswith(("busy1", "idle1"))
    }
    assert " active " in rows["busy1"] and " idle " in rows["idle1"]
    assert "fcsp-observer pid" in out and "heartbeat" in out
    assert ctl.main([*cfg, "top", "--count", "2", "--interval", "0"]) == 0
    assert capsys.readouterr().out.count("fcspctl top") == 2
    ctl.main([*cfg, "doctor"])
    assert "[ok] observer" in capsys.readouterr().out


def test_prometheus_metrics_on_localhost(host: Host) -> None:
    """/metrics on 127.0.0.1:<metrics_port> has per tenant and GPU shares and memory."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host.add("m1", sm=4000, mem=8 << 30)
    host.write_config(metrics_port=port)
    host.start()
    body = ""

    def scraped() -> bool:
        nonlocal body
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                body = r.read().decode()
        except OSError:
            return False
        return 'container_id="m1"' in body

    wait_for("metrics served", scraped)
    samples = dict(
        line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#")
    )
    # pod, namespace, container: empty outside Kubernetes
    labels = '{container="",container_id="m1",gpu="nvidia0",namespace="",pod="",tenant="team-m1"}'
    assert float(samples[f"fcsp_sm_requested_ratio{labels}"]) == 0.4
    assert float(samples[f"fcsp_memory_quota_bytes{labels}"]) == 8 << 30
    assert float(samples[f"fcsp_sm_effective_ratio{labels}"]) > 0
    assert "fcsp_throttled_seconds_total" in body and "fcsp_busy_seconds_total" in body
    assert float(samples[f"fcsp_turn_ratio{labels}"]) == 0  # alone: nobody to take turns with


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit (ExecStart pointed at an existing binary)."""
    unit = (REPO / "systemd" / "fcsp-observer.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "Restart=on-failure" in unit
    assert "ExecStart=/opt/fcsp/venv/bin/fcsp-observer" in unit
    local = tmp_path / "fcsp-observer.service"
    local.write_text(unit.replace("/opt/fcsp/venv/bin/fcsp-observer", sys.executable))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "fcsp-observer.service" not in result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_mps_drop_in_verifies(tmp_path: Path) -> None:
    """The drop-in for MPS hosts loads with the unit and every key in it is known."""
    unit = (REPO / "systemd" / "fcsp-observer.service").read_text()
    local = tmp_path / "fcsp-observer.service"
    local.write_text(unit.replace("/opt/fcsp/venv/bin/fcsp-observer", sys.executable))
    drop_in = tmp_path / "fcsp-observer.service.d" / "mps.conf"
    drop_in.parent.mkdir()
    drop_in.write_text((REPO / "systemd" / "fcsp-observer-mps.conf").read_text())

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemd-analyze", "verify", str(local)],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
        )

    result = verify()
    assert result.returncode == 0, result.stderr
    assert "mps.conf" not in result.stderr and "fcsp-observer" not in result.stderr
    # The drop-in really is read: an unknown key in it is reported.
    drop_in.write_text(drop_in.read_text() + "NoSuchKey=1\n")
    assert "mps.conf" in verify().stderr
