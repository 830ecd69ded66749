"""Why a throttled tenant's throughput differs from its share: a diagnostic for the H200.

For one matmul size, runs a worker unthrottled and at a given share (no observer), while
sampling the GPU's SM clock and power with nvidia-smi, and prints per run: ops per GPU
second, the op time the worker measured, the shim's own estimate (busy_ns / launches),
and the mean SM clock and power.  If throttled kernels run at a higher clock than
saturated ones, the limiter (which charges measured GPU time) grants more throughput
than its share of time.  The shim logs every calibration sample (BUD_LOG_LEVEL=debug):
the median and 10th percentile of the most-sampled kernel's samples show what it charges
against what the kernel takes back to back (op time).

    python3 bench/gpu_compute_diag.py --n 1792 --share 10 --share 50 --seconds 3 [--shim X]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fcsp_hook import slot  # noqa: E402  # after the path tweak, as a script

SHIM = REPO / "shim" / "libvgpu.so"
SAMPLE = re.compile(r"calib key (\w+) measured (\d+) est")
KIND = re.compile(r"calib key \w+ measured (\d+) est \d+ (cold|warm), less (\d+)")


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


def run(n: int, share: int, seconds: float, work: Path, shim: Path) -> dict[str, Any]:
    directory = work / f"slot-{n}-{share}"
    spec = slot.SlotSpec(
        container_id="diag",
        devices=(slot.DeviceLimits(host_index=0, sm_requested_centi=share * 100),),
    )
    slot.write_slot(directory, spec, {})
    clocks = work / f"clocks-{n}-{share}.csv"
    smi = subprocess.Popen(
        [
            "nvidia-smi",
            "--query-gpu=clocks.sm,power.draw",
            "--format=csv,noheader,nounits",
            "-lms",
            "100",
        ],
        stdout=clocks.open("w"),
        stderr=subprocess.DEVNULL,
    )
    env = {
        **os.environ,
        "LD_PRELOAD": str(shim),
        "FCSP_SLOT_DIR": str(directory),
        "BUD_LOG_LEVEL": "debug",
    }
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_compute.py"),
            "worker",
            "--n",
            str(n),
            "--seconds",
            str(seconds),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    smi.terminate()
    smi.wait()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    median_us, p10_us = sample_quantiles(done.stderr)
    marks = result["marks"]
    usage = slot.read_usage(directory / "usage").device[0]
    samples = [line.split(",") for line in clocks.read_text().splitlines() if "," in line]
    # Skip the first second (context creation, warm-up).
    samples = samples[10:] or samples
    return {
        "ops_per_s": marks[-1][0] / marks[-1][1],
        "op_ms": result["kernel_ms"],
        "estimate_ms": usage.busy_ns / max(usage.launches, 1) / 1e6,
        "throttled_s": usage.throttled_ns / 1e9,
        "sample_median_us": median_us,
        "sample_p10_us": p10_us,
        "kinds": cold_and_warm(done.stderr),
        "sm_mhz": statistics.mean(float(s[0]) for s in samples),
        "power_w": statistics.mean(float(s[1]) for s in samples),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, action="append", required=True)
    parser.add_argument("--share", type=int, action="append", help="default: 50")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--shim", type=Path, default=SHIM)
    args = parser.parse_args()
    print(
        "| n | share | ops/s (GPU time) | achieved | op ms (worker) | shim estimate ms "
        "| samples median / p10 us | cold and warm samples | throttled s | SM MHz | power W |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            base = run(n, 100, args.seconds, Path(tmp), args.shim)
            rows = [(100, base)]
            for share in args.share or [50]:
                rows.append((share, run(n, share, args.seconds, Path(tmp), args.shim)))
                time.sleep(0.5)
            for share, r in rows:
                print(
                    f"| {n} | {share} | {r['ops_per_s']:.1f} | "
                    f"{r['ops_per_s'] / base['ops_per_s']:.3f} | {r['op_ms']:.3f} | "
                    f"{r['estimate_ms']:.4f} | {r['sample_median_us']:.1f} / "
                    f"{r['sample_p10_us']:.1f} | {r['kinds']} | {r['throttled_s']:.2f} | "
                    f"{r['sm_mhz']:.0f} | "
                    f"{r['power_w']:.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
