"""The processes bench/gpu_multigpu.py starts (under the shim or plain); each returns one
JSON object, printed as its last line of stdout.

    probe-mem   section 1: every CUDA ordinal's GPU and memory, then one allocation each
    calibrate   section 2: the matmul size nearest 500 us per kernel
    worker      section 2: a matmul loop on one GPU, started with its group
    nccl-rank   section 3: one rank of the all-reduce
"""

# torch is imported in these processes only.
# ruff: noqa: PLC0415

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

from lib import torchwork
from lib.scene import usage_snapshot
from multigpu_bench import CANDIDATES, TARGET_KERNEL_MS, WARMUP_S


def probe_mem(alloc: int) -> dict[str, Any]:
    """What every CUDA ordinal looks like, then one allocation of `alloc` bytes on each."""
    import torch

    ordinals: list[dict[str, Any]] = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        ordinals.append(
            {
                "ordinal": i,
                "name": str(props.name),
                "uuid": torchwork.torch_uuid(i),
                "props_total": int(props.total_memory),
                "free": int(free),
                "total": int(total),
            }
        )
    # Allocations only after every view was read: a charge would lower what follows.
    for entry in ordinals:
        i = entry["ordinal"]
        try:
            x = torch.empty(alloc, dtype=torch.uint8, device=f"cuda:{i}")
            torch.cuda.synchronize(i)
            entry["alloc_ok"] = True
            del x
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            entry["alloc_ok"] = False
            entry["alloc_error"] = type(exc).__name__
            entry["alloc_message"] = (str(exc).strip().splitlines() or [""])[0][:300]
        torch.cuda.empty_cache()
    return {
        "torch": torchwork.torch_info(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "ordinals": ordinals,
    }


def calibrate(device: int) -> dict[str, Any]:
    """The matmul size whose back-to-back kernels take closest (in log) to 500 us."""
    import torch

    torch.cuda.set_device(device)
    times = torchwork.size_times(
        CANDIDATES, spend_ms=60, reps=(5, 100), stop_ms=3 * TARGET_KERNEL_MS
    )
    n = torchwork.closest(times, TARGET_KERNEL_MS)
    return {
        "n": n,
        "kernel_ms": times[n],
        "times": {str(k): v for k, v in times.items()},
        "uuid": torchwork.torch_uuid(device),
        "torch": torchwork.torch_info(),
    }


def worker(device: int, n: int, seconds: float, barrier: str, tag: str) -> dict[str, Any]:
    """A matmul loop on `device`, measured once its whole group is warm."""
    return torchwork.matmul_worker(n, seconds, WARMUP_S, barrier=barrier, tag=tag, device=device)


def _nccl_init(rank: int, world: int, init: str) -> None:
    import torch
    import torch.distributed as dist

    kwargs: dict[str, Any] = {
        "backend": "nccl",
        "init_method": init,
        "rank": rank,
        "world_size": world,
        "timeout": datetime.timedelta(seconds=120),
    }
    try:
        dist.init_process_group(**kwargs, device_id=torch.device("cuda", rank))
    except TypeError:  # a torch without device_id: the communicator comes lazily
        dist.init_process_group(**kwargs)


def nccl_rank(
    rank: int, world: int, init: str, *, nbytes: int, seconds: float, batch: int
) -> dict[str, Any]:
    """One rank; the all-reduce checked, then timed in batches of `batch`."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    t0 = time.monotonic()
    _nccl_init(rank, world, init)
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    first = float(world * (world + 1) // 2)  # each rank holds rank + 1
    x.fill_(rank + 1)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    init_s = time.monotonic() - t0
    first_ok = bool((x == first).all().item())
    expected = first * 2 ** (batch - 1)  # in place: first, then doubled by every sum

    def timed() -> tuple[float, bool]:
        x.fill_(rank + 1)
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(batch):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return dt, bool((x == expected).all().item())

    warm_dt, warm_ok = timed()
    # Every rank must run the same number of batches: rank 0 decides, the others follow.
    count = torch.tensor([max(3, min(400, round(seconds / max(warm_dt, 1e-6))))], device=dev)
    dist.broadcast(count, src=0)
    per_op: list[float] = []
    bad = 0 if warm_ok else 1
    for _ in range(int(count.item())):
        dt, ok = timed()
        per_op.append(dt / batch)
        bad += 0 if ok else 1
    dist.barrier()
    torch.cuda.synchronize()
    slot = os.environ.get("FCSP_SLOT_DIR", "")
    usage = usage_snapshot(Path(slot)) if slot and os.environ.get("LD_PRELOAD") else None
    memory = {
        "max_reserved": int(torch.cuda.max_memory_reserved(dev)),
        "reserved": int(torch.cuda.memory_reserved(dev)),
        "max_allocated": int(torch.cuda.max_memory_allocated(dev)),
    }
    dist.barrier()  # the other rank read the usage file while this one still held its memory
    dist.destroy_process_group()
    return {
        "rank": rank,
        "pid": os.getpid(),
        "uuid": torchwork.torch_uuid(rank),
        "bytes": nbytes,
        "batch": batch,
        "init_s": init_s,
        "first_ok": first_ok,
        "batches": len(per_op),
        "bad_batches": bad,
        "per_op_s": per_op,
        "memory": memory,
        "usage_running": usage,
        "torch": torchwork.torch_info(),
    }
