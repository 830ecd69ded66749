"""Does NVML see a process whose cgroup is frozen part of every second, as fcsp-observer's
backstop holds a tenant?

A bf16 matmul process in a cgroup of its own is frozen for the first DUTY of every second
(0, then 0.9, 0.8, 0.6), beside a neighbour paced to about 10 % of the GPU.  NVML is read
every 100 ms, as the backstop reads it while it holds a tenant: the per-process samples
(nvmlDeviceGetProcessUtilization, asked from one sample before the newest seen) and the
whole GPU's (nvmlDeviceGetSamples, GPU utilisation).  Per duty: what the frozen process
ran (its matmuls over its rate unfrozen), what its per-process samples say, and what the
whole GPU's say (the neighbour alone: about 8 %).

    OUT=/some/dir python3 bench/gpu_frozen_samples.py                # on a GPU, as root
    OUT=/some/dir python3 bench/gpu_frozen_samples.py --raw FILE     # the table from FILE

Writes $OUT/frozen-samples.md and the raw samples, $OUT/frozen-samples-raw.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import lib  # noqa: F401  # the checkout first on sys.path

from fcsp_hook import cgroups
from fcsp_hook.nvml import SAMPLE_US

SEGMENTS = [(4, 0.0), (8, 0.9), (5, 0.8), (5, 0.6)]  # seconds, frozen part of each second
GREEDY = """import json, time, torch
a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16); c = torch.empty_like(a)
for _ in range(20): torch.mm(a, a, out=c)
torch.cuda.synchronize(); print("ready", flush=True); ends = []; t = time.time()
while time.time() - t < 30:
    [torch.mm(a, a, out=c) for _ in range(10)]; torch.cuda.synchronize()
    ends.append(time.monotonic_ns() // 1000)
print(json.dumps(ends), flush=True)"""
NEIGHBOUR = """import time, torch
a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16); c = torch.empty_like(a)
t = time.time()
while time.time() - t < 34:
    [torch.mm(a, a, out=c) for _ in range(10)]; torch.cuda.synchronize(); time.sleep(0.018)"""


def measure(raw: Path) -> None:
    """Run the two processes and write every NVML answer to raw, one JSON line each."""
    import pynvml as nv  # noqa: PLC0415

    nv.nvmlInit()
    handle = nv.nvmlDeviceGetHandleByIndex(0)
    mine = cgroups.of_process(os.getpid())
    group = cgroups.Cgroup(mine.directory / f"fcsp-frozen-samples-{os.getpid()}", mine.v2)
    group.directory.mkdir()
    procs = group.directory / "cgroup.procs"
    greedy = subprocess.Popen(
        [sys.executable, "-c", GREEDY],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: procs.write_text("0\n"),  # noqa: PLW1509
    )
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
    with raw.open("w", buffering=1) as log:

        def say(**fields: Any) -> None:
            log.write(json.dumps(fields) + "\n")

        stdout = greedy.stdout
        if stdout is None:
            raise RuntimeError("the matmul process has no stdout")
        stdout.readline()
        name, driver = nv.nvmlDeviceGetName(handle), nv.nvmlSystemGetDriverVersion()
        say(greedy=greedy.pid, neigh=neighbour.pid, gpu=f"{name}, driver {driver}")
        frozen, last_us, last_busy_us, next_read = False, 0, 0, 0
        for seconds, duty in SEGMENTS:
            end = time.monotonic_ns() + seconds * 1_000_000_000
            say(segment=duty, mono_us=time.monotonic_ns() // 1000)
            while time.monotonic_ns() < end:
                now = time.monotonic_ns()
                want = now % 1_000_000_000 < duty * 1e9
                if want != frozen:
                    group.set_frozen(want)
                    frozen = want
                if now >= next_read:
                    next_read = now + 100_000_000
                    row = read(nv, handle, last_us, last_busy_us)
                    last_us = max([last_us, *(at for _, at, _ in samples(row["back"]))])
                    last_busy_us = max([last_busy_us, *(at for at, _ in samples(row["dev"]))])
                    say(**row)
                time.sleep(0.005)
        group.set_frozen(False)
        say(ends=json.loads(stdout.readline()))
    neighbour.kill()
    greedy.wait()
    neighbour.wait()
    group.directory.rmdir()


def read(nv: Any, handle: Any, last_us: int, last_busy_us: int) -> dict[str, Any]:
    """One read: per-process samples asked from 0 and from one sample before the newest
    seen; the whole GPU's after the newest seen.  An error's text, or [] for none."""
    row: dict[str, Any] = {
        "mono_us": time.monotonic_ns() // 1000,
        "real_us": time.time_ns() // 1000,
    }
    for name, since in (("zero", 0), ("back", max(last_us - SAMPLE_US, 1) if last_us else 0)):
        try:
            answer = nv.nvmlDeviceGetProcessUtilization(handle, since)
            row[name] = [(s.pid, s.timeStamp, s.smUtil) for s in answer]
        except nv.NVMLError as exc:
            row[name] = [] if "Not Found" in str(exc) else str(exc)
    try:
        _, busy = nv.nvmlDeviceGetSamples(handle, nv.NVML_GPU_UTILIZATION_SAMPLES, last_busy_us)
        row["dev"] = [(s.timeStamp, s.sampleValue.uiVal) for s in busy]
    except nv.NVMLError as exc:
        row["dev"] = [] if "Not Found" in str(exc) else str(exc)
    return row


def samples(answer: list[Any] | str) -> list[Any]:
    """A read's samples; none where it failed (its error's text)."""
    return answer if isinstance(answer, list) else []


def table(raw: Path) -> list[list[Any]]:
    """Per duty, the mean over its whole seconds: the frozen process's throughput, in percent
    of its throughput unfrozen; the percent of the GPU its per-process samples say it ran
    (each taken once, standing for 200 ms) and how many there were; the whole GPU's
    samples' mean."""
    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    pid = rows[0]["greedy"]
    ends = next(r["ends"] for r in rows if "ends" in r)
    reads = [r for r in rows if "back" in r]
    segments = [(r["mono_us"], r["segment"]) for r in rows if "segment" in r]
    offset = statistics.median(r["real_us"] - r["mono_us"] for r in reads)  # NVML: wall clock

    def duty_of(second: int) -> float | None:
        starts = [d for at, d in segments if at <= second * 1_000_000]
        whole = all(
            at <= second * 1_000_000 or at >= (second + 1) * 1_000_000 for at, _ in segments
        )
        return starts[-1] if starts and whole else None

    batches = Counter(e // 1_000_000 for e in ends)
    seconds = sorted(batches)[1:-1]
    own: dict[int, int] = {}
    for r in reads:
        for p, at, pct in samples(r["back"]):
            if p == pid:
                own.setdefault(at, pct)
    busy: dict[int, int] = {}
    for r in reads:
        for at, pct in samples(r["dev"]):
            busy[at] = pct

    def second_of(at_us: float) -> int:
        return int((at_us - offset) // 1_000_000)

    full = statistics.median(batches[s] for s in seconds if duty_of(s) == 0.0)
    by_duty: dict[float, list[tuple[float, float, int, float]]] = defaultdict(list)
    for s in seconds:
        duty = duty_of(s)
        mine = [pct for at, pct in own.items() if second_of(at) == s]
        gpu = [pct for at, pct in busy.items() if second_of(at) == s]
        if duty is None or not gpu:
            continue
        ran = 100 * batches[s] / full
        by_duty[duty].append((ran, sum(mine) * SAMPLE_US / 1e6, len(mine), statistics.mean(gpu)))
    return [
        [
            f"{duty:.1f}",
            len(per_second),
            f"{statistics.mean(r[0] for r in per_second):.1f} %",
            f"{statistics.mean(r[1] for r in per_second):.1f} %",
            f"{statistics.mean(r[2] for r in per_second):.1f}",
            f"{statistics.mean(r[3] for r in per_second):.1f} %",
        ]
        for duty, per_second in sorted(by_duty.items())
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, help="make the table from these raw samples")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT", "."))
    raw = args.raw or out / "frozen-samples-raw.jsonl"
    if args.raw is None:
        measure(raw)
    header = [
        "frozen part",
        "seconds",
        "its throughput, of unfrozen",
        "its own samples say",
        "its samples a second",
        "whole GPU's samples",
    ]
    first = json.loads(raw.read_text().splitlines()[0])
    lines = [
        "# NVML's samples of a process frozen part of every second",
        "",
        f"- GPU: {first.get('gpu', 'not recorded')}",
        "- command: `OUT=$OUT python3 bench/gpu_frozen_samples.py`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table(raw)]
    (out / "frozen-samples.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
