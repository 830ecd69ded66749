"""What two busy tenants get of a time-sliced GPU together, and what they would get by turns.

Without MPS the GPU runs one context at a time and switches between two busy ones at its
time slice; the switches cost GPU time, and a 30/70 pair of limited tenants ends up with
~95 % of the GPU between them (bench/results/compute.md).  This probe measures that
ceiling and what strict turns would give instead: two processes (no FCSP) running bf16
matmuls of size n, first both at once (time-sliced), then taking turns through a pair of
pipes: A runs 30 % of every cycle's ops and synchronizes, then B runs 70 %, for cycles of
several lengths.  Reports each process's throughput over its solo throughput and the sum.

    OUT=/some/dir python3 bench/gpu_turns_probe.py --n 5632 --seconds 3 --cycle-ms 5 --cycle-ms 20

Prints the table as it goes; writes it as the "turns" part of $OUT/compute-diagnosis.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from lib import torchwork
from lib.report import Report, out_dir
from lib.scene import Scene, python

SHARE_A = 0.3
FREE = 8  # ops between synchronizes when not taking turns


def worker(n: int, seconds: float, ops_per_turn: int, wait_fd: int, post_fd: int) -> None:
    """Ops in turns: wait for the partner's token, run this turn's ops, pass the token."""
    import torch  # noqa: PLC0415  # only in the children

    op = torchwork.matmul(n)
    for _ in range(20):
        op()
    torch.cuda.synchronize()
    print("ready", flush=True)
    sys.stdin.readline()  # go
    ops = 0
    start = time.monotonic()
    stop = start + seconds
    while time.monotonic() < stop:
        if wait_fd >= 0 and not os.read(wait_fd, 1):
            break  # the other side is done
        for _ in range(ops_per_turn):
            op()
        ops += ops_per_turn
        torch.cuda.synchronize()
        try:
            if post_fd >= 0:
                os.write(post_fd, b"x")
        except BrokenPipeError:
            break  # the other side is done
    torch.cuda.synchronize()
    elapsed = time.monotonic() - start
    if post_fd >= 0:
        os.close(post_fd)  # lets a waiting partner see the end
    print(json.dumps({"ops": ops, "seconds": elapsed}), flush=True)


def run(
    scene: Scene, tag: str, n: int, seconds: float, plan: list[tuple[int, tuple[int, int]]]
) -> list[float]:
    """Start the workers of `plan` (ops per turn, (wait fd, post fd)); ops per second each."""
    procs = []
    for i, (ops, fds) in enumerate(plan):
        argv = python(__file__, "worker", "--n", str(n), "--seconds", str(seconds))
        argv += ["--ops", str(ops), "--wait-fd", str(fds[0]), "--post-fd", str(fds[1])]
        keep = [fd for fd in fds if fd >= 0]
        procs.append(scene.spawn(f"{tag}-{i}", argv, interactive=True, pass_fds=keep).proc)
    for _, fds in plan:
        for fd in fds:
            if fd >= 0:
                os.close(fd)  # the children hold them now
    for p in procs:
        p.stdout.readline()  # type: ignore[union-attr]  # ready
    for p in procs:
        p.stdin.write("go\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
    rates = []
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 60)
        result = json.loads(out.strip().splitlines()[-1])
        rates.append(result["ops"] / result["seconds"])
    return rates


def measure(scene: Scene, args: argparse.Namespace, doc: Report) -> None:
    def row(*cells: str) -> None:
        line = "| " + " | ".join(cells) + " |"
        doc.add(line)
        print(line, flush=True)

    (solo,) = run(scene, "solo", args.n, args.seconds, [(FREE, (-1, -1))])
    row("run", "A (30 %) of solo", "B (70 %) of solo", "together")
    row("---", "---", "---", "---")
    both = run(scene, "both", args.n, args.seconds, [(FREE, (-1, -1)), (FREE, (-1, -1))])
    row("both at once, time-sliced", f"{both[0] / solo:.3f}", f"{both[1] / solo:.3f}",
        f"{sum(both) / solo:.3f}")  # fmt: skip
    for cycle in args.cycle_ms or [5.0, 20.0]:
        ops_a = max(1, round(SHARE_A * cycle / args.op_ms))
        ops_b = max(1, round((1 - SHARE_A) * cycle / args.op_ms))
        a_to_b, b_to_a = os.pipe(), os.pipe()
        os.write(b_to_a[1], b"x")  # A goes first
        plan = [(ops_a, (b_to_a[0], a_to_b[1])), (ops_b, (a_to_b[0], b_to_a[1]))]
        rates = run(scene, f"turns-{cycle:g}", args.n, args.seconds, plan)
        row(f"turns of {cycle:g} ms ({ops_a} + {ops_b} ops)", f"{rates[0] / solo:.3f}",
            f"{rates[1] / solo:.3f}", f"{sum(rates) / solo:.3f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    for name in ("--n", "--ops", "--wait-fd", "--post-fd"):
        w.add_argument(name, type=int, required=True)
    w.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--n", type=int, default=5632)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--op-ms", type=float, default=0.52, help="time per op alone")
    parser.add_argument("--cycle-ms", type=float, action="append")
    args = parser.parse_args()
    if args.cmd == "worker":
        worker(args.n, args.seconds, args.ops, args.wait_fd, args.post_fd)
        return 0
    doc = Report(
        "compute-diagnosis",
        "Two busy tenants on a time-sliced GPU: together, and by turns",
        "Two processes without FCSP, bf16 matmuls: both at once (the driver switches between "
        "them every time slice), then taking turns through a pair of pipes (A runs 30 % of "
        "each cycle's ops, then B 70 %); each one's throughput over its solo throughput.",
        out_dir(),
        part="turns",
        extra=[f"n = {args.n}, {args.seconds:g} s per run, {args.op_ms:g} ms per op alone"],
    )
    doc.add("")
    raw = doc.out / "compute-diagnosis-raw"
    with tempfile.TemporaryDirectory() as tmp, Scene(Path(tmp), raw) as scene:
        measure(scene, args, doc)
    doc.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
