"""How much device memory a bare CUDA context takes on each GPU: measured, not guessed.

NVML counts a process's context (and the modules the driver loads into it) in its memory;
the shim's quota does not, since no allocation of the tenant's made it.  The NVML check
allows each process that much past the quota.  It depends on the GPU and the driver, so
the observer measures it: a probe process (never under the shim) makes one context on a
GPU and holds it while NVML is asked what the probe uses there.  Measurements are kept in
<state_dir>/contexts.json per GPU and driver version, so a restart need not measure again.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fcsp_hook import nvml

FILE = "contexts.json"
PROBE_ALLOC = 1 << 20  # the probe's one allocation: contexts are made lazily, this makes it
TIMEOUT_S = 20.0
# Runs as `python -I -c PROBE <uuid> <bytes>`: a context on the GPU of that UUID, one allocation,
# "ready", then it waits for stdin to close.
PROBE = """
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
def ok(rc):
    if rc:
        sys.exit(f"CUDA error {rc}")
ok(cuda.cuInit(0))
count = ctypes.c_int()
ok(cuda.cuDeviceGetCount(ctypes.byref(count)))
for ordinal in range(count.value):
    dev, raw = ctypes.c_int(), (ctypes.c_ubyte * 16)()
    ok(cuda.cuDeviceGet(ctypes.byref(dev), ordinal))
    ok(cuda.cuDeviceGetUuid(raw, dev))
    h = bytes(raw).hex()
    if f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" == sys.argv[1]:
        break
else:
    sys.exit("no such GPU")
ctx, ptr = ctypes.c_void_p(), ctypes.c_uint64()
ok(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
ok(cuda.cuCtxSetCurrent(ctx))
ok(cuda.cuMemAlloc_v2(ctypes.byref(ptr), int(sys.argv[2])))
print("ready", flush=True)
sys.stdin.read()
"""


def load(state_dir: Path, driver: str) -> dict[str, int]:
    """What was measured under this driver before; {} when nothing (or a bad file)."""
    try:
        doc = json.loads((state_dir / FILE).read_text()[: 1 << 20])
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("driver") != driver:
        return {}
    gpus = doc.get("gpus")
    if not isinstance(gpus, dict):
        return {}
    return {
        str(uuid): value
        for uuid, value in gpus.items()
        if isinstance(value, int) and 0 <= value < 1 << 40
    }


def save(state_dir: Path, driver: str, measured: dict[str, int]) -> str:
    """Keep the measurements; the problem in one line, or ''."""
    try:
        state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = state_dir / f".{FILE}.tmp"
        tmp.write_text(json.dumps({"driver": driver, "gpus": measured}))
        os.replace(tmp, state_dir / FILE)
    except OSError as exc:
        return f"{state_dir / FILE}: {exc.strerror}"
    return ""


def measure(nv: nvml.Nvml, gpus: Sequence[nvml.GpuInfo]) -> dict[str, int]:
    """A probe per GPU, all at once; each GPU's context in bytes as NVML counts it.  A GPU
    whose probe fails is left out (its processes get only the configured allowance)."""
    probes: dict[str, subprocess.Popen[str]] = {}
    for gpu in gpus:
        with contextlib.suppress(OSError):
            probes[gpu.uuid] = subprocess.Popen(
                [sys.executable, "-I", "-c", PROBE, gpu.uuid, str(PROBE_ALLOC)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
    measured: dict[str, int] = {}
    deadline = time.monotonic() + TIMEOUT_S  # a driver that hangs must not hang the observer
    try:
        for uuid, probe in probes.items():
            if not _ready(probe, deadline):
                continue
            while time.monotonic() < deadline and uuid not in measured:
                listed = nv.processes([g for g in gpus if g.uuid == uuid]).get(uuid, [])
                for proc in listed:
                    if proc.host_pid == probe.pid and proc.used_bytes:
                        measured[uuid] = max(proc.used_bytes - PROBE_ALLOC, 0)
                if uuid not in measured:
                    time.sleep(0.05)
    finally:
        for probe in probes.values():
            probe.kill()
            probe.communicate()
    return measured


def _ready(probe: subprocess.Popen[str], deadline: float) -> bool:
    if probe.stdout is None:
        return False
    readable, _, _ = select.select([probe.stdout], [], [], max(deadline - time.monotonic(), 0))
    return bool(readable) and probe.stdout.readline().strip() == "ready"
