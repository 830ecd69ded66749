"""The tenants of bench/gpu_authority.py, one process each (torch on a GPU host; with
--sim, the driver-API client of tests/shim on the simulated driver).

    python3 bench/authority_workers.py hold GIB SECONDS            allocate (0: to the quota), wait
    python3 bench/authority_workers.py matmul SECONDS              matmuls; per-second counts
    python3 bench/authority_workers.py spin MS                     one kernel of MS, then exit
    python3 bench/authority_workers.py mps-env THREADS SECONDS     setenv, then matmuls

Each prints one JSON line when it is set up ({"ready": ...}) and one with its result.
"""

# torch is imported in the worker functions: the orchestrator never initialises CUDA.
# ruff: noqa: PLC0415

from __future__ import annotations

import json
import os
import sys
import time


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def hold(gib: float, seconds: float) -> None:
    """A cuBLAS matmul (the libraries a real tenant loads) and gib GiB, held; gib 0: all
    that the quota lets it allocate, to the last 2 MiB."""
    import torch

    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    held = []
    if gib > 0:
        held.append(torch.empty(int(gib * (1 << 30)), dtype=torch.uint8, device="cuda"))
    for step in (256 << 20, 2 << 20) if gib <= 0 else ():
        while True:
            try:
                held.append(torch.empty(step, dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                break
    torch.cuda.synchronize()
    say(ready=True, pid=os.getpid(), reserved=torch.cuda.memory_reserved())
    time.sleep(seconds)
    say(held=sum(int(t.numel()) for t in held))


def matmul(seconds: float) -> None:
    """bf16 4096^2 matmuls for `seconds`; how many finished in each second."""
    import torch

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    for _ in range(20):
        torch.mm(a, a, out=c)
    torch.cuda.synchronize()
    say(ready=True, pid=os.getpid())
    counts, done, second = [], 0, time.monotonic() + 1
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(10):
            torch.mm(a, a, out=c)
        torch.cuda.synchronize()
        done += 10
        if time.monotonic() >= second:
            counts.append(done)
            done, second = 0, second + 1
    say(per_second=counts)


def spin(ms: float) -> None:
    """One kernel that holds the GPU for about ms (torch's spin kernel), then exit."""
    import torch

    cycles = int(ms * 1e-3 * torch.cuda.get_device_properties(0).clock_rate * 1e3)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    say(kernel_ms=float(start.elapsed_time(end)))


def mps_env(threads: str, seconds: float) -> None:
    """The tenant's own setenv of MPS's limits after the shim has set them, before CUDA."""
    os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = threads
    os.environ["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = "0=64G"
    matmul(seconds)


def main(argv: list[str]) -> int:
    work = {"hold": hold, "matmul": matmul, "spin": spin, "mps-env": mps_env}
    kind, *args = argv
    if kind == "mps-env":
        mps_env(args[0], float(args[1]))
    else:
        work[kind](*(float(a) for a in args))  # type: ignore[operator]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
