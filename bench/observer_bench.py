"""fcsp-observer on a real GPU: several tenants, one observer.

Run as root from the repository root on the GPU machine (libvgpu.so is built if absent):

    OUT=/some/dir python3 bench/observer_bench.py [--size 4096] [--interval-ms 50]

Tenants are bench/observer_worker.py processes (PyTorch matmul loops) started with
LD_PRELOAD=shim/libvgpu.so and FCSP_SLOT_DIR pointing at their slots in a temporary
run_dir (lib/scene.py); one fcsp-observer serves them.  The shim's compute limiter reports
launches, busy_ns, throttled_ns and demand_centi, and follows sm_effective_centi; the
observer is what this measures.  --fake runs the workers without CUDA (a stand-in shim
writes their usage), to check the plumbing on a machine without a GPU.

Writes $OUT/observer.md (the results; the backend is in its header), the workday plot
$OUT/observer-workday.png when matplotlib is importable (CSV otherwise), and the raw
numbers, the observer's and the workers' logs in $OUT/observer-raw/.

Measured, against these targets:
  work conservation  4 tenants at 25 % (balanced), one busy: its throughput / alone  >= 95 %
  reclaim            an idle tenant starts: time until its share is >= 90 % of it    <= 100 ms
  fairness           4 equal busy tenants: Jain's index of normalised throughput     >= 0.995
  noisy neighbour    tenant at its share, neighbour light -> saturating: its drop    <= 3 %
  latency isolation  short kernel + sync, alone vs next to a saturating neighbour: p50/p99
  workday            shares follow 25/33/50/100 as tenants leave (time series)
  resize             fcspctl set --sm on a running tenant: time to the new share
(observer_sections.py: the four-tenant ones; observer_isolation.py: the others.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib import REPO, SHIM, gpu
from lib.report import out_dir, save_json
from observer_isolation import accuracy, fault, latency_capped, noisy_neighbour, pair
from observer_report import document, write_markdown
from observer_scene import log
from observer_sections import four_tenants, solo_baseline

MPS_PATH = os.pathsep.join((os.environ.get("PATH", ""), "/usr/local/nvidia/bin", "/usr/bin"))


def guarded(name: str, results: dict[str, Any], run: Callable[[], None]) -> None:
    """A section that fails is a row saying why, not the end of the run."""
    try:
        run()
    except Exception as exc:  # reported in the results
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"{name} failed: {exc}")


def the_gpu(uuid: str) -> tuple[str, str]:
    """(UUID, name) of the GPU to use: the one given, else the first."""
    gpus = gpu.inventory()["gpus"]
    if uuid:
        named = [g["name"] for g in gpus if g["uuid"] == uuid]
        return uuid, named[0] if named else "unknown GPU"
    if gpus:
        return gpus[0]["uuid"], gpus[0]["name"]
    return "", "unknown GPU"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096, help="matmul side (fp16)")
    p.add_argument("--batch", type=int, default=8, help="matmuls per synchronize")
    p.add_argument("--interval-ms", type=int, default=0, help="observer tick; 0: default")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--measure", type=float, default=4.0, help="seconds per measurement")
    p.add_argument("--phase", type=float, default=3.0, help="seconds per workday phase")
    p.add_argument("--repeats", type=int, default=5, help="reclaim repetitions")
    p.add_argument("--fake", action="store_true", help="no GPU: check the plumbing")
    p.add_argument(
        "--only", default="", help="comma list: solo,four,noisy,accuracy,pair,latency_capped,fault"
    )
    p.add_argument("--backend", choices=("timeslice", "mps"), default="timeslice")
    p.add_argument("--clock-normalise", choices=("off", "full-load"), default="full-load")
    p.add_argument("--clock-max-speedup-pct", type=int, default=0, help="0: the default")
    p.add_argument("--gpu-uuid", default="", help="the GPU's UUID; default: the first GPU's")
    p.add_argument("--shim", type=Path, default=SHIM, help="the libvgpu.so tenants preload")
    p.add_argument("--pair-shares", default="30/70", help="comma list of small/large")
    p.add_argument("--accuracy-shares", default="10,25,50,75", help="comma list")
    p.add_argument("--pair-modes", default="strict,balanced", help="comma list")
    p.add_argument(
        "--calib-log",
        action="store_true",
        help="each tenant's calibration samples (BUD_LOG_LEVEL=debug) to observer-raw/",
    )
    p.add_argument(
        "--mps-control",
        default=shutil.which("nvidia-cuda-mps-control", path=MPS_PATH) or "nvidia-cuda-mps-control",
    )
    return p


def main() -> int:
    args = parser().parse_args()
    args.out = out_dir()
    args.raw = args.out / "observer-raw"
    args.raw.mkdir(parents=True, exist_ok=True)
    args.gpu_uuid, gpu_name = the_gpu(args.gpu_uuid)
    # One observer state directory for every scene, like /var/lib/fcsp on a host.
    args.state_dir = Path(tempfile.mkdtemp(prefix="fo-state-", dir="/tmp"))
    if not args.fake and not args.shim.exists():
        subprocess.run(["make", "-C", str(REPO), "shim"], check=True)
    only = set(filter(None, args.only.split(","))) or {"solo", "four", "noisy"}
    sections = {"accuracy": accuracy, "pair": pair, "latency_capped": latency_capped}
    results: dict[str, Any] = {
        "gpu": gpu_name,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.doc = document(args)
    results["meta"] = args.doc.meta
    try:
        # Every section's ratios are against the solo run, and it is where the observer
        # learns the full-load clock: without it the noisy-neighbour drop read 21 % instead
        # of 5 %, the pair 2e5 %.
        needs_solo = {"solo", "four", "noisy", "pair", "accuracy", "latency_capped"}
        solo = solo_baseline(args, results) if only & needs_solo else 1.0
        if "four" in only:
            guarded("four", results, lambda: four_tenants(args, results, solo))
        if "noisy" in only:
            guarded("noisy", results, lambda: noisy_neighbour(args, results))
        for name, run in sections.items():
            if name in only:
                guarded(name, results, lambda run=run: run(args, results, solo))
        if "fault" in only and args.backend == "mps":
            guarded("fault", results, lambda: fault(args, results))
    finally:
        save_json(args.raw / "results.json", results)
        write_markdown(args, results)
        shutil.rmtree(args.state_dir, ignore_errors=True)
    log(f"wrote {args.doc.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
