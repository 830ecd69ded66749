"""How fast a kernel runs when the GPU is partly idle: no FCSP, one process.

A throttled tenant leaves the GPU idle part of the time; a power-capped GPU then holds a
higher clock, and each kernel is faster than at full load.  This measures by how much, to
tell what a cost normaliser has to remove.  For each duty cycle (100, 75, 50, 25, 10 %):
batches of fp16 matmuls with CUDA events around each batch, then a sleep that keeps the
GPU busy that fraction of the time; lib.gpu's sampler reads the SM clock and the power
draw every millisecond and files each reading under "busy" (inside a batch) or "idle".

    OUT=/some/dir python3 bench/gpu_clock_probe.py [--size 4096] [--dtype float16] [--seconds 3]

Writes the table as the "clock-<size>-<dtype>" part of $OUT/compute-diagnosis.md, and its
rows as JSON to $OUT/compute-diagnosis-raw/clock-<size>-<dtype>.json.
"""

# torch is imported where used: --help works without it.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from lib.gpu import Sample, Sampler
from lib.report import Report, out_dir, save_json

DUTIES = (1.0, 0.75, 0.5, 0.25, 0.10)


class Poller:
    """SM clock and power every millisecond, each reading tagged busy or idle."""

    def __init__(self) -> None:
        import torch

        self.busy = False
        self.index = torch.cuda.current_device()
        self.sampler = Sampler([self.index], period=0.001, tag=lambda: self.busy).start()

    def take(self) -> dict[str, float]:
        """Means of the readings since the last take, busy and idle apart."""
        got: list[Sample] = self.sampler.drain()
        out: dict[str, float] = {}
        for busy, name in ((True, "busy"), (False, "idle")):
            mine = [s for s in got if s.tag is busy]
            out[f"{name}_mhz"] = statistics.fmean(s.mhz for s in mine) if mine else float("nan")
            out[f"{name}_w"] = statistics.fmean(s.watts for s in mine) if mine else float("nan")
            out[f"{name}_n"] = len(mine)
        return out


def run_duty(
    duty: float, seconds: float, operands: tuple[Any, Any], batch: int, poll: Poller
) -> dict[str, Any]:
    """Batches at `duty`.  Besides the batch's own events, two kernels of each batch get an
    event pair of their own, as the shim samples kernels: the first (cold: the stream was
    idle, so its span adds the launch latency) and one in the middle (warm: behind a
    running kernel); two events recorded back to back after it show what a span adds."""
    import torch

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
    name = f"clock-{args.size}-{args.dtype}"
    doc = Report(
        "compute-diagnosis",
        f"How fast a kernel runs on a partly idle GPU ({args.size} x {args.size} {args.dtype})",
        "One process, no FCSP: batches of matmuls with CUDA events around each, then a sleep "
        "that keeps the GPU busy the given fraction of the time; the SM clock and power read "
        "every millisecond, filed under busy (inside a batch) or idle.",
        out_dir(),
        part=name,
        extra=[f"{args.batch} per batch"],
    )
    import torch

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
    poll.sampler.stop()
    full = rows[0]
    gpus = {g["index"]: g for g in doc.meta["gpus"].get("gpus", [])}
    limit_w = gpus.get(poll.index, {}).get("power_limit_w") or float("nan")
    doc.extra[0] += f"; power limit {limit_w:.0f} W"
    lines = [
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
    (doc.out / "compute-diagnosis-raw").mkdir(parents=True, exist_ok=True)
    save_json(doc.out / "compute-diagnosis-raw" / f"{name}.json", rows)
    doc.add(*lines)
    doc.write()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
