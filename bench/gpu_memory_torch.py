"""PyTorch probes for bench/gpu_memory.sh.  Each subcommand prints one JSON object.

quota QUOTA_BYTES   mem_get_info, allocate until OutOfMemoryError, NVML per-process use
context             (native) CUDA context size: NVML per-process use minus torch's reserve
race BYTES BARRIER  wait for BARRIER to exist, allocate BYTES once, hold 2 s, report
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from lib import gpu

CHUNK = 256 << 20


def quota(limit: int) -> dict[str, object]:
    free, total = torch.cuda.mem_get_info()
    held = []
    oom = False
    try:
        while len(held) * CHUNK < 4 * limit:
            held.append(torch.empty(CHUNK, dtype=torch.uint8, device="cuda"))
    except torch.cuda.OutOfMemoryError:
        oom = True
    allocated = len(held) * CHUNK
    peak_nvml = gpu.process_memory(os.getpid())
    reserved = torch.cuda.memory_reserved()
    # Some work, so that launches reach the usage counters (matmuls launch via cuLaunchKernelEx).
    del held
    torch.cuda.empty_cache()  # give the cached blocks back, or cuBLAS finds no room
    a = torch.randn(1024, 1024, device="cuda")
    for _ in range(50):
        a = a @ a
        a = a / a.norm()
    torch.cuda.synchronize()
    return {
        "total": total,
        "free": free,
        "oom_raised": oom,
        "allocated": allocated,
        "reserved_at_peak": reserved,
        "nvml_process_used": peak_nvml,
        "nvml_memory_info": gpu.memory_info(),
    }


def context() -> dict[str, object]:
    x = torch.empty(CHUNK, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    used = gpu.process_memory(os.getpid())
    reserved = torch.cuda.memory_reserved()
    del x
    return {
        "nvml_process_used": used,
        "reserved": reserved,
        "context": None if used is None else used - reserved,
    }


def race(size: int, barrier: str) -> dict[str, object]:
    torch.cuda.init()
    torch.empty(1, device="cuda")  # context up before the race starts
    while not os.path.exists(barrier):
        time.sleep(0.001)
    try:
        x = torch.empty(size, dtype=torch.uint8, device="cuda")
        ok = True
    except torch.cuda.OutOfMemoryError:
        x = None
        ok = False
    time.sleep(2)  # hold it while the other racer tries
    del x
    return {"ok": ok}


def main() -> None:
    command = sys.argv[1]
    if command == "quota":
        result = quota(int(sys.argv[2]))
    elif command == "context":
        result = context()
    elif command == "race":
        result = race(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(__doc__)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
