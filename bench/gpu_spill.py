"""Memory past the quota on a real GPU: spill mode against the same work with room in its
quota, and against spill without FCSP's prefetch.

    OUT=$OUT python3 bench/gpu_spill.py [--quota-gib 8] [--seconds 10] [--repeat 3]
                                        [--only serve,...]

Sections (each tenant a process under libvgpu.so with a slot of this bench's making; no
observer: spill mode is the shim's own):
  serve     sessions' KV-cache buffers totalling 1.5x and 2x the quota, 4 hot at a time, the
            hot set moving: GB/s under spill, spill with prefetch off
            (BUD_PREFETCH_ENABLED=0), and with room in the quota (profile llm_inference, as
            for infer and neighbour; train runs with the training profile); each run
            --repeat times, the median reported with the spread of spill / room
  infer     an fp16 MLP whose weights take 1.0, 1.1 and 1.25x the quota: tokens/s (and a PNG),
            against the bound the bus sets: a pass with room in the quota plus the spilled
            bytes read at the host-to-device copy rate
  train     one training step of a model whose state takes 1.25x the quota completes
  neighbour a tenant at its hard quota running matmuls at strict 50 %, next to a tenant at
            strict 50 % serving 2x its quota (once its sessions are written), against next
            to the same tenant with room

Never more unified memory than the card has free: the largest working set is 2x the quota,
the spill bound 1.5x (and the shim refuses a spill past the GPU's free memory).
Writes $OUT/spill.md, $OUT/spill.png and $OUT/spill-raw.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lib  # noqa: F401  # the checkout first on sys.path
from lib.report import Report, out_dir, save_json
from lib.scene import Device, Scene
from spill_workers import BATCH, MOVE_EVERY

from fcsp_hook.slot import abi, files

WORKER = Path(__file__).resolve().parent / "spill_workers.py"
MATMUL = Path(__file__).resolve().parent / "authority_workers.py"  # its `matmul` tenant
GiB_MIB = 1024
SECTIONS = ("serve", "infer", "train", "neighbour")
SESSION_MIB = 256
HOT = 4
ONE_X = abi.WHOLE_GPU_CENTI
# The spill bound: 1.5x the quota, so that sessions of 2x the quota and the framework's own
# allocations fit (the default bound, 1x, would refuse the last of them).
SPILL_BOUND = ONE_X * 3 // 2


class Bench:
    def __init__(self, scene: Scene, quota_mib: int, seconds: float, repeat: int = 1) -> None:
        self.repeat = repeat
        self.scene = scene
        self.quota_mib = quota_mib
        self.seconds = seconds
        self.runs = 0

    def slot(
        self,
        quota_mib: int,
        *,
        spill: bool,
        sm_centi: int = ONE_X,
        profile: str = "llm_inference",
        **slot: Any,
    ) -> Path:
        """A fresh private slot: the quota on GPU 0, spill mode (bound SPILL_BOUND, the
        profile's eviction and prefetch) or hard."""
        self.runs += 1
        return self.scene.slot(
            f"t{self.runs}",
            [Device(mem_bytes=quota_mib << 20, sm_centi=sm_centi)],
            mode=abi.IsolationMode.STRICT if sm_centi < ONE_X else abi.IsolationMode.NONE,
            mem_mode=abi.MemMode.SPILL if spill else abi.MemMode.HARD,
            spill_centi=SPILL_BOUND if spill else 0,
            uvm_profile=profile,
            observed=False,
            **slot,
        )

    def start(self, slot: Path, *args: str, worker: Path = WORKER, **env: str) -> Any:
        return self.scene.spawn(
            f"{args[0]}-{self.runs}",
            [sys.executable, str(worker), *args],
            env=self.scene.env(slot, extra={"BUD_LOG_LEVEL": "info", **env}),
        )

    def run(self, slot: Path, *args: str, worker: Path = WORKER, **env: str) -> dict[str, Any]:
        """The worker's result, with what the shim moved (the slot's counters, and the
        line spill mode writes at exit)."""
        child = self.start(slot, *args, worker=worker, **env)
        result = self.scene.collect_one(child, timeout=self.seconds + 600)
        device = files.read_usage(slot / abi.USAGE_FILE).device[0]
        result["moved_in_gib"] = device.mem_migrated_in_bytes / (1 << 30)
        result["moved_out_gib"] = device.mem_migrated_out_bytes / (1 << 30)
        result["spill_peak_gib"] = device.mem_spill_peak_bytes / (1 << 30)
        result["shim"] = [
            line for line in child.err.read_text(errors="replace").splitlines() if "spill" in line
        ]
        print(f"  {args[0]} {args[1]}: {result}", flush=True)
        return result

    @staticmethod
    def wait_ready(child: Any, timeout: float = 300) -> None:
        """Until a worker says it is set up (its "ready" line)."""
        end = time.monotonic() + timeout
        while '"ready"' not in child.out.read_text() and child.proc.poll() is None:
            if time.monotonic() > end:
                raise TimeoutError(f"{child.tag}: not ready in {timeout} s")
            time.sleep(0.1)

    def room(self, working_mib: int) -> int:
        """A quota with room for the working set and the framework's own."""
        return working_mib + 2 * GiB_MIB


def section_serve(b: Bench, raw: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for ratio in (1.5, 2.0):
        total = int(b.quota_mib * ratio)
        args = ("serve", str(total), str(SESSION_MIB), str(HOT), str(b.seconds))
        runs: dict[str, list[dict[str, Any]]] = {"room": [], "spill": [], "no_prefetch": []}
        for _ in range(b.repeat):  # interleaved: drift in the card's state hits all three
            runs["room"].append(b.run(b.slot(b.room(total), spill=False), *args))
            runs["spill"].append(b.run(b.slot(b.quota_mib, spill=True), *args))
            runs["no_prefetch"].append(
                b.run(b.slot(b.quota_mib, spill=True), *args, BUD_PREFETCH_ENABLED="0")
            )
        raw[f"serve {ratio}x"] = runs
        room, spill, plain = (
            statistics.median(r["gbps"] for r in runs[k]) for k in ("room", "spill", "no_prefetch")
        )
        ratios = sorted(
            s["gbps"] / r["gbps"] for s, r in zip(runs["spill"], runs["room"], strict=True)
        )
        rows.append(
            [
                f"serve, sessions {ratio}x the quota",
                f"{spill:.1f} GB/s",
                f"{room:.1f} GB/s",
                f"{spill / room:.2f}"
                + (f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""),
                f"{plain:.1f} GB/s ({plain / room:.2f})",
            ]
        )
    return rows


def section_infer(b: Bench, raw: dict[str, Any], report: Report) -> list[list[Any]]:
    rows, points, bounds = [], [], []
    largest = int(b.quota_mib * 1.25)
    room = b.run(b.slot(b.room(largest), spill=False), "infer", str(largest), str(b.seconds))
    bus_gbps = b.run(b.slot(b.room(GiB_MIB), spill=False), "h2d", str(GiB_MIB))["gbps"]
    runs = []
    for ratio in (1.0, 1.1, 1.25):
        weights = int(b.quota_mib * ratio)
        spill = b.run(b.slot(b.quota_mib, spill=True), "infer", str(weights), str(b.seconds))
        runs.append(spill)
        # A pass with room takes time in proportion to the weights it reads; past the quota,
        # the spilled part is read over the bus at best at the copy rate.
        room_pass_s = BATCH / room["tokens_per_s"] * weights / largest
        bus_s = spill["spill_peak_gib"] * (1 << 30) / (bus_gbps * 1e9)
        bound = BATCH / (room_pass_s + bus_s)
        points.append((ratio, spill["tokens_per_s"]))
        bounds.append((ratio, bound))
        rows.append(
            [
                f"inference, weights {ratio}x the quota",
                f"{spill['tokens_per_s']:.0f} tokens/s",
                f"{room['tokens_per_s']:.0f} tokens/s (1.25x)",
                f"{spill['tokens_per_s'] / room['tokens_per_s']:.2f}",
                f"{spill['spill_peak_gib']:.2f} GiB in host memory; bus bound {bound:.0f}"
                f" tokens/s: {spill['tokens_per_s'] / bound:.2f} of it",
            ]
        )
    raw["infer"] = {
        "points": points,
        "bus_bounds": bounds,
        "h2d_gbps": bus_gbps,
        "room_1.25x": room["tokens_per_s"],
        "runs": runs,
    }

    def draw(plt: Any) -> Any:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label="spill")
        ax.plot(
            [p[0] for p in bounds],
            [p[1] for p in bounds],
            linestyle=":",
            marker="x",
            label=f"bus bound ({bus_gbps:.0f} GB/s host to device)",
        )
        ax.axhline(
            room["tokens_per_s"], linestyle="--", color="gray", label="room in the quota (1.25x)"
        )
        ax.set_xlabel("weights / quota")
        ax.set_ylabel("tokens/s")
        ax.legend()
        fig.tight_layout()
        return fig

    report.plot(draw)
    return rows


def section_train(b: Bench, raw: dict[str, Any]) -> list[list[Any]]:
    model = int(b.quota_mib * 1.25)
    result = b.run(b.slot(b.quota_mib, spill=True, profile="training"), "train", str(model))
    raw["train"] = result
    return [
        [
            "training step, state 1.25x the quota",
            f"completes in {result['seconds']:.1f} s",
            "",
            "",
            f"loss {result['loss']:.3g}",
        ]
    ]


def section_neighbour(b: Bench, raw: dict[str, Any]) -> list[list[Any]]:
    total = int(b.quota_mib * 2)
    per_s = {}
    for case, spill in (("next to room", False), ("next to spill", True)):
        other = b.slot(b.quota_mib if spill else b.room(total), spill=spill, sm_centi=ONE_X // 2)
        neighbour = b.slot(b.quota_mib, spill=False, sm_centi=ONE_X // 2)
        serving = b.start(
            other, "serve", str(total), str(SESSION_MIB), str(HOT), str(b.seconds + 20)
        )
        b.wait_ready(serving)  # past the prefill: the neighbour sees the serving itself
        counts = b.run(neighbour, "matmul", str(b.seconds), worker=MATMUL)["per_second"]
        b.scene.collect_one(serving, timeout=b.seconds + 600)
        per_s[case] = statistics.mean(counts[1:] or counts)  # the first second warms up
    raw["neighbour"] = per_s
    ratio = per_s["next to spill"] / per_s["next to room"]
    return [
        [
            "neighbour at strict 50 %, matmuls/s",
            f"{per_s['next to spill']:.1f} next to spill",
            f"{per_s['next to room']:.1f} next to room",
            f"{ratio:.3f}",
            "",
        ]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quota-gib", type=float, default=8.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default=",".join(SECTIONS))
    args = parser.parse_args(argv)
    out = out_dir()
    report = Report(
        "spill",
        "Memory past the quota: spill mode on a real GPU",
        "The same work past its quota in spill mode, with room in its quota, and in spill "
        "mode without prefetch; a neighbour's throughput next to a spilling tenant.",
        out,
        extra=[
            f"quota {args.quota_gib} GiB, {args.seconds} s per run ({args.repeat} runs of each"
            " serving one, the median), sessions of "
            f"{SESSION_MIB} MiB, {HOT} hot, the hot set moving on by one every {MOVE_EVERY} steps"
        ],
    )
    raw: dict[str, Any] = {}
    rows: list[list[Any]] = []
    with Scene(
        Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp")), out / "spill-raw", name="spill"
    ) as scene:
        b = Bench(scene, int(args.quota_gib * GiB_MIB), args.seconds, args.repeat)
        for name in (s for s in args.only.split(",") if s):
            try:
                if name == "infer":
                    rows += section_infer(b, raw, report)
                else:
                    rows += {
                        "serve": section_serve,
                        "train": section_train,
                        "neighbour": section_neighbour,
                    }[name](b, raw)
            except Exception as exc:  # one section failing leaves the others' figures
                rows.append([name, f"failed: {type(exc).__name__}: {exc}"[:200], "", "", ""])
            print(f"[{name}] done", flush=True)
    report.table(
        ["what", "spill", "with room", "spill / room", "prefetch off (/ room), or note"], rows
    )
    save_json(out / "spill-raw.json", {"meta": report.meta, "raw": raw})
    print(report.write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
