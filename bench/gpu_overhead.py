"""In-process A/B cost of libvgpu.so's launch and allocation hooks, run by gpu_overhead.sh.

    python3 bench/gpu_overhead.py --probe PATH [--rounds 30] [--work DIR]

The probe (bench/gpu_overhead.cu, built by the shell script) runs with the shim preloaded
and alternates blocks of calls through the driver's own entry points and through the
hooks; the per-call difference is the shim's cost, free of the process-to-process spread
that hides it when separate processes are compared.  Four shim states: no slot, a 64 GiB
quota at share 100 %, the same at share 90 % (the limiter's full path, never throttled
by such tiny kernels), and the 64 GiB quota in spill mode (every launch looks for spilled
ranges; none here).  Writes $OUT/overhead.md.  gpu_compute.py runs the same probe.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

from lib.report import Report, out_dir
from lib.scene import Device, Scene

from fcsp_hook.errors import SlotError
from fcsp_hook.slot import abi, files

ROUNDS = 30
QUOTA = 64 << 30
MODES = (  # (name, label, sm_centi of the slot, None: no slot; its memory mode)
    ("passthrough", "pass-through (no slot, no BUD_*)", None, abi.MemMode.HARD),
    ("quota", "memory quota 64 GiB, share 100 %", 10000, abi.MemMode.HARD),
    (
        "limited",
        "memory quota 64 GiB, share 90 % (limiter on, tokens available)",
        9000,
        abi.MemMode.HARD,
    ),
    (
        "spill",
        "memory quota 64 GiB in spill mode, nothing spilled, share 100 %",
        10000,
        abi.MemMode.SPILL,
    ),
)
FIELDS = ("hooked", "launch_us", "launch_extra_us", "malloc_free_us", "malloc_free_extra_us")


def probe_fields(text: str) -> dict[str, str]:
    """bench/gpu_overhead.cu's "name value" lines, values as printed."""
    fields = {}
    for line in text.splitlines():
        name, _, value = line.strip().partition(" ")
        if name and value:
            fields[name] = value.strip()
    return fields


def run_probe(
    probe: str, env: dict[str, str], rounds: int, log: Path
) -> tuple[int, dict[str, str]]:
    """One run of the probe: its exit status and fields; its output kept in `log`."""
    done = subprocess.run(
        [probe, str(rounds)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    log.write_text(done.stdout + done.stderr)
    return done.returncode, probe_fields(done.stdout)


def measure(probe: str, rounds: int, scene: Scene, out: Path) -> Report:
    doc = Report(
        "overhead",
        "Hook overhead, measured inside one process",
        "What libvgpu.so adds to an empty-kernel launch and to a 1 MiB cudaMalloc+cudaFree: "
        "one process with the shim preloaded alternates blocks of calls through the driver's "
        "own entry points (looked up in libcuda.so.1's symbol table, past the interposer) and "
        "through the entry points the application resolves (the shim's); the per-call "
        "difference is the shim's cost.",
        out,
        extra=[f"nvcc probe bench/gpu_overhead.cu, {rounds} rounds"],
    )
    rows = []
    throttled_ms = "?"
    for mode, label, sm_centi, mem_mode in MODES:
        slot = None
        if sm_centi is not None:
            slot = scene.slot(
                mode,
                [Device(mem_bytes=QUOTA, sm_centi=sm_centi)],
                mem_mode=mem_mode,
                spill_centi=abi.WHOLE_GPU_CENTI if mem_mode == abi.MemMode.SPILL else 0,
                observed=False,
            )
        env = scene.env(slot) | {"LD_PRELOAD": str(scene.shim)}
        _, fields = run_probe(probe, env, rounds, scene.raw / f"overhead-{mode}.txt")
        rows.append([label, *(fields.get(name, "") for name in FIELDS)])
        if "launch_us" not in fields:
            text = (scene.raw / f"overhead-{mode}.txt").read_text()
            print("\n".join(f"    {line}" for line in text.splitlines()), file=sys.stderr)
        if mode == "limited" and slot is not None:
            with contextlib.suppress(OSError, SlotError):
                usage = files.read_usage(slot / abi.USAGE_FILE).device[0]
                throttled_ms = f"{usage.throttled_ns / 1e6}"
    header = ["shim state", "hooked", "driver launch (us)", "extra per launch (us)",
              "driver malloc+free 1 MiB (us)", "extra per malloc+free (us)"]  # fmt: skip
    doc.table(header, rows)
    doc.add(
        "",
        f"Per round: 5000 empty-kernel launches 10 us apart and 300 malloc+free pairs of 1 MiB "
        f"through each path; {rounds} rounds, alternating which path goes first; medians of "
        f"the paired differences. Time the limited tenant spent throttled: {throttled_ms} ms.",
    )
    return doc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", required=True, help="the built bench/gpu_overhead.cu")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--work", type=Path, help="scratch directory (default: a new one)")
    args = parser.parse_args()
    out = out_dir()
    with tempfile.TemporaryDirectory(prefix="fcsp-overhead-") as tmp:
        with Scene(args.work or Path(tmp), raw=out / "overhead-raw") as scene:
            doc = measure(args.probe, args.rounds, scene, out)
        print(doc.render(), end="")
        doc.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
