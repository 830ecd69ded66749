"""CPU cost of fcsp-observer with N tenants (no GPU needed).

Creates N slots in a temporary run_dir, plays the shims of half of them (usage counters
bumped every 5 ms from this process), runs the observer at its default interval (or
--interval-ms), and reads the observer's user+system CPU time from /proc/<pid>/stat over
a steady window after start-up.  Prints one line (the figure the observer document and
the README quote).

    python3 bench/observer_cpu.py --tenants 32 --seconds 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from lib.scene import Device, FakeShim, Scene, cpu_seconds

STARTUP_S = 3.0  # start-up (imports, first ticks) is not the steady cost


def measure(scene: Scene, tenants: int, seconds: float, interval_ms: int) -> str:
    shims = []
    for i in range(tenants):
        slot = scene.slot(f"tenant{i:02d}", [Device(host_index=i % 4, sm_centi=2500)])
        if i % 2 == 0:
            shims.append(FakeShim(slot))
    halt = threading.Event()

    def play() -> None:
        n = 0
        while not halt.wait(0.005):
            n += 1
            for shim in shims:
                shim.report(n, n * 2_000_000, n * 1_000_000)

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    try:
        scene.start_observer(interval_ms=interval_ms)
        assert scene.observer is not None  # noqa: S101  # just started
        pid = scene.observer.pid
        time.sleep(STARTUP_S)
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        cpu1, wall1 = cpu_seconds(pid), time.monotonic()
        state = scene.observer_state()
        if scene.stop_observer() != 0:
            log = (scene.raw / "observer.log").read_text(errors="replace")
            raise RuntimeError(f"the observer failed:\n{log[-2000:]}")
    finally:
        halt.set()
        thread.join()
        for shim in shims:
            shim.close()
    wall = wall1 - wall0
    user, system = (cpu1[0] - cpu0[0]) / wall * 100, (cpu1[1] - cpu0[1]) / wall * 100
    return (
        f"{tenants} tenants, interval {interval_ms or 'default'} ms: "
        f"{user + system:.2f}% of one core ({user:.2f}% user, {system:.2f}% system) "
        f"over {wall:.1f} s; load average {os.getloadavg()[0]:.2f}; "
        f"mean tick {state['tick_seconds_total'] / max(state['ticks'], 1) * 1e6:.0f} us"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval-ms", type=int, default=0, help="0: the config default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Scene(Path(tmp)) as scene:
        try:
            print(measure(scene, args.tenants, args.seconds, args.interval_ms))
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
