"""<run_dir>/gpus.json: the host's GPUs as fcsp-observer reads them from NVML (UUID, minor,
memory total), for the hook, which never initialises NVML itself and cannot learn a GPU's
memory from the driver's procfs.  The observer writes it at start; admission reads it to
add hard memory quotas up against each GPU's total.

    {"gpus": [{"uuid": "GPU-...", "minor": 0, "memory_total_bytes": 150000000000}, ...]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

FILE = "gpus.json"
_MAX_BYTES = 1 << 20


def write(run_dir: Path, gpus: Iterable[tuple[str, int, int]]) -> None:
    """Replace the file with (uuid, minor, memory total) per GPU, atomically (OSError)."""
    path = run_dir / FILE
    tmp = path.with_name(f".{FILE}.tmp")
    doc = {
        "gpus": [
            {"uuid": uuid, "minor": minor, "memory_total_bytes": total}
            for uuid, minor, total in gpus
        ]
    }
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def read(run_dir: Path) -> tuple[dict[str, int], dict[int, str]]:
    """(memory total per GPU UUID, UUID per minor) as fcsp-observer last read them; empty
    when it has not (host-written, but read with a bound all the same)."""
    totals: dict[str, int] = {}
    minors: dict[int, str] = {}
    try:
        fd = os.open(run_dir / FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            raw = os.read(fd, _MAX_BYTES + 1)
        finally:
            os.close(fd)
        doc = json.loads(raw) if len(raw) <= _MAX_BYTES else {}
    except (OSError, ValueError):
        return totals, minors
    gpus = doc.get("gpus") if isinstance(doc, dict) else None
    for gpu in gpus if isinstance(gpus, list) else []:
        if not isinstance(gpu, dict):
            continue
        uuid, minor, total = gpu.get("uuid"), gpu.get("minor"), gpu.get("memory_total_bytes")
        if not isinstance(uuid, str) or not uuid:
            continue
        if isinstance(total, int) and total > 0:
            totals[uuid] = total
        if isinstance(minor, int) and minor >= 0:
            minors[minor] = uuid
    return totals, minors


def gpu_key(uuid: str, host_index: int, minors: Mapping[int, str]) -> str:
    """A host GPU by one name wherever FCSP counts per GPU: its UUID, else the UUID NVML
    gives its minor, else nvidia<minor>; '' for one nobody can name."""
    if uuid:
        return uuid
    if host_index >= 0:
        return minors.get(host_index, f"nvidia{host_index}")
    return ""
