"""PyTorch work that bench worker processes run: matmul loops timed on the GPU's clock.

Only worker processes import torch (inside these functions): an orchestrator that
imports this module stays free of CUDA.  Throughput is read from CUDA events recorded
every few ops and read after a final synchronize, so windows are windows of GPU time and
the depth of the host's launch queue does not blur them.
"""

# torch is imported where used, in the worker processes only.
# ruff: noqa: PLC0415

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from lib.scene import await_go


def matmul(n: int, dtype: str = "bfloat16") -> Callable[[], Any]:
    """One n x n matmul into a preallocated output, as a callable."""
    import torch

    kind = getattr(torch, dtype)
    a = torch.randn(n, n, device="cuda", dtype=kind)
    b = torch.randn(n, n, device="cuda", dtype=kind)
    c = torch.empty_like(a)
    return lambda: torch.mm(a, b, out=c)


def kernel_ms(op: Callable[[], Any], reps: int) -> float:
    """GPU milliseconds per op, back to back, after one op to warm up."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    op()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        op()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / reps


def size_times(
    candidates: Iterable[int], *, spend_ms: float, reps: tuple[int, int], stop_ms: float
) -> dict[int, float]:
    """Milliseconds per matmul of each size, about `spend_ms` of GPU time each (repetitions
    within `reps`), up to the first size slower than `stop_ms`."""
    times: dict[int, float] = {}
    for n in candidates:
        op = matmul(n)
        first = kernel_ms(op, 3)
        times[n] = kernel_ms(op, max(reps[0], min(reps[1], int(spend_ms / max(first, 1e-3)))))
        del op
        if times[n] > stop_ms:
            break
    return times


def closest(times: dict[int, float], target_ms: float) -> int:
    """The size whose time is closest to the target, in log (2x too slow = 2x too fast)."""
    return min(times, key=lambda n: abs(math.log(times[n] / target_ms)))


def timed_ops(op: Callable[[], Any], seconds: float, every: int) -> tuple[int, list[Any]]:
    """Run op back to back for `seconds`; (ops run, [(ops done, GPU seconds since the
    start)] with an event recorded every `every` ops)."""
    import torch

    base = torch.cuda.Event(enable_timing=True)
    base.record()
    marks = []
    ops = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        op()
        ops += 1
        if ops % every == 0:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append((ops, ev))
    torch.cuda.synchronize()
    return ops, [(i, float(base.elapsed_time(ev)) / 1000) for i, ev in marks]


def torch_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    with contextlib.suppress(Exception):
        v = torch.cuda.nccl.version()
        info["nccl"] = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    return info


def torch_uuid(ordinal: int) -> str:
    """The physical GPU behind a CUDA ordinal, as "GPU-..." (what NVML calls it)."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(ordinal), "uuid", None)
    raw = getattr(uuid, "bytes", None)
    if raw is not None and len(raw) == 16:
        h = bytes(raw).hex()
        return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
    text = str(uuid or "")
    return text if not text or text.startswith("GPU-") else f"GPU-{text}"


def matmul_worker(
    n: int,
    seconds: float,
    warmup: float,
    *,
    barrier: str | None = None,
    tag: str = "",
    device: int | None = None,
) -> dict[str, Any]:
    """bf16 matmuls back to back for `seconds`, after `warmup` seconds in which the shim
    calibrates its cost estimate; with a barrier, measured only once every worker of the
    group is warm.  An event every ~2 ms of GPU work."""
    import torch

    if device is not None:
        torch.cuda.set_device(device)
    op = matmul(n)
    kernel_time_ms = kernel_ms(op, 5)
    every = max(1, round(2.0 / max(kernel_time_ms, 1e-3)))
    stop = time.monotonic() + warmup
    while time.monotonic() < stop:
        op()
    torch.cuda.synchronize()
    if barrier:
        await_go(barrier, tag or str(os.getpid()))
    t_start = time.monotonic()
    ops, marks = timed_ops(op, seconds, every)
    return {
        "device": torch.cuda.current_device(),
        "uuid": torch_uuid(torch.cuda.current_device()),
        "n": n,
        "ops": ops,
        "kernel_ms": kernel_time_ms,
        "t_start": t_start,
        "t_end": time.monotonic(),
        "marks": marks,
        "torch": torch_info(),
    }
