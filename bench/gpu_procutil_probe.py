"""Does NVML's per-process SM utilisation tell each tenant's share of a time-sliced GPU?

Under time-slicing a tenant's CUDA-event spans include the time slices of a neighbour
that was runnable meanwhile, so a tenant with 5 ms kernels next to a busy one is charged
about twice its GPU time.  The shim cannot see other contexts; NVML can, per process.
This probe runs bf16 matmul workers (bench/gpu_compute.py) under libvgpu.so, strict slots,
no observer: one alone unthrottled, then each listed group together, while polling
nvmlDeviceGetProcessUtilization once a second, and prints per worker: its throughput over
the solo throughput (its share of GPU time, clocks being equal), NVML's mean smUtil for
its pid over the measured window, the samples NVML gave, and the shim's own charge
(busy_ns per wall second).

    python3 bench/gpu_procutil_probe.py --n 12288 --group 30,70 --group 30 --seconds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fcsp_hook import abi, slot  # noqa: E402  # after the path tweak, as a script

SHIM = REPO / "shim" / "libvgpu.so"


class Poller(threading.Thread):
    """nvmlDeviceGetProcessUtilization every `period` s: (pid, time s, smUtil) samples."""

    def __init__(self, index: int, period: float) -> None:
        super().__init__(daemon=True)
        import pynvml  # noqa: PLC0415  # only on the GPU machine

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.period = period
        self.samples: list[tuple[int, float, int]] = []
        self.calls: list[float] = []  # seconds per call
        self.stop = threading.Event()
        self.error = ""

    def run(self) -> None:
        last = 0
        while not self.stop.wait(self.period):
            t0 = time.monotonic()
            try:
                got = self.nvml.nvmlDeviceGetProcessUtilization(self.handle, last)
            except self.nvml.NVMLError as exc:  # NOT_FOUND: no samples since `last`
                self.error = str(exc)
                continue
            finally:
                self.calls.append(time.monotonic() - t0)
            for s in got:
                self.samples.append((int(s.pid), s.timeStamp / 1e6, int(s.smUtil)))
                last = max(last, int(s.timeStamp))


def spawn(n: int, seconds: float, share: int, tag: str, barrier: Path) -> Any:
    directory = barrier.parent / f"slot-{tag}"
    spec = slot.SlotSpec(
        container_id=tag,
        isolation_mode=abi.IsolationMode.STRICT,
        devices=(slot.DeviceLimits(host_index=0, sm_requested_centi=share * 100),),
    )
    slot.write_slot(directory, spec, {})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUD_", "FCSP_"))}
    env.update(LD_PRELOAD=str(SHIM), FCSP_SLOT_DIR=str(directory))
    argv = [sys.executable, str(REPO / "bench" / "gpu_compute.py"), "worker"]
    argv += ["--n", str(n), "--seconds", str(seconds), "--barrier", str(barrier)]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, directory


def run_group(
    n: int, shares: list[int], seconds: float, work: Path, name: str
) -> list[dict[str, Any]]:
    barrier = work / f"barrier-{name}"
    barrier.mkdir()
    workers = [spawn(n, seconds, s, f"{name}-{i}", barrier) for i, s in enumerate(shares)]
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < len(workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    poller = Poller(0, 1.0)
    poller.start()
    go = time.time()
    (barrier / "go").touch()
    rows = []
    for share, (proc, directory) in zip(shares, workers, strict=True):
        out, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(err.strip().splitlines()[-1:])
        result = json.loads(out.strip().splitlines()[-1])
        usage = slot.read_usage(directory / "usage").device[0]
        rows.append({"pid": proc.pid, "share": share, "result": result, "busy_ns": usage.busy_ns})
    time.sleep(1.2)  # the last second's samples
    poller.stop.set()
    poller.join()
    window = (go + 0.3, go + seconds)
    for r in rows:
        mine = [
            u for pid, t, u in poller.samples if pid == r["pid"] and window[0] <= t <= window[1]
        ]
        marks = r["result"]["marks"]
        r["ops_per_s"] = marks[-1][0] / marks[-1][1]
        r["gpu_s"] = marks[-1][1]
        r["nvml_mean"] = statistics.fmean(mine) if mine else float("nan")
        r["nvml_n"] = len(mine)
        r["nvml_calls_ms"] = 1000 * statistics.median(poller.calls) if poller.calls else 0
        r["nvml_error"] = poller.error
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, action="append", required=True)
    parser.add_argument("--group", action="append", required=True, help="shares, e.g. 30,70")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    print("| n | group | share | achieved (of solo) | NVML smUtil mean | NVML samples "
          "| shim busy per s | NVML call ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            (solo,) = run_group(n, [100], args.seconds, Path(tmp), f"solo-{n}")
            groups = [("solo", [solo])]
            for g in args.group:
                shares = [int(s) for s in g.split(",")]
                groups.append((g, run_group(n, shares, args.seconds, Path(tmp), f"g{n}-{g}")))
            for name, rows in groups:
                for r in rows:
                    print(
                        f"| {n} | {name} | {r['share']} | {r['ops_per_s'] / solo['ops_per_s']:.3f} "
                        f"| {r['nvml_mean']:.1f} | {r['nvml_n']} "
                        f"| {r['busy_ns'] / 1e9 / r['gpu_s']:.3f} | {r['nvml_calls_ms']:.2f} |"
                        + (f" {r['nvml_error']}" if r["nvml_error"] else ""),
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
