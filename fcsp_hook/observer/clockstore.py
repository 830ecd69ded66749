"""The full-load SM clocks fcsp-observer learned, kept across its restarts and reboots.

A GPU's full-load clock can be learned only while the GPU is saturated
(policy.learn_full_load_clock).  A host whose tenants are all throttled may not saturate
it again for hours, and until the clock is known clock normalisation does nothing, so
the observer keeps what it learned in <state_dir>/clocks.json: {"GPU-uuid": MHz, ...}.
The file is the observer's own, but it is read like any input: a file that is not such
a map, or values out of range, are ignored (with the reason) and learning starts over.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

FILE = "clocks.json"
MIN_MHZ = 100.0
MAX_MHZ = 10000.0
MAX_GPUS = 64
MAX_BYTES = 16384


def load(state_dir: Path) -> tuple[dict[str, float], str]:
    """(clocks by GPU UUID, "" or why the file was not used).  No file: ({}, "")."""
    path = state_dir / FILE
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return {}, ""
    except OSError as exc:
        return {}, f"{path}: {exc.strerror}"
    try:
        data = json.loads(raw) if len(raw) <= MAX_BYTES else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or len(data) > MAX_GPUS:
        return {}, f"{path}: not a JSON map of at most {MAX_GPUS} GPU UUIDs to MHz"
    for uuid, mhz in data.items():
        if not _valid(uuid, mhz):
            return {}, f"{path}: {uuid!r}: expected a GPU UUID and MHz from 100 to 10000"
    return {uuid: float(mhz) for uuid, mhz in data.items()}, ""


def _valid(uuid: object, mhz: object) -> bool:
    return (
        isinstance(uuid, str)
        and uuid.startswith("GPU-")
        and len(uuid) <= 64
        and isinstance(mhz, int | float)
        and not isinstance(mhz, bool)
        and MIN_MHZ <= mhz <= MAX_MHZ
    )


def save(state_dir: Path, clocks: dict[str, float]) -> str:
    """Write the clocks atomically; "" or why it failed (the observer goes on without)."""
    path = state_dir / FILE
    tmp = state_dir / f".{FILE}.{os.getpid()}"
    try:
        state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp.write_text(json.dumps({u: round(m, 1) for u, m in sorted(clocks.items())}) + "\n")
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return f"{path}: {exc.strerror}"
    return ""
