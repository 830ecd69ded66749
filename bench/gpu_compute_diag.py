"""Why a throttled tenant's throughput differs from its share: a diagnostic probe.

For one matmul size, runs a worker (gpu_compute.py's) unthrottled and at a given share (no
observer), while sampling the GPU's SM clock and power, and reports per run: ops per GPU
second, the op time the worker measured, the shim's own estimate (busy_ns / launches),
and the mean SM clock and power.  If throttled kernels run at a higher clock than
saturated ones, the limiter (which charges measured GPU time) grants more throughput
than its share of time.  The shim logs every calibration sample (BUD_LOG_LEVEL=debug):
the median and 10th percentile of the most-sampled kernel's samples show what it charges
against what the kernel takes back to back (op time).

    OUT=/some/dir python3 bench/gpu_compute_diag.py --n 1792 --share 10 --share 50 [--seconds 3]

Prints the table as it goes; writes it as the "calibration" part of
$OUT/compute-diagnosis.md (workers' outputs in $OUT/compute-diagnosis-raw/).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lib import BENCH, SHIM
from lib.gpu import Sampler
from lib.report import Report, out_dir
from lib.scene import Device, Scene, python

from fcsp_hook.slot import abi, files

SAMPLE = re.compile(r"calib key (\w+) measured (\d+) est")
KIND = re.compile(r"calib key \w+ measured (\d+) est \d+ (cold|warm), less (\d+)")
SKIP_S = 1.0  # context creation and warm-up: not what the clock is at while measured
HEADER = ["n", "share", "ops/s (GPU time)", "achieved", "op ms (worker)", "shim estimate ms",
          "samples median / p10 us", "cold and warm samples", "throttled s", "SM MHz",
          "power W"]  # fmt: skip


def cold_and_warm(log: str) -> str:
    """Samples of idle (cold) and busy (warm) streams: how many, their median, and the
    median of what was taken off each (launch call's host time; the empty event pair)."""
    parts = []
    for kind in ("cold", "warm"):
        got = [(int(m), int(a)) for m, k, a in KIND.findall(log) if k == kind]
        if got:
            measured = statistics.median(m for m, _ in got) / 1000
            added = statistics.median(a for _, a in got) / 1000
            parts.append(f"{kind} {len(got)}: {measured:.1f} us (less {added:.1f})")
    return "; ".join(parts) or "-"


def sample_quantiles(log: str) -> tuple[float, float]:
    """(median, 10th percentile) in us of the most-sampled key's calibration samples."""
    keys: dict[str, list[int]] = {}
    for key, ns in SAMPLE.findall(log):
        keys.setdefault(key, []).append(int(ns))
    if not keys:
        return float("nan"), float("nan")
    most = max(keys, key=lambda key: len(keys[key]))
    got = sorted(keys[most])
    return statistics.median(got) / 1000, got[len(got) // 10] / 1000


def run(scene: Scene, n: int, share: int, seconds: float) -> dict[str, Any]:
    tag = f"diag-{n}-{share}"
    slot = scene.slot(tag, [Device(sm_centi=share * 100)], observed=False)
    argv = python(BENCH / "gpu_compute.py", "worker", "--n", str(n), "--seconds", str(seconds))
    with Sampler([0], period=0.1) as clocks:
        started = time.monotonic()
        env = scene.env(slot, extra={"BUD_LOG_LEVEL": "debug"})
        result = scene.collect_one(scene.spawn(tag, argv, env=env), timeout=seconds + 300)
    log = scene.raw.joinpath(f"{tag}.err").read_text(errors="replace")
    median_us, p10_us = sample_quantiles(log)
    marks = result["marks"]
    usage = files.read_usage(slot / abi.USAGE_FILE).device[0]
    samples = clocks.window(0, started + SKIP_S) or clocks.window(0)
    return {
        "ops_per_s": marks[-1][0] / marks[-1][1],
        "op_ms": result["kernel_ms"],
        "estimate_ms": usage.busy_ns / max(usage.launches, 1) / 1e6,
        "throttled_s": usage.throttled_ns / 1e9,
        "sample_median_us": median_us,
        "sample_p10_us": p10_us,
        "kinds": cold_and_warm(log),
        "sm_mhz": statistics.mean(s.mhz for s in samples) if samples else float("nan"),
        "power_w": statistics.mean(s.watts for s in samples) if samples else float("nan"),
    }


def row(n: int, share: int, r: dict[str, Any], base: dict[str, Any]) -> list[str]:
    return [
        str(n),
        str(share),
        f"{r['ops_per_s']:.1f}",
        f"{r['ops_per_s'] / base['ops_per_s']:.3f}",
        f"{r['op_ms']:.3f}",
        f"{r['estimate_ms']:.4f}",
        f"{r['sample_median_us']:.1f} / {r['sample_p10_us']:.1f}",
        r["kinds"],
        f"{r['throttled_s']:.2f}",
        f"{r['sm_mhz']:.0f}",
        f"{r['power_w']:.0f}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", required=True)
    parser.add_argument("--share", type=int, action="append", help="default: 50")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--shim", type=Path, default=SHIM)
    args = parser.parse_args()
    doc = Report(
        "compute-diagnosis",
        "What a throttled tenant's kernels cost, and at what clock",
        "One bf16 matmul worker under libvgpu.so, unthrottled and at each share (no "
        "observer): its throughput, the op time it measured, what the shim charges per "
        "launch and the calibration samples behind it, and the GPU's mean SM clock and power "
        f"(NVML, 10 Hz, the first {SKIP_S:g} s left out).",
        out_dir(),
        part="calibration",
        extra=[f"{args.seconds:g} s per run"],
    )
    doc.add("", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER))
    print("\n".join(doc.lines[1:]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        scene = Scene(Path(tmp), doc.out / "compute-diagnosis-raw", shim=args.shim)
        with scene:
            for n in args.n:
                base = run(scene, n, 100, args.seconds)
                rows = [(100, base)]
                for share in args.share or [50]:
                    rows.append((share, run(scene, n, share, args.seconds)))
                    time.sleep(0.5)
                for share, r in rows:
                    line = "| " + " | ".join(row(n, share, r, base)) + " |"
                    doc.add(line)
                    print(line, flush=True)
    doc.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
