"""The MPS backend's layout, arithmetic and thread ceiling, shared by the hook and
fcsp-observer.

Host layout, under <run_dir>/mps/<gpu-uuid>/ (the daemon itself: observer/mpsd.py):

  pipe/    the daemon's CUDA_MPS_PIPE_DIRECTORY (0700): control, control_privileged, ...
  log/     its CUDA_MPS_LOG_DIRECTORY (control.log, server.log)
  client/  0755, holding only a hard link to pipe/control.  This is what a tenant gets,
           mounted read-only at /run/fcsp/mps.  A client needs nothing but that
           socket, and through it the daemon refuses quit and every setting, which need
           control_privileged, even to root (bench/results/mps-facts.md).  A hard link,
           so that after a restart the observer swaps the new socket in and running
           containers see it.
  state    JSON for fcspctl and the hook: the backend in force, the daemon's pid, restarts,
           faults and the last error.
  threads  the thread percentage the daemon allows every client of the GPU (set_ceiling).

MPS takes a client's thread percentage from the client's own environment, which the shim
sets but a process that bypasses the shim sets as it likes; the daemon's setting for its
servers is the one limit a client can only lower.  It applies to a whole server (all the
GPU's tenants of one user), so it is set to the most any tenant of the GPU was granted, by
the hook as it adds a tenant (before the tenant's code runs) and by fcsp-observer as they
go, both under the slots lock (files.slots_locked) and from the slots on disk.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

from fcsp_hook.errors import FcspError
from fcsp_hook.slot import abi, files

MPS_SUBDIR = "mps"
CONTROL = "control"
STATE_FILE = "state"
THREADS_FILE = "threads"
CONTROL_TIMEOUT_S = 2.0  # one command of nvidia-cuda-mps-control (well under a second)
_FAULT = re.compile(rb"Client \{PID: (\d+)[^}]*\} encountered a fatal GPU error")


def gpu_dir(run_dir: Path, uuid: str) -> Path:
    if not re.fullmatch(r"GPU-[0-9A-Za-z-]{1,64}", uuid):
        raise ValueError(f"{uuid!r} is not a GPU UUID")
    return run_dir / MPS_SUBDIR / uuid


def client_dir(run_dir: Path, uuid: str) -> Path:
    return gpu_dir(run_dir, uuid) / "client"


def ready(run_dir: Path, uuid: str) -> bool:
    """A daemon serves this GPU: its client directory is a directory (not a link, which
    the hook would refuse to mount) holding the control socket."""
    try:
        client = client_dir(run_dir, uuid)
        return stat.S_ISDIR(os.lstat(client).st_mode) and stat.S_ISSOCK(
            os.lstat(client / CONTROL).st_mode
        )
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


def _mps_devices(
    tenants_dir: Path, uuid: str, exclude: str = ""
) -> Iterator[tuple[abi.Limits, abi.LimitsDevice]]:
    """The MPS device entries for this GPU of the single-GPU slots (the only MPS clients:
    shim/mps.c), with their slots' limits."""
    try:
        entries = list(tenants_dir.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name == exclude:
            continue
        try:
            limits = files.read_limits(entry / abi.LIMITS_FILE)
        except (FcspError, OSError):
            continue
        dev = limits.device[0]
        if (
            int(limits.device_count) == 1
            and dev.backend == abi.Backend.MPS
            and dev.uuid.decode(errors="replace") == uuid
        ):
            yield limits, dev


def latency_reserve(tenants_dir: Path, uuid: str, exclude: str) -> int:
    """What latency tenants on this MPS GPU requested, from their slots (1/100 %)."""
    total = sum(
        min(int(dev.sm_requested_centi), abi.WHOLE_GPU_CENTI)
        for limits, dev in _mps_devices(tenants_dir, uuid, exclude)
        if limits.priority == abi.Priority.LATENCY
    )
    return min(total, abi.WHOLE_GPU_CENTI)


def share_in_hardware(mode: int, priority: int) -> bool:
    """Strict or latency: a tenant whose share is its clients' thread percentage, each
    process's cap on the SMs, not throttled by launch timing on top (shim/mps.c)."""
    return mode == abi.IsolationMode.STRICT or (
        priority == abi.Priority.LATENCY and mode != abi.IsolationMode.NONE
    )


def client_threads_centi(mode: int, priority: int, requested_centi: int, granted_centi: int) -> int:
    """The thread percentage the shim makes a tenant's clients ask for (shim/mps.c): strict
    or latency, its share; else all of it; never more than the slot's grant."""
    share = min(requested_centi, abi.WHOLE_GPU_CENTI) or abi.WHOLE_GPU_CENTI
    centi = share if share_in_hardware(mode, priority) else abi.WHOLE_GPU_CENTI
    return min(centi, granted_centi) if granted_centi else centi


def threads_ceiling(tenants_dir: Path, uuid: str, joining_centi: int = 0) -> int:
    """The most any MPS tenant of this GPU was granted (client_threads_centi), or one that
    is joining them, in whole percent (0: none there)."""
    centi = max(
        [
            joining_centi,
            *(
                client_threads_centi(
                    int(limits.isolation_mode),
                    int(limits.priority),
                    int(dev.sm_requested_centi),
                    int(dev.mps_threads_centi),
                )
                for limits, dev in _mps_devices(tenants_dir, uuid)
            ),
        ]
    )
    return math.ceil(centi / abi.CENTI_PER_PERCENT)


def control_env(run_dir: Path, uuid: str) -> dict[str, str]:
    """The environment of this GPU's daemon and of the commands sent to it."""
    root = gpu_dir(run_dir, uuid)
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(root / "log"),
        "CUDA_VISIBLE_DEVICES": uuid,
    }


class MpsError(FcspError):
    """The GPU's control daemon did not take a command."""


def _control(program: str, env: dict[str, str], command: str) -> str:
    try:
        done = subprocess.run(  # an operator-configured program, no shell
            [program],
            env=env,
            input=command + "\n",
            capture_output=True,
            text=True,
            timeout=CONTROL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MpsError(f"{program}: {command}: {exc}") from exc
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip()[-200:]
        raise MpsError(f"{program}: {command}: exit status {done.returncode}: {why}")
    return done.stdout


def recorded_ceiling(run_dir: Path, uuid: str) -> int:
    """The thread percentage last set for the GPU's clients; 0: none since its daemon started."""
    try:
        return int((gpu_dir(run_dir, uuid) / THREADS_FILE).read_text()[:16])
    except (OSError, ValueError):
        return 0


def forget_ceiling(run_dir: Path, uuid: str) -> None:
    """A daemon that starts has the default setting: nothing is set."""
    (gpu_dir(run_dir, uuid) / THREADS_FILE).unlink(missing_ok=True)


def set_ceiling(run_dir: Path, uuid: str, program: str, percent: int) -> None:
    """Let no client of this GPU's daemon use more than `percent` of the SMs, whatever its
    environment asks: the default for the servers it starts from now on, then the setting
    of each one running (which holds for the clients that connect after it).  The caller
    holds the slots lock.  MpsError if the daemon did not take it."""
    env = control_env(run_dir, uuid)
    _control(program, env, f"set_default_active_thread_percentage {percent}")
    now = _control(program, env, "get_default_active_thread_percentage").split()
    try:
        taken = math.isclose(float(now[-1]), percent)
    except (IndexError, ValueError):
        taken = False
    if not taken:
        raise MpsError(f"the daemon kept thread percentage {' '.join(now)!r}, not {percent}")
    servers = [w for w in _control(program, env, "get_server_list").split() if w.isdigit()]
    if servers:  # one command a line, in one run
        sets = (f"set_active_thread_percentage {server} {percent}" for server in servers)
        _control(program, env, "\n".join(sets))
    path = gpu_dir(run_dir, uuid) / THREADS_FILE
    tmp = path.with_name(f".{THREADS_FILE}.tmp")
    tmp.write_text(str(percent))
    os.replace(tmp, path)


def hold_ceiling(run_dir: Path, uuid: str, program: str, joining_centi: int = 0) -> int:
    """Under the slots lock: the GPU's ceiling to threads_ceiling (a joining tenant's grant
    included) where the record says otherwise.  The percent it set; 0: none to set.
    MpsError as set_ceiling."""
    want = threads_ceiling(files.tenants_dir(run_dir), uuid, joining_centi)
    if not want or want == recorded_ceiling(run_dir, uuid):
        return 0
    set_ceiling(run_dir, uuid, program, want)
    return want


def fault_pids(log_chunk: bytes) -> list[int]:
    """Clients whose fatal GPU error the server reports in this piece of server.log."""
    return [int(m.group(1)) for m in _FAULT.finditer(log_chunk)]


def backend_name(value: int) -> str:
    try:
        return abi.Backend(value).name.lower()
    except ValueError:
        return f"unknown({value})"
