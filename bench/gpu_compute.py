"""Compute-share benchmark on a real GPU, driven by bench/gpu_compute.sh.

    python3 bench/gpu_compute.py run --out DIR --raw DIR --work DIR --shim PATH ...
    python3 bench/gpu_compute.py worker --n N --seconds S [--barrier DIR]   (internal)
    python3 bench/gpu_compute.py calibrate                                (internal)

Sections (each independent; a failure becomes a table row):
  1. calibrate: bf16 matmul sizes whose kernels take about 20 us, 500 us and 5 ms;
  2. single tenant: per size, unthrottled (slot at 100 %) then sm = 10, 25, 50, 75;
     achieved = throughput / unthrottled throughput, target |error| <= 3 points;
  3. two tenants at 30/70 together, each relative to its own solo (unthrottled) throughput;
  4. stability: coefficient of variation of the ops completed per 100 ms window (GPU time);
  5. launch overhead when tokens are available: bench/gpu_overhead.cu in one process, its
     launches through the driver's entry point and through the hook in turn, preloaded
     with no slot, at 100 % (count only) and at 90 % (full limiter path, never throttled
     by such tiny kernels); the median of the paired differences.

Throughput is measured on the GPU's clock (lib/torchwork.py).  Slots are strict and
reached through FCSP_SLOT_DIR.  With --clock-normalise, fcsp-observer runs over them as
on a host (strict tenants keep their requests; it publishes the clock scale); without,
the shim alone holds each tenant to its requested share of GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from compute_sections import SHARES, ComputeBench, section_overhead, section_pair, section_single
from lib import torchwork
from lib.report import Report
from lib.scene import Scene

TARGETS_MS = {"20us": 0.020, "500us": 0.5, "5ms": 5.0}
SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
SHIM_LOG_LEVEL = os.environ.get("BENCH_SHIM_LOG_LEVEL", "")
SIZES = tuple(int(n) for n in os.environ.get("BENCH_SIZES", "").split(",") if n.strip())
WARMUP_S = 1.0
# Pairs warm up longer: fcsp-observer fits the turn cycle to the tenants' kernel sizes once it
# has 1.5 s of them, and a pair is measured as it runs from then on.
PAIR_WARMUP_S = 3.0
CANDIDATES = (512, 768, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 4096, 5120, 6144, 7168,
              8192, 9216, 10240, 11264, 12288, 14336, 16384)  # fmt: skip


# ---- worker processes (under the shim) -----------------------------------------------


def calibrate() -> dict[str, object]:
    """The matmul size closest (in log time) to each target, with its time per op;
    BENCH_SIZES (three n, comma-separated) fixes the sizes instead: below ~2048 a Python
    loop of matmuls is launch-bound and which n lands nearest 20 us varies from run to run."""
    if SIZES:
        fixed = {n: torchwork.kernel_ms(torchwork.matmul(n), 50) for n in SIZES}
        chosen = {
            name: {"n": n, "kernel_ms": fixed[n]}
            for name, n in zip(TARGETS_MS, SIZES, strict=False)
        }
        times = fixed
    else:
        times = torchwork.size_times(
            CANDIDATES, spend_ms=50, reps=(3, 200), stop_ms=3 * TARGETS_MS["5ms"]
        )
        chosen = {}
        for name, target in TARGETS_MS.items():
            n = torchwork.closest(times, target)
            chosen[name] = {"n": n, "kernel_ms": times[n]}
    return {
        "times": {str(k): v for k, v in times.items()},
        "chosen": chosen,
        "torch": torchwork.torch_info(),
    }


# ---- the run ---------------------------------------------------------------------------


def section_calibrate(b: ComputeBench) -> dict[str, dict[str, float]]:
    b.doc.section("Kernel sizes")
    b.doc.add("| size | matmul n (bf16) | time per op |", "|---|---|---|")
    try:
        child = b.scene.spawn("calibrate", b.worker_argv("calibrate"), env=b.scene.env())
        result = b.scene.collect_one(child, timeout=180)
    except Exception as exc:  # every failure is a row
        b.row("calibrate", "FAIL", exc)
        return {}
    info = result.get("torch") or {}
    b.doc.extra.insert(0, f"torch {info.get('torch', '?')} (CUDA {info.get('cuda', '?')})")
    chosen: dict[str, dict[str, float]] = result["chosen"]
    for name, c in chosen.items():
        b.row(name, c["n"], f"{c['kernel_ms'] * 1000:.1f} us")
    return chosen


def settings(args: argparse.Namespace) -> str:
    observer = "no observer (requested share enforced)."
    if args.clock_normalise:
        cap = args.clock_max_speedup_pct
        observer = (
            f'fcsp-observer with clock_normalise = "{args.clock_normalise}"'
            + (f", clock_max_speedup_pct = {cap}" if cap else "")
            + " (strict tenants)."
        )
    return (
        f"{SECONDS:g} s per run after {WARMUP_S:g} s warm-up ({PAIR_WARMUP_S:g} s for pairs); "
        f"no MPS (time-slicing); {observer}"
    )


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    doc = Report(
        "compute",
        "FCSP compute shares on a real GPU",
        "How close libvgpu.so holds a tenant to its compute share: bf16 matmul workers of "
        "three kernel sizes, each alone at 10-75 % and in a 30/70 pair, throughput against "
        "the same worker unthrottled (GPU time, CUDA events); the stability of 100 ms "
        "windows; and the cost the hook adds to a launch.",
        Path(args.out),
        extra=[settings(args)],
    )
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    with Scene(Path(args.work), Path(args.raw), shim=Path(args.shim)) as scene:
        b = ComputeBench(scene, doc, Path(__file__), seconds=SECONDS, shim_log=SHIM_LOG_LEVEL)
        if args.build_ok != "1":
            b.row("build libvgpu.so", "FAIL", "see compute-raw/build.log")
            doc.write()
            return 1
        if args.clock_normalise:
            scene.start_observer(
                clock_normalise=args.clock_normalise,
                clock_max_speedup_pct=int(args.clock_max_speedup_pct or 0),
            )
        try:
            chosen = section_calibrate(b)
            shares = SHARES if "single" in sections else ()
            solo = section_single(b, chosen, shares, WARMUP_S) if chosen else {}
            if chosen and "pair" in sections:
                section_pair(b, chosen, solo, PAIR_WARMUP_S)
        finally:
            scene.stop_observer()
        # Without the observer: its two strict slots (100 and 90 %) exist at once, and an
        # observer would scale them down to fit in 100 % and throttle both.
        if "overhead" in sections:
            section_overhead(b, args.probe)
    b.plot()
    doc.add("", f"Total bench time: {time.monotonic() - started:.0f} s.")
    doc.write()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--clock-normalise", default="", help='"", off or full-load: run an observer')
    r.add_argument("--clock-max-speedup-pct", default="", help="the observer's; default its own")
    r.add_argument(
        "--sections",
        default=os.environ.get("BENCH_SECTIONS", "single,pair,overhead"),
        help="of single, pair, overhead (solo baselines always run)",
    )
    for name in ("--out", "--raw", "--work", "--shim", "--build-ok", "--probe"):
        r.add_argument(name, default="")
    w = sub.add_parser("worker")
    w.add_argument("--n", type=int, required=True)
    w.add_argument("--seconds", type=float, required=True)
    w.add_argument("--warmup", type=float, default=WARMUP_S)
    w.add_argument("--barrier", default=None)
    sub.add_parser("calibrate")
    args = parser.parse_args()
    if args.cmd == "run":
        return run(args)
    if args.cmd == "worker":
        result = torchwork.matmul_worker(args.n, args.seconds, args.warmup, barrier=args.barrier)
    else:
        result = calibrate()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
