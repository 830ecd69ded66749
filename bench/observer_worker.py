"""One tenant of bench/observer_bench.py: a PyTorch matmul loop steered over stdin.

Started with LD_PRELOAD=libvgpu.so and FCSP_SLOT_DIR=<its slot>.  Commands, one per
line on stdin:

    run        matmuls back to back (saturating)
    light      a 10 % duty cycle: matmuls for 10 ms, nothing for 90 ms
    idle       no GPU work at all
    latency    a tiny kernel and a synchronize, again and again (latency samples)
    stats      print {"lat": [...]} with the latency samples (us) so far, and clear them
    exit

Every 20 ms it prints {"t": CLOCK_MONOTONIC seconds, "n": matmuls completed so far}.
--fake runs without CUDA (sleeps stand in for kernels) to check the plumbing anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPORT_EVERY = 0.02


def kernels(args: argparse.Namespace) -> tuple[Callable[[], None], Callable[[], None]]:
    """(a batch of matmuls with a synchronize, a tiny kernel with a synchronize)."""
    if args.fake:
        report = fake_shim()

        def fake_batch() -> None:
            time.sleep(0.002)
            report(2_000_000)

        return fake_batch, (lambda: time.sleep(0.00002))
    import torch  # noqa: PLC0415  # only on the GPU machine

    a = torch.randn(args.size, args.size, device="cuda", dtype=torch.float16)
    b = torch.randn(args.size, args.size, device="cuda", dtype=torch.float16)
    small = torch.zeros(256, device="cuda")
    torch.cuda.synchronize()

    def batch() -> None:
        for _ in range(args.batch):
            torch.matmul(a, b)
        torch.cuda.synchronize()

    def tiny() -> None:
        small.add_(1.0)
        torch.cuda.synchronize()

    # Warm up before reporting ready: cuBLAS creates its handle and loads its kernels on
    # the first matmul (~150 ms), which would otherwise count against the first reclaim.
    batch()
    tiny()
    return batch, tiny


def fake_shim() -> Callable[[int], None]:
    """--fake: play libvgpu.so's part in the usage file, so the observer sees activity."""
    from lib.scene import FakeShim  # noqa: PLC0415  # only without a GPU

    slot_dir = os.environ.get("FCSP_SLOT_DIR")
    if not slot_dir:
        return lambda busy_ns: None
    shim = FakeShim(Path(slot_dir))
    counters = {"launches": 0, "busy": 0}

    def report(busy_ns: int) -> None:
        counters["launches"] += 1
        counters["busy"] += busy_ns
        # Pretend it always wants more: throttled as long as it was busy.
        shim.report(counters["launches"], counters["busy"], counters["busy"])

    return report


_out_lock = threading.Lock()


def emit(doc: dict[str, object]) -> None:
    """One JSON line.  Two threads print (stats replies and progress); a long line written
    by one would otherwise be cut by the other's at the stream buffer's boundary."""
    line = json.dumps(doc) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


class Commands:
    """The latest command from stdin, and the latency samples."""

    def __init__(self) -> None:
        self.mode = "idle"
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            word = line.strip()
            if word == "stats":
                with self.lock:
                    out, self.latencies = self.latencies, []
                emit({"lat": out})
            elif word:
                self.mode = word
        self.mode = "exit"

    def record(self, us: float) -> None:
        with self.lock:
            self.latencies.append(us)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096, help="matmul side (fp16)")
    parser.add_argument("--batch", type=int, default=8, help="matmuls between synchronizes")
    parser.add_argument("--fake", action="store_true", help="no CUDA: sleep instead")
    args = parser.parse_args()
    batch, tiny = kernels(args)
    commands = Commands()
    done = 0
    last_report = 0.0
    emit({"ready": True})
    while (mode := commands.mode) != "exit":
        if mode == "run":
            batch()
            done += args.batch
        elif mode == "light":
            phase = time.monotonic() % 0.1
            if phase < 0.01:
                batch()
                done += args.batch
            else:
                time.sleep(0.1 - phase)
        elif mode == "latency":
            start = time.perf_counter()
            tiny()
            commands.record((time.perf_counter() - start) * 1e6)
        else:
            time.sleep(0.002)
        now = time.monotonic()
        if now - last_report >= REPORT_EVERY:
            last_report = now
            emit({"t": now, "n": done})
    return 0


if __name__ == "__main__":
    sys.exit(main())
