"""How fast a kernel runs when the GPU is partly idle (issue 4): no FCSP, one process.

A throttled tenant leaves the GPU idle part of the time; a power-capped GPU then holds a
higher clock, and each kernel is faster than at full load.  This measures by how much, to
tell what a cost normaliser has to remove.  For each duty cycle (100, 75, 50, 25, 10 %):
batches of fp16 matmuls with CUDA events around each batch, then a sleep that keeps the
GPU busy that fraction of the time; an NVML thread reads the SM clock and the power draw
every millisecond and files each reading under "busy" (inside a batch) or "idle".

    OUT=/some/dir python3 bench/gpu_clock_probe.py [--size 4096] [--dtype float16] [--seconds 3]

Writes $OUT/clock-probe-<size>-<dtype>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pynvml
import torch

DUTIES = (1.0, 0.75, 0.5, 0.25, 0.10)


class Poller:
    """SM clock and power every millisecond, each reading tagged busy or idle."""

    def __init__(self) -> None:
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.busy = False
        self.readings: dict[bool, list[tuple[int, float]]] = {True: [], False: []}
        self.halt = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while not self.halt.wait(0.001):
            busy = self.busy
            mhz = pynvml.nvmlDeviceGetClockInfo(self.handle, pynvml.NVML_CLOCK_SM)
            watts = pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000
            if busy == self.busy:  # the state did not change while we read
                self.readings[busy].append((mhz, watts))

    def take(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for busy, name in ((True, "busy"), (False, "idle")):
            got, self.readings[busy] = self.readings[busy], []
            out[f"{name}_mhz"] = statistics.fmean(r[0] for r in got) if got else float("nan")
            out[f"{name}_w"] = statistics.fmean(r[1] for r in got) if got else float("nan")
            out[f"{name}_n"] = len(got)
        return out


def run_duty(
    duty: float, seconds: float, operands: tuple[Any, Any], batch: int, poll: Poller
) -> dict[str, Any]:
    """Batches at `duty`.  Besides the batch's own events, two kernels of each batch get an
    event pair of their own, as the shim samples kernels: the first (cold: the stream was
    idle, so its span adds the launch latency) and one in the middle (warm: behind a
    running kernel); two events recorded back to back after it show what a span adds."""
    a, b = operands
    timing = {"enable_timing": True}
    start, end = torch.cuda.Event(**timing), torch.cuda.Event(**timing)
    pairs = {i: (torch.cuda.Event(**timing), torch.cuda.Event(**timing)) for i in (0, batch // 2)}
    empty = (torch.cuda.Event(**timing), torch.cuda.Event(**timing))
    per_matmul: list[float] = []
    spans: dict[int, list[float]] = {i: [] for i in pairs}
    empties: list[float] = []
    done = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        poll.busy = True
        start.record()
        for i in range(batch):
            pair = pairs.get(i)
            if pair:
                pair[0].record()
            torch.matmul(a, b)
            if pair:
                pair[1].record()
            if i == batch // 2:
                empty[0].record()
                empty[1].record()
        end.record()
        end.synchronize()
        poll.busy = False
        gpu_ms = start.elapsed_time(end)
        per_matmul.append(gpu_ms / batch)
        for i, pair in pairs.items():
            spans[i].append(pair[0].elapsed_time(pair[1]))
        empties.append(empty[0].elapsed_time(empty[1]))
        done += batch
        if duty < 1.0:
            time.sleep(gpu_ms / 1000 * (1 - duty) / duty)
    wall = time.monotonic() - t0
    return {
        "duty": duty,
        "matmul_per_s": done / wall,
        "ms_per_matmul": statistics.median(per_matmul),
        "ms_cold_span": statistics.median(spans[0]),
        "ms_warm_span": statistics.median(spans[batch // 2]),
        "ms_empty_span": statistics.median(empties),
        **poll.take(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "."))
    dtype = getattr(torch, args.dtype)
    a = torch.randn(args.size, args.size, device="cuda", dtype=dtype)
    b = torch.randn(args.size, args.size, device="cuda", dtype=dtype)
    for _ in range(3):  # cuBLAS handle and kernels
        torch.matmul(a, b)
    torch.cuda.synchronize()
    poll = Poller()
    rows = []
    for duty in DUTIES:
        run_duty(duty, 1.0, (a, b), args.batch, poll)  # settle the clock and power
        rows.append(run_duty(duty, args.seconds, (a, b), args.batch, poll))
        print(json.dumps(rows[-1]), flush=True)
    poll.halt.set()
    full = rows[0]
    limit_w = pynvml.nvmlDeviceGetEnforcedPowerLimit(poll.handle) / 1000
    lines = [
        f"{args.size} x {args.size} {args.dtype}, {args.batch} per batch; "
        f"power limit {limit_w:.0f} W",
        "",
        "| duty | matmul/s over full load | ms per matmul | speed vs full load "
        "| one kernel's span, cold / warm / empty (ms) | SM MHz busy / idle "
        "| power W busy / idle |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        r["throughput_vs_full"] = r["matmul_per_s"] / full["matmul_per_s"]
        r["speed_vs_full"] = full["ms_per_matmul"] / r["ms_per_matmul"]
        lines.append(
            f"| {r['duty']:.0%} | {r['throughput_vs_full']:.1%} | {r['ms_per_matmul']:.4f} "
            f"| {r['speed_vs_full']:.3f} | {r['ms_cold_span']:.4f} / {r['ms_warm_span']:.4f} / "
            f"{r['ms_empty_span']:.4f} "
            f"| {r['busy_mhz']:.0f} / {r['idle_mhz']:.0f} "
            f"| {r['busy_w']:.0f} / {r['idle_w']:.0f} |"
        )
    name = f"clock-probe-{args.size}-{args.dtype}"
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
