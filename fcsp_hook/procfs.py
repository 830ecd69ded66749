"""Reading /proc: a process's state and start time, which with its pid name it uniquely."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def proc_stat(pid: int, proc: Path = PROC) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a host process, None if it is gone."""
    try:
        data = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start_time: int, proc: Path = PROC) -> bool | None:
    """False only on proof that the process recorded as (pid, start time) is gone (no such
    pid, a zombie, or another start time); None when there is no record (pid <= 0)."""
    if pid <= 0:
        return None
    stat = proc_stat(pid, proc)
    if stat is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass  # there, but not ours to signal: alive
        return True  # /proc unreadable now (descriptors, I/O): no proof
    if stat[0] in {"Z", "X"}:
        return False
    return not (start_time and stat[1] != start_time)


def memory_total(meminfo: Path = PROC / "meminfo") -> int:
    """The host's memory in bytes (MemTotal); 0 when it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemTotal":
                number, _, unit = value.strip().partition(" ")
                return int(number) * (1024 if unit == "kB" else 1)
    except (OSError, ValueError):
        pass
    return 0
