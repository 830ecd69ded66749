"""The MPS backend's layout and arithmetic, shared by the hook and fcsp-observer.

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
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from fcsp_hook.errors import FcspError
from fcsp_hook.slot import abi, files

MPS_SUBDIR = "mps"
CONTROL = "control"
STATE_FILE = "state"
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
            limits = files.read_limits(entry / abi.LIMITS_FILE)
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


def backend_name(value: int) -> str:
    try:
        return abi.Backend(value).name.lower()
    except ValueError:
        return f"unknown({value})"
