"""Does NVML's per-process SM utilisation tell each tenant's share of a time-sliced GPU?

Under time-slicing a tenant's CUDA-event spans include the time slices of a neighbour
that was runnable meanwhile, so a tenant with 5 ms kernels next to a busy one is charged
about twice its GPU time.  The shim cannot see other contexts; NVML can, per process.
This probe runs bf16 matmul workers (gpu_compute.py's) under libvgpu.so, strict slots,
no observer: one alone unthrottled, then each listed group together, while polling
nvmlDeviceGetProcessUtilization once a second (lib.gpu.Sampler), and reports per worker:
its throughput over the solo throughput (its share of GPU time, clocks being equal),
NVML's mean smUtil for its pid over the measured window, the samples NVML gave, and the
shim's own charge (busy_ns per GPU second).

    OUT=/some/dir python3 bench/gpu_procutil_probe.py --n 12288 --group 30,70 --group 30 --seconds 4

Prints the table as it goes; writes it as the "procutil" part of $OUT/compute-diagnosis.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lib import BENCH
from lib.gpu import Sampler
from lib.report import Report, out_dir
from lib.scene import Barrier, Device, Scene, python

from fcsp_hook.slot import abi, files

HEADER = ["n", "group", "share", "achieved (of solo)", "NVML smUtil mean", "NVML samples",
          "shim busy per s", "NVML call ms"]  # fmt: skip


def run_group(
    scene: Scene, n: int, shares: list[int], seconds: float, name: str
) -> list[dict[str, Any]]:
    barrier = Barrier(scene.work / f"barrier-{name}")
    children, slots = [], []
    for i, share in enumerate(shares):
        tag = f"{name}-{i}"
        slot = scene.slot(
            tag, [Device(sm_centi=share * 100)], mode=abi.IsolationMode.STRICT, observed=False
        )
        argv = python(BENCH / "gpu_compute.py", "worker", "--n", str(n))
        argv += ["--seconds", str(seconds), "--barrier", str(barrier.directory)]
        children.append(scene.spawn(tag, argv, env=scene.env(slot)))
        slots.append(slot)
    barrier.wait(children, timeout=120)
    with Sampler([0], period=1.0, processes=True) as poller:
        go = time.time()
        barrier.go()
        results = scene.collect(children, timeout=seconds + 60)
        time.sleep(1.2)  # the last second's samples
    rows = []
    for share, child, slot, result in zip(shares, children, slots, results, strict=True):
        if isinstance(result, Exception):
            raise result
        usage = files.read_usage(slot / abi.USAGE_FILE).device[0]
        rows.append({"pid": child.proc.pid, "share": share, "result": result})
        rows[-1]["busy_ns"] = usage.busy_ns
    window = (go + 0.3, go + seconds)
    for r in rows:
        mine = [
            u
            for pid, t, u in poller.process_samples
            if pid == r["pid"] and window[0] <= t <= window[1]
        ]
        marks = r["result"]["marks"]
        r["ops_per_s"] = marks[-1][0] / marks[-1][1]
        r["gpu_s"] = marks[-1][1]
        r["nvml_mean"] = statistics.fmean(mine) if mine else float("nan")
        r["nvml_n"] = len(mine)
        calls = poller.process_calls_s
        r["nvml_calls_ms"] = 1000 * statistics.median(calls) if calls else 0
        r["nvml_error"] = poller.process_error
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", required=True)
    parser.add_argument("--group", action="append", required=True, help="shares, e.g. 30,70")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    doc = Report(
        "compute-diagnosis",
        "NVML's per-process SM utilisation against each tenant's share",
        "bf16 matmul workers under libvgpu.so in strict slots, no observer: one alone, then "
        "each group together, while nvmlDeviceGetProcessUtilization is polled once a second; "
        "per worker its throughput over the solo one, NVML's mean smUtil for its pid over the "
        "measured window, and the shim's charge (busy_ns per GPU second).",
        out_dir(),
        part="procutil",
        extra=[f"{args.seconds:g} s per run"],
    )
    doc.add("", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER))
    print("\n".join(doc.lines[1:]), flush=True)
    raw = doc.out / "compute-diagnosis-raw"
    with tempfile.TemporaryDirectory() as tmp, Scene(Path(tmp), raw) as scene:
        for n in args.n:
            (solo,) = run_group(scene, n, [100], args.seconds, f"solo-{n}")
            groups = [("solo", [solo])]
            for g in args.group:
                shares = [int(s) for s in g.split(",")]
                name = f"g{n}-{g.replace(',', '-')}"
                groups.append((g, run_group(scene, n, shares, args.seconds, name)))
            for name, rows in groups:
                for r in rows:
                    line = (
                        f"| {n} | {name} | {r['share']} "
                        f"| {r['ops_per_s'] / solo['ops_per_s']:.3f} "
                        f"| {r['nvml_mean']:.1f} | {r['nvml_n']} "
                        f"| {r['busy_ns'] / 1e9 / r['gpu_s']:.3f} | {r['nvml_calls_ms']:.2f} |"
                        + (f" {r['nvml_error']}" if r["nvml_error"] else "")
                    )
                    doc.add(line)
                    print(line, flush=True)
    doc.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
