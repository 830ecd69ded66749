"""CPU cost of fcsp-observer with N tenants (no GPU needed).

Creates N slots in a temporary run_dir, simulates the shims of half of them (usage
counters bumped every 5 ms from this process), runs the observer at its default
interval (or --interval-ms), and reads the observer's user+system CPU time from
/proc/<pid>/stat over a steady window after start-up.

    python3 bench/observer_cpu.py --tenants 32 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import observer_proc  # noqa: E402  # bench/, beside this script

from fcsp_hook import abi, slot  # noqa: E402  # after the path tweak, as a script

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval-ms", type=int, default=0, help="0: the config default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        slot.ensure_tenants_dir(run)
        fds = []
        for i in range(args.tenants):
            cid = f"tenant{i:02d}"
            dev = slot.DeviceLimits(host_index=i % 4, sm_requested_centi=2500)
            slot.write_slot(
                slot.slot_path(run, cid), slot.SlotSpec(container_id=cid, devices=(dev,)), {}
            )
            if i % 2 == 0:
                fds.append(os.open(slot.slot_path(run, cid) / abi.USAGE_FILE, os.O_RDWR))
        interval = f"interval_ms = {args.interval_ms}\n" if args.interval_ms else ""
        config = f'[paths]\nrun_dir = "{run}"\n[observer]\nmetrics_port = 0\n{interval}'
        halt = threading.Event()

        def shims() -> None:
            n = 0
            while not halt.wait(0.005):
                n += 1
                data = struct.pack("<9Q", 0, 0, 0, 0, n, n, n * 2_000_000, n * 1_000_000, 0)
                for fd in fds:
                    os.pwrite(fd, data, abi.Usage.device.offset)

        thread = threading.Thread(target=shims, daemon=True)
        thread.start()
        log = Path(tmp) / "observer.log"
        proc = observer_proc.start(Path(tmp) / "config.toml", config, log)
        time.sleep(3.0)  # start-up (imports, first ticks) is not the steady cost
        cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.seconds)
        cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
        state = json.loads((run / "observer.json").read_text())
        observer_proc.stop(proc)
        if proc.returncode != 0:
            print(log.read_text(errors="replace")[-2000:], file=sys.stderr)
            return 1
        halt.set()
        thread.join()
        for fd in fds:
            os.close(fd)
    wall = wall1 - wall0
    user, system = (cpu1[0] - cpu0[0]) / wall * 100, (cpu1[1] - cpu0[1]) / wall * 100
    print(
        f"{args.tenants} tenants, interval {args.interval_ms or 'default'} ms: "
        f"{user + system:.2f}% of one core ({user:.2f}% user, {system:.2f}% system) "
        f"over {wall:.1f} s; load average {os.getloadavg()[0]:.2f}; "
        f"mean tick {state['tick_seconds_total'] / max(state['ticks'], 1) * 1e6:.0f} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
