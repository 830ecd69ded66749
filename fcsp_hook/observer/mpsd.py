"""One NVIDIA MPS control daemon per GPU, started and watched by fcsp-observer.

The daemon runs with -d and is found again through its pid file, so a restarted observer
adopts it instead of tearing down every client on the GPU.  Faults are read from
server.log: a client's fatal GPU error tears down every client of the server (MPS shares
one GPU context), and the observer restarts the daemon after it.  The layout of the
directories and what tenants see of them: fcsp_hook/mps.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fcsp_hook import mps, procfs
from fcsp_hook.errors import SlotError
from fcsp_hook.mps import CONTROL, STATE_FILE, fault_pids, gpu_dir
from fcsp_hook.slot import files

PID_FILE = "nvidia-cuda-mps-control.pid"
SERVER_LOG = "server.log"
# /proc/<pid>/comm of nvidia-cuda-mps-control and nvidia-cuda-mps-server (15 characters).
COMM_PREFIX = "nvidia-cuda-mps"
# The observer's loop waits for these: together they stay well inside the 10 s systemd
# watchdog (WatchdogSec in fcsp-observer.service), which the loop feeds between ticks.
START_TIMEOUT_S = 4.0  # nvidia-cuda-mps-control -d forks and returns at once
READY_TIMEOUT_S = 3.0  # then its control socket appears (well under a second)
QUIT_TIMEOUT_S = 2.0  # quit, and again for the daemon to be gone before SIGKILL
RETRY_AFTER_S = 30.0
LOG_READ_MAX = 1 << 20
SOCKET_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path)


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
    threads_pct: int = 0  # the most it lets any client have; 0: its default, all of it


class _Silent:
    def info(self, *_: object, **__: object) -> None: ...
    def error(self, *_: object, **__: object) -> None: ...


def is_mps_process(pid: int) -> bool:
    """An MPS control daemon or server (NVML lists the server among compute processes)."""
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
    log: Any = None  # the observer's structlog logger; None: silent (a one-off stop)
    state: DaemonState = field(init=False)
    log_offsets: dict[Path, int] = field(default_factory=dict)
    next_try: float = 0.0
    ceiling_retry: float = 0.0  # after the daemon refused a thread ceiling

    def __post_init__(self) -> None:
        self.state = DaemonState(self.uuid)
        if self.log is None:
            self.log = _Silent()

    @property
    def root(self) -> Path:
        return gpu_dir(self.run_dir, self.uuid)

    def _env(self) -> dict[str, str]:
        return mps.control_env(self.run_dir, self.uuid)

    def _pid_from_file(self) -> int:
        try:
            return int((self.root / "pipe" / PID_FILE).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def ensure(self, now: float) -> None:
        """Called every few ticks: keep a daemon running, or report why there is none.  Its
        clients get the socket once their thread ceiling is in force (hold_threads)."""
        if self.state.pid and is_mps_process(self.state.pid):
            self._read_log()
        else:
            self._restart(now)
        # backend "mps" once the control socket is in the client directory for tenants
        if self.state.pid and self.hold_threads(now) and self.state.backend != "mps":
            self._link_client()
            self.write_state()

    def _restart(self, now: float) -> None:
        if self.state.pid:
            self.log.error("MPS daemon died; restarting", gpu=self.uuid, pid=self.state.pid)
            self.state.pid = 0
            self.state.restarts += 1
            self._unlink_client()
        if now < self.next_try:
            return
        adopted = self._pid_from_file()
        if is_mps_process(adopted):  # it keeps its settings
            self.state.pid = adopted
            self._skip_old_log()
            self.log.info("MPS daemon adopted", gpu=self.uuid, pid=adopted)
        else:
            mps.forget_ceiling(self.run_dir, self.uuid)
            self._start(now)
        self.write_state()

    def hold_threads(self, now: float) -> bool:
        """Set what the daemon lets every client of the GPU use to the most its tenants'
        slots grant, if that changed: the hook raises it as a tenant comes, this lowers it
        as they go.  Whether it is in force: not while a container start holds the slots
        lock (the next check does it); when the daemon refuses, it says so and lets
        clients in regardless, every RETRY_AFTER_S."""
        if now < self.ceiling_retry:
            return True
        try:
            with files.slots_locked(self.run_dir, timeout_s=0):
                if set_pct := mps.hold_ceiling(self.run_dir, self.uuid, self.program):
                    self.log.info("MPS clients held to the GPU's largest grant", gpu=self.uuid,
                                  threads_pct=set_pct)  # fmt: skip
                # the record is the hook's as much as ours: what is in force, whoever set it
                threads = mps.recorded_ceiling(self.run_dir, self.uuid)
                if threads != self.state.threads_pct:
                    self.state.threads_pct = threads
                    self.write_state()
        except SlotError:
            return False
        except (mps.MpsError, OSError) as exc:
            self.ceiling_retry = now + RETRY_AFTER_S
            self.log.error(
                "MPS daemon refused the thread ceiling: a client that bypasses the shim "
                "sets its own",
                gpu=self.uuid,
                error=str(exc),
            )
        return True

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
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            pid = self._pid_from_file()
            if (self.root / "pipe" / CONTROL).is_socket() and is_mps_process(pid):
                self.state = DaemonState(
                    self.uuid,
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
        while is_mps_process(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_mps_process(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        self.write_state()

    def write_state(self) -> None:
        with contextlib.suppress(OSError):
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{STATE_FILE}.tmp"
            tmp.write_text(json.dumps(asdict(self.state)))
            os.replace(tmp, self.root / STATE_FILE)
