"""The MPS backend: one NVIDIA MPS control daemon per GPU, started and watched by fcsp-observer.

Host layout, under <run_dir>/mps/<gpu-uuid>/:

  pipe/    the daemon's CUDA_MPS_PIPE_DIRECTORY (0700): control, control_privileged, ...
  log/     its CUDA_MPS_LOG_DIRECTORY (control.log, server.log)
  client/  0755, holding only a hard link to pipe/control.  This is what a tenant gets,
           mounted read-only at /run/fcsp/mps.  Measured on the H200
           (bench/results/2026-11-29-mps-facts.md): a client needs nothing but that
           socket, and through it the daemon refuses quit and every setting, which need
           control_privileged, even to root.  A hard link, so that after a restart the
           observer swaps the new socket in and running containers see it.
  state    JSON for fcspctl and the hook: the backend in force, the daemon's pid, restarts,
           faults and the last error.

The daemon runs with -d and is found again through its pid file, so a restarted observer
adopts it instead of tearing down every client on the GPU.  Faults are read from
server.log: a client's fatal GPU error tears down every client of the server (MPS shares
one GPU context), and the observer restarts the daemon after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fcsp_hook import abi, procfs, slot
from fcsp_hook.errors import FcspError

MPS_SUBDIR = "mps"
CONTROL = "control"
PID_FILE = "nvidia-cuda-mps-control.pid"
SERVER_LOG = "server.log"
STATE_FILE = "state"
# /proc/<pid>/comm of nvidia-cuda-mps-control and nvidia-cuda-mps-server (15 characters).
COMM_PREFIX = "nvidia-cuda-mps"
START_TIMEOUT_S = 10.0
QUIT_TIMEOUT_S = 10.0
RETRY_AFTER_S = 30.0
LOG_READ_MAX = 1 << 20
SOCKET_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path)
_FAULT = re.compile(rb"Client \{PID: (\d+)[^}]*\} encountered a fatal GPU error")


def gpu_dir(run_dir: Path, uuid: str) -> Path:
    if not re.fullmatch(r"GPU-[0-9A-Za-z-]{1,64}", uuid):
        raise ValueError(f"{uuid!r} is not a GPU UUID")
    return run_dir / MPS_SUBDIR / uuid


def client_dir(run_dir: Path, uuid: str) -> Path:
    return gpu_dir(run_dir, uuid) / "client"


def ready(run_dir: Path, uuid: str) -> bool:
    """A daemon serves this GPU: its control socket is linked for tenants."""
    try:
        return (client_dir(run_dir, uuid) / CONTROL).is_socket()
    except (OSError, ValueError):
        return False


def read_state(run_dir: Path, uuid: str) -> dict[str, object]:
    try:
        data = json.loads((gpu_dir(run_dir, uuid) / STATE_FILE).read_bytes()[:65536])
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# Best-effort tenants keep at least this much of the SMs, whatever latency tenants reserve.
MIN_THREADS_CENTI = 1000


def threads_centi(
    request_centi: int, mode: abi.IsolationMode, priority: abi.Priority, reserved_centi: int
) -> int:
    """The MPS thread percentage a new tenant gets (1/100 %).

    A latency tenant: its share of the SMs, which best-effort tenants that start after it
    leave free (reserved_centi: what latency tenants already on the GPU requested).
    """
    if priority == abi.Priority.LATENCY:
        return request_centi
    free = max(abi.WHOLE_GPU_CENTI - reserved_centi, MIN_THREADS_CENTI)
    return min(request_centi, free) if mode == abi.IsolationMode.STRICT else free


def latency_reserve(tenants_dir: Path, uuid: str, exclude: str) -> int:
    """What latency tenants on this MPS GPU requested, from their slots (1/100 %)."""
    total = 0
    try:
        entries = list(tenants_dir.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if entry.name == exclude:
            continue
        try:
            limits = slot.read_limits(entry / abi.LIMITS_FILE)
        except (FcspError, OSError):
            continue
        if limits.priority != abi.Priority.LATENCY:
            continue
        for i in range(min(int(limits.device_count), abi.MAX_DEVICES)):
            dev = limits.device[i]
            if dev.backend == abi.Backend.MPS and dev.uuid.decode(errors="replace") == uuid:
                total += min(int(dev.sm_requested_centi), abi.WHOLE_GPU_CENTI)
    return min(total, abi.WHOLE_GPU_CENTI)


def fault_pids(log_chunk: bytes) -> list[int]:
    """Clients whose fatal GPU error the server reports in this piece of server.log."""
    return [int(m.group(1)) for m in _FAULT.finditer(log_chunk)]


@dataclass
class DaemonState:
    uuid: str
    backend: str = "timeslice"  # what tenants of this GPU get now
    pid: int = 0
    started: float = 0.0
    restarts: int = 0
    faults: int = 0
    last_fault: float = 0.0
    error: str = ""


def _is_daemon(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm.startswith(COMM_PREFIX) and procfs.proc_stat(pid) is not None


@dataclass
class Daemon:
    """One GPU's control daemon: start or adopt, watch, restart after a fault or death."""

    run_dir: Path
    uuid: str
    program: str
    log: Any  # the observer's structlog logger
    state: DaemonState = field(init=False)
    log_offsets: dict[Path, int] = field(default_factory=dict)
    next_try: float = 0.0

    def __post_init__(self) -> None:
        self.state = DaemonState(self.uuid)

    @property
    def root(self) -> Path:
        return gpu_dir(self.run_dir, self.uuid)

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CUDA_MPS_PIPE_DIRECTORY": str(self.root / "pipe"),
            "CUDA_MPS_LOG_DIRECTORY": str(self.root / "log"),
            "CUDA_VISIBLE_DEVICES": self.uuid,
        }

    def _pid_from_file(self) -> int:
        try:
            return int((self.root / "pipe" / PID_FILE).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def ensure(self, now: float) -> None:
        """Called every few ticks: keep a daemon running, or report why there is none."""
        if self.state.pid and _is_daemon(self.state.pid):
            self._read_log()
            return
        if self.state.pid:
            self.log.error("MPS daemon died; restarting", gpu=self.uuid, pid=self.state.pid)
            self.state.pid = 0
            self.state.restarts += 1
            self._unlink_client()
        if now < self.next_try:
            return
        adopted = self._pid_from_file()
        if _is_daemon(adopted):
            self.state.pid = adopted
            self._skip_old_log()
            self.log.info("MPS daemon adopted", gpu=self.uuid, pid=adopted)
        else:
            self._start(now)
        if self.state.pid:
            self._link_client()
        self.write_state()

    def _start(self, now: float) -> None:
        program = shutil.which(self.program, path=self._env()["PATH"]) or ""
        if len(os.fsencode(self.root / "pipe" / CONTROL)) >= SOCKET_PATH_MAX:
            self._fail(now, f"{self.root}/pipe/{CONTROL} is too long for a socket path")
            return
        if not program:
            self._fail(now, f"{self.program} not found (set [backend] mps_control)")
            return
        for sub, mode in (("pipe", 0o700), ("log", 0o700), ("client", 0o755)):
            (self.root / sub).mkdir(mode=mode, parents=True, exist_ok=True)
            os.chmod(self.root / sub, mode)
        with contextlib.suppress(FileNotFoundError):
            (self.root / "pipe" / PID_FILE).unlink()
        try:
            done = subprocess.run(  # an operator-configured program, no shell
                [program, "-d"],
                env=self._env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=START_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._fail(now, f"{program} -d: {exc}")
            return
        if done.returncode != 0:
            why = (done.stderr or done.stdout).decode(errors="replace").strip()[-200:]
            self._fail(now, f"{program} -d exited with {done.returncode}: {why}")
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            pid = self._pid_from_file()
            if (self.root / "pipe" / CONTROL).is_socket() and _is_daemon(pid):
                self.state = DaemonState(
                    self.uuid,
                    backend="mps",
                    pid=pid,
                    started=time.time(),
                    restarts=self.state.restarts,
                    faults=self.state.faults,
                    last_fault=self.state.last_fault,
                )
                self._skip_old_log()
                self.log.info("MPS daemon started", gpu=self.uuid, pid=pid)
                return
            time.sleep(0.05)
        self._fail(now, f"{program} -d started no daemon with a control socket in time")

    def _fail(self, now: float, why: str) -> None:
        self.state.backend, self.state.pid, self.state.error = "timeslice", 0, why
        self.next_try = now + RETRY_AFTER_S
        self.log.error(
            "MPS backend unavailable; tenants of this GPU are time-sliced", gpu=self.uuid, error=why
        )

    def _link_client(self) -> None:
        client = self.root / "client"
        tmp = client / f".{CONTROL}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.link(self.root / "pipe" / CONTROL, tmp)
        os.replace(tmp, client / CONTROL)
        self.state.backend, self.state.error = "mps", ""

    def _unlink_client(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / "client" / CONTROL).unlink()
        self.state.backend = "timeslice"

    def _server_logs(self) -> list[Path]:
        # log/server.log, or log/<server>/server.log where the daemon names its servers
        log = self.root / "log"
        return [log / SERVER_LOG, *sorted(log.glob(f"*/{SERVER_LOG}"))]

    def _skip_old_log(self) -> None:
        self.log_offsets = {}
        for path in self._server_logs():
            with contextlib.suppress(OSError):
                self.log_offsets[path] = path.stat().st_size

    def _read_log(self) -> None:
        pids = []
        for path in self._server_logs():
            pids += fault_pids(self._new_bytes(path))
        if pids:
            self.on_fault(pids)

    def _new_bytes(self, path: Path) -> bytes:
        offset = self.log_offsets.get(path, 0)
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < offset:  # rotated or truncated
                    offset = 0
                f.seek(max(offset, size - LOG_READ_MAX))
                chunk = f.read(min(size - offset, LOG_READ_MAX)) if size > offset else b""
        except OSError:
            return b""
        self.log_offsets[path] = size
        return chunk

    def on_fault(self, pids: list[int]) -> None:
        self.state.faults += 1
        self.state.last_fault = time.time()
        self.log.error(
            "MPS client fatal GPU error: every client on this GPU was torn down; "
            "restarting the daemon",
            gpu=self.uuid,
            faulting_pids=pids,
        )
        self.stop()
        self.state.restarts += 1
        self.next_try = 0.0

    def stop(self) -> None:
        """quit through the privileged socket, then SIGKILL whatever is left of the daemon."""
        pid = self.state.pid
        self._unlink_client()
        self.state.pid = 0
        program = shutil.which(self.program, path=self._env()["PATH"])
        if program:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    [program],
                    env=self._env(),
                    input=b"quit\n",
                    capture_output=True,
                    timeout=QUIT_TIMEOUT_S,
                    check=False,
                )
        deadline = time.monotonic() + QUIT_TIMEOUT_S
        while _is_daemon(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _is_daemon(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        self.write_state()

    def write_state(self) -> None:
        with contextlib.suppress(OSError):
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{STATE_FILE}.tmp"
            tmp.write_text(json.dumps(asdict(self.state)))
            os.replace(tmp, self.root / STATE_FILE)


def backend_name(value: int) -> str:
    try:
        return abi.Backend(value).name.lower()
    except ValueError:
        return f"unknown({value})"
