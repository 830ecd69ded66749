"""How much the FCSP hook adds to a container start.

Times `podman run --rm` of a trivial container from a tiny rootfs, with and without
fcsp annotations, interleaved so that drift hits both alike, and reads the hook's
own duration from its log.  Uses the installed hooks.d entry (run `make install`).
Needs no GPU.

    python3 bench/hook_latency.py --runs 30

Writes bench/results/hook-latency.md ($OUT/hook-latency.md where OUT is set; --out FILE
elsewhere) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lib
from lib.report import Report, collect_meta

from tests.containers import build_base_rootfs  # the repo's own helper


def _ulimits() -> list[str]:
    # podman's defaults exceed some hosts' hard limits (the CI machine's: 20000 files).
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


def time_run(rootfs: Path, annotated: bool) -> float:
    argv = ["podman", "run", "--rm", "--runtime", "runc", *_ulimits()]
    if annotated:
        argv += [
            "--annotation",
            "fcsp.sm=40",
            "--annotation",
            "fcsp.mem=8G",
            "-e",
            "NVIDIA_VISIBLE_DEVICES=0",
        ]
    argv += ["--rootfs", str(rootfs), "/usr/bin/cat", "/etc/hostname"]
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"podman run failed: {result.stderr.strip()}")
    return elapsed * 1000


def process_ms(argv: list[str], stdin: bytes, runs: int) -> list[float]:
    """Wall time of a whole process, start-up included."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, input=stdin, capture_output=True, check=False)
        times.append((time.perf_counter() - start) * 1000)
    return times


def hook_durations(log: Path, since: str) -> list[float]:
    durations = []
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "tenant slot ready" and record["timestamp"] >= since:
            durations.append(float(record["duration_ms"]))
    return durations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ["OUT"]) / "hook-latency.md"
        if os.environ.get("OUT")
        else lib.REPO / "bench" / "results" / "hook-latency.md",
        help="the document to write (default: %(default)s)",
    )
    parser.add_argument("--log", type=Path, default=Path("/var/log/fcsp/hook.log"))
    args = parser.parse_args()
    meta = collect_meta(with_gpu=False)  # as the run starts
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = build_base_rootfs(Path(tmp) / "rootfs")
        time_run(rootfs, False)  # warm caches once for both
        time_run(rootfs, True)
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        plain, fcsp = [], []
        for i in range(args.runs):
            order = (False, True) if i % 2 == 0 else (True, False)
            for annotated in order:
                (fcsp if annotated else plain).append(time_run(rootfs, annotated))
    hook_ms = hook_durations(args.log, since) if args.log.exists() else []
    python = json.loads(Path("/usr/share/containers/oci/hooks.d/fcsp.json").read_text())["hook"][
        "path"
    ]
    bare = process_ms([python, "-I", "-c", "pass"], b"", args.runs)
    stopped = json.dumps({"id": "bench-absent", "status": "stopped"}).encode()
    hook_argv = [python, "-I", "-m", "fcsp_hook.hook.oci_hook", "oci"]
    post = process_ms(hook_argv, stopped, args.runs)

    def row(name: str, values: list[float]) -> str:
        q = statistics.quantiles(values, n=10)
        median = statistics.median(values)
        return f"| {name} | {len(values)} | {median:.1f} | {q[0]:.1f} | {q[-1]:.1f} |"

    podman_version = subprocess.run(
        ["podman", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    diff = statistics.median(fcsp) - statistics.median(plain)
    doc = Report(
        "hook-latency",
        "Hook latency: what fcsp-hook adds to a container start",
        "How much longer `podman run --rm` of a trivial container takes with fcsp annotations "
        "than without (the two kinds alternate run by run), the hook's own prestart work from "
        "its log, and the two Python processes it costs.",
        args.out.parent,
        meta=meta,
        with_gpu=False,
        extra=[
            f"{podman_version}, runc; {platform.node()} ({platform.machine()}, "
            f"{platform.release()}); after `make install`",
            "container: `podman run --rm --runtime runc --rootfs <busybox+glibc cat>"
            " /usr/bin/cat /etc/hostname`; annotated runs add `fcsp.sm=40 fcsp.mem=8G` and"
            " `NVIDIA_VISIBLE_DEVICES=0`",
        ],
    )
    lines = [
        "",
        "| run | n | median ms | p10 ms | p90 ms |",
        "|---|---|---|---|---|",
        row("plain `podman run --rm`", plain),
        row("with fcsp annotations", fcsp),
    ]
    if len(hook_ms) >= 2:
        lines.append(row("fcsp-hook prestart, its own work (from its log)", hook_ms))
    lines.append(row("`python3 -I -c pass` (the hook's interpreter, bare start)", bare))
    lines.append(row("`fcsp-hook oci` poststop process, whole", post))
    lines += [
        "",
        f"**Difference of medians: {diff:+.1f} ms per container start** "
        "(the prestart and poststop hooks together, Python start-up included).",
    ]
    doc.add(*lines)
    text = doc.render()
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
