"""Reading /proc: a process's state and start time, which with its pid name it uniquely."""

from __future__ import annotations

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
