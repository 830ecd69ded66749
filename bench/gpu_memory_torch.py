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

CHUNK = 256 << 20


def nvml_process_used() -> int | None:
    """This process's device memory as NVML's process list reports it (not virtualised)."""
    try:
        import pynvml  # noqa: PLC0415 - optional: absent on some hosts, reported as missing

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return int(proc.usedGpuMemory or 0)
        return None
    except Exception:
        return None


def nvml_memory_info() -> dict[str, int] | None:
    try:
        import pynvml  # noqa: PLC0415 - optional: absent on some hosts, reported as missing

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
        return {"total": int(info.total), "free": int(info.free), "used": int(info.used)}
    except Exception:
        return None


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
    peak_nvml = nvml_process_used()
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
        "nvml_memory_info": nvml_memory_info(),
    }


def context() -> dict[str, object]:
    x = torch.empty(CHUNK, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    used = nvml_process_used()
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
