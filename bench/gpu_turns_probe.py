"""What two busy tenants get of a time-sliced GPU together, and what they would get by turns.

Without MPS the GPU runs one context at a time and switches between two busy ones at its
time slice; the switches cost GPU time, and a 30/70 pair of limited tenants ends up with
~95 % of the GPU between them (bench/results/2026-11-29-compute-s5.md).  This probe
measures that ceiling and what strict turns would give instead: two processes (no FCSP)
running bf16 matmuls of size n, first both at once (time-sliced), then taking turns
through a pair of pipes: A runs 30 % of every cycle's ops and synchronizes, then B runs
70 %, for cycles of several lengths.  Prints each process's throughput over its solo
throughput and the sum.

    python3 bench/gpu_turns_probe.py --n 5632 --seconds 3 --cycle-ms 5 --cycle-ms 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHARE_A = 0.3


def worker(n: int, seconds: float, ops_per_turn: int, wait_fd: int, post_fd: int) -> None:
    import torch  # noqa: PLC0415  # only in the children

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    for _ in range(20):
        torch.mm(a, b, out=c)
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
            torch.mm(a, b, out=c)
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


def spawn(n: int, seconds: float, ops: int, fds: tuple[int, int]) -> subprocess.Popen[str]:
    argv = [sys.executable, __file__, "worker", "--n", str(n), "--seconds", str(seconds)]
    argv += ["--ops", str(ops), "--wait-fd", str(fds[0]), "--post-fd", str(fds[1])]
    keep = tuple(fd for fd in fds if fd >= 0)
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=keep
    )


def run(n: int, seconds: float, plan: list[tuple[int, tuple[int, int]]]) -> list[float]:
    """Start the workers of `plan` (ops per turn, (wait fd, post fd)); ops per second each."""
    procs = [spawn(n, seconds, ops, fds) for ops, fds in plan]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
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
    free = 8  # ops between synchronizes when not taking turns
    (solo,) = run(args.n, args.seconds, [(free, (-1, -1))])
    print("| run | A (30 %) of solo | B (70 %) of solo | together |")
    print("|---|---|---|---|")
    both = run(args.n, args.seconds, [(free, (-1, -1)), (free, (-1, -1))])
    print(f"| both at once, time-sliced | {both[0] / solo:.3f} | {both[1] / solo:.3f} "
          f"| {sum(both) / solo:.3f} |", flush=True)  # fmt: skip
    for cycle in args.cycle_ms or [5.0, 20.0]:
        ops_a = max(1, round(SHARE_A * cycle / args.op_ms))
        ops_b = max(1, round((1 - SHARE_A) * cycle / args.op_ms))
        a_to_b, b_to_a = os.pipe(), os.pipe()
        os.write(b_to_a[1], b"x")  # A goes first
        rates = run(
            args.n,
            args.seconds,
            [(ops_a, (b_to_a[0], a_to_b[1])), (ops_b, (a_to_b[0], b_to_a[1]))],
        )
        print(f"| turns of {cycle:g} ms ({ops_a} + {ops_b} ops) | {rates[0] / solo:.3f} "
              f"| {rates[1] / solo:.3f} | {sum(rates) / solo:.3f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
