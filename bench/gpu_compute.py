"""Compute-share benchmark on a real GPU, driven by bench/gpu_compute.sh.

    python3 bench/gpu_compute.py run --out DIR --raw DIR --work DIR --shim PATH ...
    python3 bench/gpu_compute.py worker --n N --seconds S [--barrier DIR]   (internal)
    python3 bench/gpu_compute.py calibrate                                (internal)

Sections (each independent; a failure becomes a table row):
  1. calibrate: bf16 matmul sizes whose kernels take about 20 us, 500 us and 5 ms;
  2. single tenant: per size, unthrottled (slot at 100 %) then sm = 10, 25, 50, 75;
     achieved = throughput / unthrottled throughput, target |error| <= 3 points;
  3. two tenants at 30/70 together, each relative to its own solo (unthrottled) throughput;
  4. stability: coefficient of variation of the ops completed per 100 ms window (GPU time);
  5. launch overhead when tokens are available: bench/gpu_overhead.cu in one process, its
     launches through the driver's entry point and through the hook in turn, preloaded
     with no slot, at 100 % (count only) and at 90 % (full limiter path, never throttled
     by such tiny kernels); the median of the paired differences.

Throughput is measured on the GPU's clock: the worker records an event every few ops and
reads their timestamps after a final synchronize, so the 100 ms windows are windows of
GPU time and the host's launch-queue depth does not blur them.  Slots are created with
fcsp_hook.slot.write_slot (strict) and reached through FCSP_SLOT_DIR.  With
--clock-normalise, fcsp-observer runs over them as on a host (strict tenants keep their
requests; it publishes the clock scale); without, the shim alone holds each tenant to its
requested share of GPU time.
"""

# torch and matplotlib are imported where used: the orchestrating process never needs
# torch (only its workers do), and a bench without matplotlib still writes its table.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is this script's directory on sys.path
import observer_proc

TARGETS_MS = {"20us": 0.020, "500us": 0.5, "5ms": 5.0}
SHARES = (10, 25, 50, 75)
PAIR = (30, 70)
SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
SHIM_LOG_LEVEL = os.environ.get("BENCH_SHIM_LOG_LEVEL", "")
SIZES = tuple(int(n) for n in os.environ.get("BENCH_SIZES", "").split(",") if n.strip())
WARMUP_S = 1.0
# Pairs warm up longer: fcsp-observer fits the turn cycle to the tenants' kernel sizes once it
# has 1.5 s of them (observer.KERNEL_SPANS), and a pair is measured as it runs from then on.
PAIR_WARMUP_S = 3.0
WINDOW_S = 0.1
TOLERANCE_POINTS = 3.0
OVERHEAD_ROUNDS = 30
CANDIDATES = (
    512,
    768,
    1024,
    1280,
    1536,
    1792,
    2048,
    2560,
    3072,
    4096,
    5120,
    6144,
    7168,
    8192,
    9216,
    10240,
    11264,
    12288,
    14336,
    16384,
)


# ---- worker (runs under the shim) -----------------------------------------------------


def matmul(n: int) -> Any:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    return lambda: torch.mm(a, b, out=c)


def kernel_ms(op: Any, reps: int) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    op()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        op()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / reps


def calibrate() -> dict[str, object]:
    """The matmul size closest (in log time) to each target, with its time per op;
    BENCH_SIZES (three n, comma-separated) fixes the sizes instead: below ~2048 a Python
    loop of matmuls is launch-bound and which n lands nearest 20 us varies from run to run."""
    import math

    if SIZES:
        fixed = {n: kernel_ms(matmul(n), 50) for n in SIZES}
        chosen = {
            name: {"n": n, "kernel_ms": fixed[n]}
            for name, n in zip(TARGETS_MS, SIZES, strict=False)
        }
        return {"times": {str(k): v for k, v in fixed.items()}, "chosen": chosen}
    times: dict[int, float] = {}
    for n in CANDIDATES:
        op = matmul(n)
        first = kernel_ms(op, 3)
        times[n] = kernel_ms(op, max(3, min(200, int(50 / max(first, 1e-3)))))
        if times[n] > 3 * TARGETS_MS["5ms"]:
            break
    chosen = {}
    for name, target in TARGETS_MS.items():
        n = min(times, key=lambda k: abs(math.log(times[k] / target)))
        chosen[name] = {"n": n, "kernel_ms": times[n]}
    return {"times": {str(k): v for k, v in times.items()}, "chosen": chosen}


def worker(n: int, seconds: float, warmup: float, barrier: str | None) -> dict[str, object]:
    import torch

    op = matmul(n)
    kernel_time_ms = kernel_ms(op, 5)
    every = max(1, round(2.0 / max(kernel_time_ms, 1e-3)))  # an event every ~2 ms of GPU work
    stop = time.monotonic() + warmup  # lets the shim calibrate before measuring
    while time.monotonic() < stop:
        op()
    torch.cuda.synchronize()
    if barrier:
        Path(barrier, f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 120
        while not Path(barrier, "go").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
    ops, points = timed_ops(op, seconds, every)
    return {"n": n, "ops": ops, "kernel_ms": kernel_time_ms, "marks": points}


def timed_ops(op: Any, seconds: float, every: int) -> tuple[int, list[tuple[int, float]]]:
    """Run op back to back for `seconds`; (ops run, [(ops done, GPU seconds since the
    start)] with an event recorded every `every` ops), so windows are of GPU time."""
    import torch

    base = torch.cuda.Event(enable_timing=True)
    base.record()
    marks = []
    ops = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        op()
        ops += 1
        if ops % every == 0:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append((ops, ev))
    torch.cuda.synchronize()
    return ops, [(i, float(base.elapsed_time(ev)) / 1000) for i, ev in marks]


# ---- analysis -------------------------------------------------------------------------


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


# ---- orchestration --------------------------------------------------------------------


@dataclass
class Bench:
    out: Path
    raw: Path
    work: Path
    shim: Path
    rows: list[str] = field(default_factory=list)
    points: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    pair_points: list[tuple[float, float]] = field(default_factory=list)
    observer: subprocess.Popen[bytes] | None = None
    # Per tenant, every 100 ms while it ran: the clock scale in its slot, and the GPU's
    # clock, utilisation and power as fcsp-observer read them (its state file).
    scales: dict[str, list[int]] = field(default_factory=dict)
    readings: dict[str, list[tuple[float, ...]]] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    def start_observer(self, clock_normalise: str, max_speedup_pct: str) -> None:
        """fcsp-observer over the bench's slots, as on a host: strict tenants keep their
        requests; with clock_normalise = "full-load" it learns the full-load clock from the
        unthrottled runs and charges throttled tenants for the boost of a partly idle GPU."""
        from fcsp_hook import slot as slots

        slots.ensure_tenants_dir(self.run_dir)
        self.observer = observer_proc.start(
            self.work / "config.toml",
            observer_proc.bench_config(
                self.run_dir, self.work / "state", clock_normalise, max_speedup_pct
            ),
            self.raw / "observer.log",
        )

    def stop_observer(self) -> None:
        observer_proc.stop(self.observer)

    def row(self, *cells: object) -> None:
        line = "| " + " | ".join(str(c) for c in cells) + " |"
        self.rows.append(line)
        print(line, flush=True)

    def slot(self, name: str, share: int) -> Path:
        from fcsp_hook import abi
        from fcsp_hook.slot import DeviceLimits, SlotSpec, ensure_tenants_dir, slot_path, write_slot

        ensure_tenants_dir(self.run_dir)
        directory = slot_path(self.run_dir, name)
        write_slot(
            directory,
            SlotSpec(
                container_id=name,
                isolation_mode=abi.IsolationMode.STRICT,
                devices=(DeviceLimits(host_index=0, sm_requested_centi=share * 100),),
            ),
            {},
        )
        return directory

    def env(self, slot: Path | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BUD_", "FCSP_"))}
        env.pop("LD_PRELOAD", None)
        if slot is not None:
            env["LD_PRELOAD"] = str(self.shim)
            env["FCSP_SLOT_DIR"] = str(slot)
            if SHIM_LOG_LEVEL:  # debug: the shim logs every calibration sample to stderr
                env["BUD_LOG_LEVEL"] = SHIM_LOG_LEVEL
        return env

    def spawn(self, args: list[str], slot: Path | None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, __file__, *args],
            env=self.env(slot),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def collect(
        self, proc: subprocess.Popen[str], tag: str, timeout: float = 120
    ) -> dict[str, Any]:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        (self.raw / f"{tag}.out").write_text(out)
        (self.raw / f"{tag}.err").write_text(err)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {err.strip().splitlines()[-1:] or ''}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def drop_slot(self, name: str) -> None:
        """Gone, as after its container's poststop: strict slots left behind would add up
        past 100 % and the observer would scale them all down."""
        from fcsp_hook import abi
        from fcsp_hook.errors import SlotError
        from fcsp_hook.slot import read_usage, remove_slot, slot_path

        # What a tenant's turns learnt (compute.c turn_margin: us before its window's end it
        # stopped booking, below 0 after it) and how long its launches waited for its share.
        with contextlib.suppress(OSError, SlotError):
            device = read_usage(slot_path(self.run_dir, name) / abi.USAGE_FILE).device[0]
            margin_us = ctypes.c_int32(device.turn_margin & 0xFFFFFFFF).value
            seen = sorted(self.scales.pop(name, []) or [0])
            read = [statistics.median(r) for r in zip(*self.readings.pop(name, []), strict=True)]
            mhz, full_load, util, power = read or [0.0] * 4
            with (self.raw / "turn-margins.txt").open("a") as out:
                out.write(
                    f"{name} margin_us {margin_us} throttled_ms {device.throttled_ns / 1e6:.1f}"
                    f" busy_ms {device.busy_ns / 1e6:.1f} clock_scale_centi {seen[0]}"
                    f"/{seen[len(seen) // 2]}/{seen[-1]} median sm_mhz {mhz:.0f} full_load_mhz"
                    f" {full_load:.0f} util_pct {util:.0f} power_w {power:.0f}\n"
                )
        remove_slot(self.run_dir, name)

    @contextlib.contextmanager
    def sampling_clocks(self, tags: list[str]) -> Any:
        """While the block runs, every 100 ms, the clock scale fcsp-observer publishes to
        each tenant (clock_normalise) and the reading it came from: a tenant doing more than
        its share of the work with its share of the time ran at a clock the scale did not
        make up for."""
        from fcsp_hook import abi
        from fcsp_hook.errors import SlotError
        from fcsp_hook.slot import read_limits, slot_path

        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                reading = self.observer_clock()
                for tag in tags:
                    if reading:
                        self.readings.setdefault(tag, []).append(reading)
                    with contextlib.suppress(OSError, SlotError):
                        limits = read_limits(slot_path(self.run_dir, tag) / abi.LIMITS_FILE)
                        scale = int(limits.device[0].clock_scale_centi)
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
        from fcsp_hook.observer import STATE_FILE

        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            doc = json.loads((self.run_dir / STATE_FILE).read_text())
            for clock in doc.get("clocks", {}).values():
                return tuple(
                    float(clock.get(k) or 0)
                    for k in ("sm_mhz", "full_load_mhz", "util_pct", "power_w")
                )
        return ()

    def measure(self, n: int, share: int, tag: str) -> Measured:
        proc = self.spawn(
            ["worker", "--n", str(n), "--seconds", str(SECONDS), "--warmup", str(WARMUP_S)],
            self.slot(tag, share),
        )
        try:
            with self.sampling_clocks([tag]):
                return analyse(self.collect(proc, tag))
        finally:
            self.drop_slot(tag)


def section_calibrate(b: Bench) -> dict[str, dict[str, float]]:
    b.rows += [
        "",
        "### Kernel sizes",
        "",
        "| size | matmul n (bf16) | time per op |",
        "|---|---|---|",
    ]
    try:
        result = b.collect(b.spawn(["calibrate"], None), "calibrate", timeout=180)
    except Exception as exc:  # every failure is a row
        b.row("calibrate", "FAIL", exc)
        return {}
    chosen: dict[str, dict[str, float]] = result["chosen"]
    for name, c in chosen.items():
        b.row(name, c["n"], f"{c['kernel_ms'] * 1000:.1f} us")
    return chosen


def section_single(
    b: Bench, chosen: dict[str, dict[str, float]], shares: tuple[int, ...]
) -> dict[str, Measured]:
    b.rows += [
        "",
        "### Single tenant",
        "",
        "| size | sm requested | achieved | error (points) | CV of 100 ms windows | result |",
        "|---|---|---|---|---|---|",
    ]
    solo: dict[str, Measured] = {}
    for name, c in chosen.items():
        n = int(c["n"])
        try:
            solo[name] = b.measure(n, 100, f"solo-{name}")
            b.row(name, "100 (unthrottled)", "1.000", "-", f"{solo[name].cv:.3f}", "baseline")
        except Exception as exc:
            b.row(name, 100, "-", "-", "-", f"FAIL: {exc}")
            continue
        b.points[name] = []
        for share in shares:
            try:
                m = b.measure(n, share, f"single-{name}-{share}")
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
    b: Bench, name: str, n: int, shares: tuple[int, ...]
) -> list[tuple[int, Measured | Exception]]:
    """Workers at `shares` started together behind a barrier: (share, result) each.  A
    share of 100 runs without the shim (two strict slots of 100 % would be scaled down
    by the observer to fit the GPU)."""
    tag = f"pair-{name}-{'-'.join(map(str, shares))}"
    barrier = b.work / f"barrier-{tag}"
    barrier.mkdir(exist_ok=True)
    args = ["worker", "--n", str(n), "--seconds", str(SECONDS), "--warmup", str(PAIR_WARMUP_S)]
    args += ["--barrier", str(barrier)]
    procs = [
        (i, share, b.spawn(args, b.slot(f"{tag}-{i}", share) if share < 100 else None))
        for i, share in enumerate(shares)
    ]
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        if any(p.poll() is not None for _, _, p in procs):
            break
        time.sleep(0.01)
    (barrier / "go").touch()
    results: list[tuple[int, Measured | Exception]] = []
    with b.sampling_clocks([f"{tag}-{i}" for i, _, _ in procs]):
        for i, share, proc in procs:
            try:
                results.append((share, analyse(b.collect(proc, f"{tag}-{i}"))))
            except Exception as exc:  # every failure is a row
                results.append((share, exc))
    for i, _, _ in procs:
        b.drop_slot(f"{tag}-{i}")
    return results


def section_pair(b: Bench, chosen: dict[str, dict[str, float]], solo: dict[str, Measured]) -> None:
    b.rows += [
        "",
        "### Two tenants together (30 / 70), each relative to its solo throughput",
        "",
        "Both without FCSP first: what two time-sliced contexts get of the GPU together, "
        "the most a pair can share out.",
        "",
        "| size | tenant | achieved | error (points) | CV of 100 ms windows | result |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in chosen.items():
        if name not in solo:
            b.row(name, "-", "-", "-", "-", "FAIL: no solo baseline")
            continue
        plain = run_pair(b, name, int(c["n"]), (100, 100))
        got = [m.throughput / solo[name].throughput for _, m in plain if isinstance(m, Measured)]
        b.row(name, "100 + 100", " + ".join(f"{g:.3f}" for g in got) + f" = {sum(got):.3f}",
              "-", "-", "time-slicing together")  # fmt: skip
        for share, m in run_pair(b, name, int(c["n"]), PAIR):
            if isinstance(m, Exception):
                b.row(name, share, "-", "-", "-", f"FAIL: {m}")
                continue
            achieved = m.throughput / solo[name].throughput
            err = achieved * 100 - share
            b.pair_points.append((share, achieved * 100))
            verdict = "PASS" if abs(err) <= TOLERANCE_POINTS else "FAIL"
            b.row(name, share, f"{achieved:.3f}", f"{err:+.1f}", f"{m.cv:.3f}", verdict)


def probe_fields(text: str) -> dict[str, float]:
    """bench/gpu_overhead.cu's "name value" lines."""
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            fields[name] = float(value)
    return fields


def section_overhead(b: Bench, probe: str) -> None:
    """What libvgpu.so adds to a launch, inside one process (bench/gpu_overhead.cu):
    blocks of launches through the driver's own entry point and through the hook, in
    turn; separate processes differ by more than the target from run to run."""
    b.rows += [
        "",
        "### Extra cost per launch when tokens are available (bench/gpu_overhead.cu: "
        f"{OVERHEAD_ROUNDS} rounds of 5000 empty-kernel launches 10 us apart through the "
        "driver and through the hook in turn, median of the paired differences)",
        "",
        "| mode | driver launch (us) | extra per launch | throttled | result |",
        "|---|---|---|---|---|",
    ]
    if not probe:
        b.row("launch probe", "-", "-", "-", "FAIL: nvcc build failed (see compute-raw/build.log)")
        return
    from fcsp_hook.slot import read_usage

    modes = {
        "preloaded, no slot": None,
        "share 100 %": b.slot("ovh-100", 100),
        "share 90 % (limiter on)": b.slot("ovh-90", 90),
    }
    for mode, slot in modes.items():
        env = b.env(slot) | {"LD_PRELOAD": str(b.shim)}
        r = subprocess.run(
            [probe, str(OVERHEAD_ROUNDS)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        (b.raw / f"overhead-{slot.name if slot else 'none'}.out").write_text(r.stdout + r.stderr)
        fields = probe_fields(r.stdout)
        if r.returncode != 0 or "launch_extra_us" not in fields or not fields.get("hooked"):
            b.row(mode, "-", "-", "-", "FAIL: probe did not run hooked (see compute-raw)")
            continue
        extra = fields["launch_extra_us"]
        throttled_ns = read_usage(slot / "usage").device[0].throttled_ns if slot else 0
        if throttled_ns:  # the cost of waiting, not of the path with tokens available
            verdict = "n/a: throttled"
        else:
            verdict = "PASS" if extra <= 0.15 else "FAIL (target +0.15 us)"
        throttled = f"{throttled_ns / 1e6:.1f} ms" if slot else "-"
        b.row(mode, f"{fields['launch_us']:.3f}", f"{extra:+.3f} us", throttled, verdict)


def plot(b: Bench, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        b.rows.append(f"\n(no plot: {exc})")
        return
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 100], [0, 100], color="grey", linestyle="--", label="ideal")
    ax.fill_between([0, 100], [-3, 97], [3, 103], color="grey", alpha=0.15, label="±3 points")
    for name, pts in b.points.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"single, {name}")
    if b.pair_points:
        ax.scatter(
            [p[0] for p in b.pair_points],
            [p[1] for p in b.pair_points],
            marker="x",
            color="black",
            zorder=3,
            label="30/70 together",
        )
    ax.set_xlabel("requested share (%)")
    ax.set_ylabel("achieved (% of unthrottled throughput)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("FCSP compute shares (libvgpu.so)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def environment() -> str:
    parts = []
    with contextlib.suppress(Exception):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        parts.append(q.stdout.strip().splitlines()[0])
    with contextlib.suppress(Exception):
        import torch

        parts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    return ", ".join(parts) or "unknown"


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    b = Bench(Path(args.out), Path(args.raw), Path(args.work), Path(args.shim))
    b.rows += [
        "# FCSP compute shares on a real GPU",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {environment()}; {SECONDS:.0f} s per run "
        f"after {WARMUP_S:.0f} s warm-up ({PAIR_WARMUP_S:.0f} s for pairs); no MPS (time-slicing); "
        + (
            f'fcsp-observer with clock_normalise = "{args.clock_normalise}"'
            + (
                f", clock_max_speedup_pct = {args.clock_max_speedup_pct}"
                if args.clock_max_speedup_pct
                else ""
            )
            + " (strict tenants)."
            if args.clock_normalise
            else "no observer (requested share enforced)."
        ),
        "",
    ]
    if args.build_ok != "1":
        b.row("build libvgpu.so", "FAIL", "see compute-raw/build.log")
        (b.out / "compute.md").write_text("\n".join(b.rows) + "\n")
        return 1
    if args.clock_normalise:
        b.start_observer(args.clock_normalise, args.clock_max_speedup_pct)
    try:
        chosen = section_calibrate(b)
        shares = SHARES if "single" in args.sections else ()
        solo = section_single(b, chosen, shares) if chosen else {}
        if chosen and "pair" in args.sections:
            section_pair(b, chosen, solo)
    finally:
        b.stop_observer()
    # Without the observer: its two strict slots (100 and 90 %) exist at once, and an
    # observer would scale them down to fit in 100 % and throttle both.
    if "overhead" in args.sections:
        section_overhead(b, args.probe)
    plot(b, b.out / "compute.png")
    b.rows += ["", f"Total bench time: {time.monotonic() - started:.0f} s."]
    (b.out / "compute.md").write_text("\n".join(b.rows) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--clock-normalise", default="", help='"", off or full-load: run an observer')
    r.add_argument("--clock-max-speedup-pct", default="", help="the observer's; default its own")
    r.add_argument(
        "--sections",
        default=os.environ.get("BENCH_SECTIONS", "single,pair,overhead"),
        help="of single, pair, overhead (solo baselines always run)",
    )
    for name in ("--out", "--raw", "--work", "--shim", "--build-ok", "--probe"):
        r.add_argument(name, default="")
    w = sub.add_parser("worker")
    w.add_argument("--n", type=int, required=True)
    w.add_argument("--seconds", type=float, required=True)
    w.add_argument("--warmup", type=float, default=WARMUP_S)
    w.add_argument("--barrier", default=None)
    sub.add_parser("calibrate")
    args = parser.parse_args()
    if args.cmd == "run":
        return run(args)
    if args.cmd == "worker":
        print(json.dumps(worker(args.n, args.seconds, args.warmup, args.barrier)))
    else:
        print(json.dumps(calibrate()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
