"""The sections of bench/gpu_compute.py: single tenants, 30/70 pairs, the launch cost.

Every failure is a row of the table, never the end of the run.  A tenant's slot is
dropped once it is measured, as its container's poststop would: strict slots left behind
would add up past 100 % and the observer would scale them all down.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import statistics
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_overhead import run_probe
from lib.report import Report
from lib.scene import Barrier, Child, Device, Scene, python

from fcsp_hook.errors import SlotError
from fcsp_hook.slot import abi, files

SHARES = (10, 25, 50, 75)
PAIR = (30, 70)
TOLERANCE_POINTS = 3.0
WINDOW_S = 0.1
OVERHEAD_ROUNDS = 30


@dataclass
class Measured:
    throughput: float  # ops per second of GPU time
    cv: float
    windows: int


def analyse(result: dict[str, Any]) -> Measured:
    """Ops per GPU second from the marks, and the CV of ops per 100 ms window."""
    marks = [(0, 0.0)] + [(int(i), float(t)) for i, t in result["marks"]]
    if len(marks) < 3:
        raise ValueError("too few marks")
    (i0, t0), (i1, t1) = marks[0], marks[-1]
    throughput = (i1 - i0) / (t1 - t0)

    def ops_at(t: float) -> float:  # completed ops at GPU time t, interpolated
        for (ia, ta), (ib, tb) in itertools.pairwise(marks):
            if ta <= t <= tb:
                return ia + (ib - ia) * ((t - ta) / (tb - ta) if tb > ta else 1)
        return float(marks[-1][0])

    counts = []
    t = 0.0
    while t + WINDOW_S <= t1:
        counts.append(ops_at(t + WINDOW_S) - ops_at(t))
        t += WINDOW_S
    mean = statistics.fmean(counts) if counts else 0.0
    cv = statistics.pstdev(counts) / mean if len(counts) > 1 and mean > 0 else float("nan")
    return Measured(throughput, cv, len(counts))


@dataclass
class ComputeBench:
    """The scene, the document, and what the sections learn on the way."""

    scene: Scene
    doc: Report
    script: Path  # gpu_compute.py: its `worker` subcommand is every tenant
    seconds: float
    shim_log: str = ""  # BENCH_SHIM_LOG_LEVEL: debug keeps every calibration sample
    points: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    pair_points: list[tuple[float, float]] = field(default_factory=list)
    # Per tenant, every 100 ms while it ran: the clock scale in its slot, and the GPU's
    # clock, utilisation and power as fcsp-observer read them (its state file).
    scales: dict[str, list[int]] = field(default_factory=dict)
    readings: dict[str, list[tuple[float, ...]]] = field(default_factory=dict)

    def row(self, *cells: object) -> None:
        line = "| " + " | ".join(str(c) for c in cells) + " |"
        self.doc.add(line)
        print(line, flush=True)

    def worker_argv(self, *args: str) -> list[str]:
        return python(self.script, *args)

    def env(self, slot: Path | None) -> dict[str, str]:
        extra = {"BUD_LOG_LEVEL": self.shim_log} if slot is not None and self.shim_log else {}
        return self.scene.env(slot, extra=extra)

    def slot(self, name: str, share: int) -> Path:
        return self.scene.slot(name, [Device(sm_centi=share * 100)], mode=abi.IsolationMode.STRICT)

    def worker(
        self, tag: str, n: int, warmup: float, slot: Path | None, barrier: Path | None
    ) -> Child:
        args = ["worker", "--n", str(n), "--seconds", str(self.seconds), "--warmup", str(warmup)]
        args += ["--barrier", str(barrier)] if barrier else []
        return self.scene.spawn(tag, self.worker_argv(*args), env=self.env(slot))

    def measure(self, n: int, share: int, tag: str, warmup: float) -> Measured:
        child = self.worker(tag, n, warmup, self.slot(tag, share), None)
        try:
            with self.sampling_clocks([tag]):
                return analyse(self.scene.collect_one(child, timeout=120))
        finally:
            self.drop_slot(tag)

    def drop_slot(self, name: str) -> None:
        """What a tenant's turns learnt (compute.c turn_margin: us before its window's end
        it stopped booking, below 0 after it) and how long its launches waited for its
        share, to RAW/turn-margins.txt; then the slot is gone."""
        with contextlib.suppress(OSError, SlotError):
            device = files.read_usage(self.scene.slot_dir(name) / abi.USAGE_FILE).device[0]
            margin_us = ctypes.c_int32(device.turn_margin & 0xFFFFFFFF).value
            seen = sorted(self.scales.pop(name, []) or [0])
            read = [statistics.median(r) for r in zip(*self.readings.pop(name, []), strict=True)]
            mhz, full_load, util, power = read or [0.0] * 4
            with (self.scene.raw / "turn-margins.txt").open("a") as out:
                out.write(
                    f"{name} margin_us {margin_us} throttled_ms {device.throttled_ns / 1e6:.1f}"
                    f" busy_ms {device.busy_ns / 1e6:.1f} clock_scale_centi {seen[0]}"
                    f"/{seen[len(seen) // 2]}/{seen[-1]} median sm_mhz {mhz:.0f} full_load_mhz"
                    f" {full_load:.0f} util_pct {util:.0f} power_w {power:.0f}\n"
                )
        self.scene.drop_slot(name)

    @contextlib.contextmanager
    def sampling_clocks(self, tags: list[str]) -> Iterator[None]:
        """While the block runs, every 100 ms, the clock scale fcsp-observer publishes to
        each tenant (clock_normalise) and the reading it came from: a tenant doing more than
        its share of the work with its share of the time ran at a clock the scale did not
        make up for."""
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                reading = self.observer_clock()
                for tag in tags:
                    if reading:
                        self.readings.setdefault(tag, []).append(reading)
                    with contextlib.suppress(OSError, SlotError):
                        path = self.scene.slot_dir(tag) / abi.LIMITS_FILE
                        scale = int(files.read_limits(path).device[0].clock_scale_centi)
                        self.scales.setdefault(tag, []).append(scale)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def observer_clock(self) -> tuple[float, ...]:
        """(SM MHz, full-load MHz, utilisation %, power W) of the first GPU in the observer's
        state file; () if it has none yet."""
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            for clock in self.scene.observer_state().get("clocks", {}).values():
                keys = ("sm_mhz", "full_load_mhz", "util_pct", "power_w")
                return tuple(float(clock.get(k) or 0) for k in keys)
        return ()

    def plot(self) -> None:
        """Achieved against requested: <out>/compute.png."""

        def draw(plt: Any) -> Any:
            fig, ax = plt.subplots(figsize=(6, 5))
            ax.plot([0, 100], [0, 100], color="grey", linestyle="--", label="ideal")
            ax.fill_between([0, 100], [-3, 97], [3, 103], color="grey", alpha=0.15,
                            label="±3 points")  # fmt: skip
            for name, pts in self.points.items():
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            label=f"single, {name}")  # fmt: skip
            if self.pair_points:
                ax.scatter([p[0] for p in self.pair_points], [p[1] for p in self.pair_points],
                           marker="x", color="black", zorder=3, label="30/70 together")  # fmt: skip
            ax.set_xlabel("requested share (%)")
            ax.set_ylabel("achieved (% of unthrottled throughput)")
            ax.set_xlim(0, 100)
            ax.set_ylim(0, 100)
            ax.legend(loc="upper left", fontsize=8)
            ax.set_title("FCSP compute shares (libvgpu.so)")
            fig.tight_layout()
            return fig

        self.doc.plot(draw)


def section_single(
    b: ComputeBench, chosen: dict[str, dict[str, float]], shares: tuple[int, ...], warmup: float
) -> dict[str, Measured]:
    b.doc.section("Single tenant")
    b.doc.add("| size | sm requested | achieved | error (points) | CV of 100 ms windows | result |",
              "|---|---|---|---|---|---|")  # fmt: skip
    solo: dict[str, Measured] = {}
    for name, c in chosen.items():
        n = int(c["n"])
        try:
            solo[name] = b.measure(n, 100, f"solo-{name}", warmup)
            b.row(name, "100 (unthrottled)", "1.000", "-", f"{solo[name].cv:.3f}", "baseline")
        except Exception as exc:
            b.row(name, 100, "-", "-", "-", f"FAIL: {exc}")
            continue
        b.points[name] = []
        for share in shares:
            try:
                m = b.measure(n, share, f"single-{name}-{share}", warmup)
            except Exception as exc:
                b.row(name, share, "-", "-", "-", f"FAIL: {exc}")
                continue
            achieved = m.throughput / solo[name].throughput
            err = achieved * 100 - share
            b.points[name].append((share, achieved * 100))
            verdict = "PASS" if abs(err) <= TOLERANCE_POINTS else "FAIL"
            b.row(name, share, f"{achieved:.3f}", f"{err:+.1f}", f"{m.cv:.3f}", verdict)
    return solo


def run_pair(
    b: ComputeBench, name: str, n: int, shares: tuple[int, ...], warmup: float
) -> list[tuple[int, Measured | Exception]]:
    """Workers at `shares` started together behind a barrier: (share, result) each.  A
    share of 100 runs without the shim (two strict slots of 100 % would be scaled down
    by the observer to fit the GPU)."""
    tag = f"pair-{name}-{'-'.join(map(str, shares))}"
    barrier = Barrier(b.scene.work / f"barrier-{tag}")
    tags = [f"{tag}-{i}" for i in range(len(shares))]
    children = [
        b.worker(t, n, warmup, b.slot(t, share) if share < 100 else None, barrier.directory)
        for t, share in zip(tags, shares, strict=True)
    ]
    barrier.wait(children, timeout=120)
    barrier.go()
    results: list[tuple[int, Measured | Exception]] = []
    with b.sampling_clocks(tags):
        got = b.scene.collect(children, timeout=120)
    for share, result in zip(shares, got, strict=True):
        try:
            if isinstance(result, Exception):
                raise result
            results.append((share, analyse(result)))
        except Exception as exc:  # every failure is a row
            results.append((share, exc))
    for t in tags:
        b.drop_slot(t)
    return results


def section_pair(
    b: ComputeBench,
    chosen: dict[str, dict[str, float]],
    solo: dict[str, Measured],
    warmup: float,
) -> None:
    b.doc.section(
        "Two tenants together (30 / 70), each relative to its solo throughput",
        "Both without FCSP first: what two time-sliced contexts get of the GPU together, "
        "the most a pair can share out.",
    )
    b.doc.add("| size | tenant | achieved | error (points) | CV of 100 ms windows | result |",
              "|---|---|---|---|---|---|")  # fmt: skip
    for name, c in chosen.items():
        if name not in solo:
            b.row(name, "-", "-", "-", "-", "FAIL: no solo baseline")
            continue
        plain = run_pair(b, name, int(c["n"]), (100, 100), warmup)
        got = [m.throughput / solo[name].throughput for _, m in plain if isinstance(m, Measured)]
        b.row(name, "100 + 100", " + ".join(f"{g:.3f}" for g in got) + f" = {sum(got):.3f}",
              "-", "-", "time-slicing together")  # fmt: skip
        for share, m in run_pair(b, name, int(c["n"]), PAIR, warmup):
            if isinstance(m, Exception):
                b.row(name, share, "-", "-", "-", f"FAIL: {m}")
                continue
            achieved = m.throughput / solo[name].throughput
            err = achieved * 100 - share
            b.pair_points.append((share, achieved * 100))
            verdict = "PASS" if abs(err) <= TOLERANCE_POINTS else "FAIL"
            b.row(name, share, f"{achieved:.3f}", f"{err:+.1f}", f"{m.cv:.3f}", verdict)


def section_overhead(b: ComputeBench, probe: str) -> None:
    """What libvgpu.so adds to a launch, inside one process (bench/gpu_overhead.cu):
    blocks of launches through the driver's own entry point and through the hook, in
    turn; separate processes differ by more than the target from run to run."""
    b.doc.section(
        "Extra cost per launch when tokens are available (bench/gpu_overhead.cu: "
        f"{OVERHEAD_ROUNDS} rounds of 5000 empty-kernel launches 10 us apart through the "
        "driver and through the hook in turn, median of the paired differences)"
    )
    b.doc.add("| mode | driver launch (us) | extra per launch | throttled | result |",
              "|---|---|---|---|---|")  # fmt: skip
    if not probe:
        b.row("launch probe", "-", "-", "-", "FAIL: nvcc build failed (see compute-raw/build.log)")
        return
    modes = {
        "preloaded, no slot": None,
        "share 100 %": b.slot("ovh-100", 100),
        "share 90 % (limiter on)": b.slot("ovh-90", 90),
    }
    for mode, slot in modes.items():
        env = b.env(slot) | {"LD_PRELOAD": str(b.scene.shim)}
        log = b.scene.raw / f"overhead-{slot.name if slot else 'none'}.out"
        rc, text = run_probe(probe, env, OVERHEAD_ROUNDS, log)
        fields: dict[str, float] = {}
        for key, value in text.items():
            with contextlib.suppress(ValueError):
                fields[key] = float(value)
        if rc != 0 or "launch_extra_us" not in fields or not fields.get("hooked"):
            b.row(mode, "-", "-", "-", "FAIL: probe did not run hooked (see compute-raw)")
            continue
        extra = fields["launch_extra_us"]
        throttled_ns = files.read_usage(slot / "usage").device[0].throttled_ns if slot else 0
        if throttled_ns:  # the cost of waiting, not of the path with tokens available
            verdict = "n/a: throttled"
        else:
            verdict = "PASS" if extra <= 0.15 else "FAIL (target +0.15 us)"
        throttled = f"{throttled_ns / 1e6:.1f} ms" if slot else "-"
        b.row(mode, f"{fields['launch_us']:.3f}", f"{extra:+.3f} us", throttled, verdict)
