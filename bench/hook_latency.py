"""How much the FCSP hook adds to a container start.

Times `podman run --rm` of a trivial container from a tiny rootfs, with and without
fcsp annotations, interleaved so that drift hits both alike, and reads the hook's
own duration from its log.  Uses the installed hooks.d entry (run `make install`).

    python3 bench/hook_latency.py --runs 30 --out bench/results/<date>-hook-latency.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.containers import build_base_rootfs  # noqa: E402  # the repo's own helper


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
    parser.add_argument("--out", type=Path)
    parser.add_argument("--log", type=Path, default=Path("/var/log/fcsp/hook.log"))
    args = parser.parse_args()

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
    hook_argv = [python, "-I", "-m", "fcsp_hook.hook", "oci"]
    post = process_ms(hook_argv, stopped, args.runs)

    def row(name: str, values: list[float]) -> str:
        q = statistics.quantiles(values, n=10)
        median = statistics.median(values)
        return f"| {name} | {len(values)} | {median:.1f} | {q[0]:.1f} | {q[-1]:.1f} |"

    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    podman_version = subprocess.run(
        ["podman", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    diff = statistics.median(fcsp) - statistics.median(plain)
    lines = [
        "# Hook latency: what fcsp-hook adds to a container start",
        "",
        f"- date: {datetime.date.today()}; commit {commit}; {podman_version}, runc; "
        f"{platform.node()} ({platform.machine()}, {platform.release()})",
        f"- command: `python3 bench/hook_latency.py --runs {args.runs}` (after `make install`)",
        "- container: `podman run --rm --runtime runc --rootfs <busybox+glibc cat>"
        " /usr/bin/cat /etc/hostname`;"
        " annotated runs add `fcsp.sm=40 fcsp.mem=8G` and `NVIDIA_VISIBLE_DEVICES=0`;"
        " the two kinds alternate run by run.",
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
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
