"""fcsp-observer on a real GPU (issue 5, item 10): one call, several tenants, one observer.

Run as root from the repository root on the GPU machine (libvgpu.so is built if absent):

    OUT=/some/dir python3 bench/observer_bench.py [--size 4096] [--interval-ms 50]

Tenants are bench/observer_worker.py processes (PyTorch matmul loops) started with
LD_PRELOAD=shim/libvgpu.so and FCSP_SLOT_DIR pointing at slots made with
fcsp_hook.slot.write_slot in a temporary run_dir; one fcsp-observer serves them.
The shim's compute limiter reports launches, busy_ns, throttled_ns and demand_centi,
and follows sm_effective_centi; the observer is what this measures.

Writes $OUT/observer.md (the results), $OUT/observer-raw.json, and PNG time series
($OUT/observer-*.png) when matplotlib is importable (CSV files otherwise).

Measured (targets from the issue):
  work conservation  4 tenants at 25 % (balanced), one busy: its throughput / alone  >= 95 %
  reclaim            an idle tenant starts: time until its share is >= 90 % of it    <= 100 ms
  fairness           4 equal busy tenants: Jain's index of normalised throughput     >= 0.995
  noisy neighbour    tenant at its share, neighbour light -> saturating: its drop    <= 3 %
  latency isolation  short kernel + sync, alone vs next to a saturating neighbour: p50/p99
  workday            shares follow 25/33/50/100 as tenants leave (time series)
  resize             fcspctl set --sm on a running tenant: time to the new share
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is this script's directory on sys.path
import observer_proc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fcsp_hook import abi, mps, mpsd, slot, slotio  # noqa: E402  # after the path tweak, as a script

SHIM = REPO / "shim" / "libvgpu.so"
WORKER = REPO / "bench" / "observer_worker.py"
MPS_PATH = os.pathsep.join((os.environ.get("PATH", ""), "/usr/local/nvidia/bin", "/usr/bin"))
SAMPLE_S = 0.005
WHOLE = abi.WHOLE_GPU_CENTI


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- tenants ------------------------------------------------------------------------------


@dataclass
class Worker:
    """One tenant process: commands in, (time, matmuls done) samples out."""

    name: str
    proc: subprocess.Popen[str]
    samples: list[tuple[float, int]] = field(default_factory=list)
    stats: list[list[float]] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def start_reader(self) -> None:
        def read() -> None:
            if self.proc.stdout is None:
                raise RuntimeError("worker without stdout")
            for line in self.proc.stdout:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if "ready" in doc:
                    self.ready.set()
                elif "lat" in doc:
                    self.stats.append(doc["lat"])
                else:
                    self.samples.append((doc["t"], doc["n"]))

        threading.Thread(target=read, daemon=True).start()

    def send(self, command: str) -> None:
        if self.proc.stdin is None:
            raise RuntimeError("worker without stdin")
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def latency_stats(self, timeout: float = 30.0) -> list[float]:
        before = len(self.stats)
        self.send("stats")
        deadline = time.monotonic() + timeout
        while len(self.stats) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.stats[-1] if len(self.stats) > before else []

    def done_at(self, t: float) -> float:
        """Matmuls completed by time t (linear between samples)."""
        points = self.samples
        if not points or t <= points[0][0]:
            return float(points[0][1]) if points else 0.0
        for (t0, n0), (t1, n1) in itertools.pairwise(points):
            if t0 <= t <= t1:
                return n0 + (n1 - n0) * (t - t0) / max(t1 - t0, 1e-9)
        return float(points[-1][1])

    def rate(self, t0: float, t1: float) -> float:
        """Matmuls per second between t0 and t1."""
        return (self.done_at(t1) - self.done_at(t0)) / max(t1 - t0, 1e-9)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send("exit")
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Scene:
    """A run_dir with tenants, their workers, one observer, and a share sampler."""

    root: Path
    args: argparse.Namespace
    workers: dict[str, Worker] = field(default_factory=dict)
    observer: subprocess.Popen[bytes] | None = None
    shares: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    halt: threading.Event = field(default_factory=threading.Event)

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def slot_dir(self, name: str) -> Path:
        return slot.slot_path(self.run_dir, name)

    def add_tenant(
        self,
        name: str,
        sm_centi: int,
        mode: abi.IsolationMode = abi.IsolationMode.BALANCED,
        priority: abi.Priority = abi.Priority.BEST_EFFORT,
        shim: bool = True,
    ) -> Worker:
        slot.ensure_tenants_dir(self.run_dir)
        on_mps = shim and self.args.backend == "mps"
        if on_mps:
            # MPS clients must find the daemon when CUDA initialises: observer first.
            self.start_observer()
            uuid = self.args.gpu_uuid
            if not wait_until(lambda: mps.ready(self.run_dir, uuid), 30):
                raise RuntimeError(f"no MPS daemon: {mps.read_state(self.run_dir, uuid)}")
        threads = 0
        if on_mps:  # what the hook grants: latency tenants' shares are kept free for them
            reserved = mps.latency_reserve(slot.tenants_dir(self.run_dir), self.args.gpu_uuid, name)
            threads = mps.threads_centi(sm_centi, mode, priority, reserved)
        spec = slot.SlotSpec(
            container_id=name,
            tenant=name,
            isolation_mode=mode,
            priority=priority,
            devices=(
                slot.DeviceLimits(
                    host_index=0,
                    uuid=self.args.gpu_uuid,
                    sm_requested_centi=sm_centi,
                    backend=abi.Backend.MPS if on_mps else abi.Backend.TIMESLICE,
                    mps_threads_centi=threads,
                ),
            ),
        )
        slot.write_slot(self.slot_dir(name), spec, {})
        if on_mps:  # what the hook mounts in a container, as a link for a bare process
            (self.slot_dir(name) / abi.MPS_DIR).symlink_to(
                mps.client_dir(self.run_dir, self.args.gpu_uuid)
            )
        # One GPU per worker: an MPS client sees only its daemon's GPU, and PyTorch must
        # not count the others (through NVML) and then fail to initialise them.
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.args.gpu_uuid:
            env["CUDA_VISIBLE_DEVICES"] = self.args.gpu_uuid
        stderr = None
        if shim:
            env["FCSP_SLOT_DIR"] = str(self.slot_dir(name))
            if not self.args.fake:
                env["LD_PRELOAD"] = str(self.args.shim)
            if self.args.calib_log:  # every kernel-time sample the shim takes, with its estimate
                env["BUD_LOG_LEVEL"] = "debug"
                stderr = (self.args.out / f"calib-{self.root.name}-{name}.log").open("w")
        cmd = [sys.executable, str(WORKER), "--size", str(self.args.size)]
        cmd += ["--batch", str(self.args.batch)] + (["--fake"] if self.args.fake else [])
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            bufsize=1,
        )
        if stderr is not None:
            stderr.close()
        worker = Worker(name, proc)
        worker.start_reader()
        self.workers[name] = worker
        return worker

    def wait_ready(self, timeout: float = 180.0) -> None:
        for w in self.workers.values():
            if not w.ready.wait(timeout):
                raise RuntimeError(f"worker {w.name} did not start (CUDA init?)")

    def start_observer(self) -> None:
        if self.observer is not None:
            return
        cfg = self.root / "config.toml"
        extra = f"interval_ms = {self.args.interval_ms}\n" if self.args.interval_ms else ""
        extra += f'clock_normalise = "{self.args.clock_normalise}"\n'
        if self.args.clock_max_speedup_pct:
            extra += f"clock_max_speedup_pct = {self.args.clock_max_speedup_pct}\n"
        if self.args.backend == "mps":
            extra += (
                f'[backend]\ngpus = {{ "{self.args.gpu_uuid}" = "mps" }}\n'
                f'mps_control = "{self.args.mps_control}"\n'
            )
        self.observer = observer_proc.start(
            cfg,
            f'[paths]\nrun_dir = "{self.run_dir}"\nstate_dir = "{self.args.state_dir}"\n'
            f"[observer]\nmetrics_port = 0\n{extra}",
            self.root / "observer.log",
        )
        threading.Thread(target=self._sample_shares, daemon=True).start()

    def _sample_shares(self) -> None:
        maps: dict[str, slotio.LimitsMap] = {}
        while not self.halt.wait(SAMPLE_S):
            now = time.monotonic()
            row = {}
            for name in list(self.workers):
                if name not in maps:
                    try:
                        maps[name] = slotio.LimitsMap(self.slot_dir(name) / abi.LIMITS_FILE)
                    except Exception:  # noqa: S112  # not there yet
                        continue
                row[name] = maps[name].effective(0)
            self.shares.append((now, row))
        for m in maps.values():
            m.close()

    def usage(self, name: str) -> Counters:
        dev = slot.read_usage(self.slot_dir(name) / abi.USAGE_FILE).device[0]
        return Counters(time.monotonic(), int(dev.busy_ns), int(dev.throttled_ns))

    def share_of(self, name: str) -> int:
        limits = slot.read_limits(self.slot_dir(name) / abi.LIMITS_FILE)
        return int(limits.device[0].sm_effective_centi)

    def set_limits(self, name: str, **fields: int) -> None:
        """Change seqlocked fields of a running tenant (what fcspctl set does)."""
        limits = slotio.LimitsMap(self.slot_dir(name) / abi.LIMITS_FILE)
        try:
            with limits.update() as view:
                for key, value in fields.items():
                    if key == "sm_requested_centi":
                        view.device[0].sm_requested_centi = value
                    else:
                        setattr(view, key, value)
        finally:
            limits.close()

    def wait_share(
        self, name: str, predicate: Any, since: float, timeout: float = 10.0
    ) -> float | None:
        """Seconds from `since` until the sampled share of name satisfies predicate."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            rows = self.shares[seen:]
            seen += len(rows)
            for t, row in rows:
                if t >= since and name in row and predicate(row[name]):
                    return t - since
            time.sleep(SAMPLE_S)
        return None

    def observer_cpu(self) -> float:
        if self.observer is None:
            return math.nan
        fields = Path(f"/proc/{self.observer.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.halt.set()
        for w in self.workers.values():
            w.stop()
        observer_proc.stop(self.observer)
        if self.args.backend == "mps":  # the observer leaves its daemon to running clients
            mpsd.Daemon(self.run_dir, self.args.gpu_uuid, self.args.mps_control).stop()


@dataclass(frozen=True)
class Counters:
    """A tenant's usage counters at one moment; a difference of two is a span."""

    at: float
    busy_ns: int
    throttled_ns: int

    @property
    def seconds(self) -> float:
        return max(self.at, 1e-9)

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.at - other.at, self.busy_ns - other.busy_ns, self.throttled_ns - other.throttled_ns
        )


class ClockSampler:
    """The GPU's mean SM clock (MHz) between construction and stop(), sampled at 20 Hz
    with pynvml; nan without it."""

    def __init__(self, uuid: str) -> None:
        self.samples: list[int] = []
        self.halt = threading.Event()
        try:
            import pynvml  # noqa: PLC0415  # optional: only on the GPU machine

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else None
        except Exception:  # no NVML: no clock, the rest still measures
            return
        if handle is None:
            return

        def sample() -> None:
            while not self.halt.wait(0.05):
                self.samples.append(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))

        threading.Thread(target=sample, daemon=True).start()

    def stop(self) -> float:
        self.halt.set()
        return statistics.fmean(self.samples) if self.samples else math.nan


@contextlib.contextmanager
def scene(args: argparse.Namespace, label: str) -> Iterator[Scene]:
    root = Path(tempfile.mkdtemp(prefix=f"fo-{label}-", dir="/tmp"))  # short: socket paths
    s = Scene(root, args)
    try:
        yield s
    finally:
        s.close()
        if (root / "observer.log").exists():
            shutil.copy(root / "observer.log", args.out / f"observer-{args.backend}-{label}.log")
        shutil.rmtree(root, ignore_errors=True)


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def settle(seconds: float) -> None:
    time.sleep(seconds)


def window(w: Worker, seconds: float) -> float:
    t0 = time.monotonic()
    time.sleep(seconds)
    return w.rate(t0, time.monotonic())


# ---- scenarios ----------------------------------------------------------------------------


def solo_baseline(args: argparse.Namespace, results: dict[str, Any]) -> float:
    """One worker, no shim: the throughput every ratio is against.  With clock
    normalisation an observer watches, as it would on a host: it learns the GPU's
    full-load clock from this saturating run and keeps it (state_dir) for the next."""
    with scene(args, "solo") as s:
        w = s.add_tenant("solo", WHOLE, shim=False)
        s.wait_ready()
        if args.clock_normalise != "off":
            s.start_observer()
        w.send("run")
        settle(args.warmup)
        rate = window(w, args.measure)
        w.send("latency")
        settle(args.measure)
        lat = w.latency_stats()
    results["solo"] = {"matmul_per_s": rate, "latency_us": percentiles(lat)}
    log(f"solo: {rate:.1f} matmul/s, latency {percentiles(lat)}")
    return rate


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p99": math.nan, "n": 0}
    ordered = sorted(values)
    pick = lambda q: ordered[min(int(q * len(ordered)), len(ordered) - 1)]  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99), "n": len(ordered)}


def four_tenants(args: argparse.Namespace, results: dict[str, Any], solo: float) -> None:
    """Work conservation, reclaim, fairness, the workday and resize on 4 tenants at 25 %."""
    with scene(args, "four") as s:
        ws = {n: s.add_tenant(n, 2500) for n in ("A", "B", "C", "D")}
        s.wait_ready()
        s.start_observer()
        cpu0, t_cpu0 = s.observer_cpu(), time.monotonic()
        work_conservation(args, s, ws, solo, results)
        reclaim(args, s, ws, solo, results)
        fairness(args, ws, solo, results)
        workday(args, s, ws, results)
        resize(args, s, ws, solo, results)
        wall = time.monotonic() - t_cpu0
        results["observer_cpu_pct_of_core"] = (s.observer_cpu() - cpu0) / wall * 100


def work_conservation(
    args: argparse.Namespace, s: Scene, ws: dict[str, Worker], solo: float, results: dict[str, Any]
) -> None:
    """Only A busy: its throughput against running alone without FCSP."""
    ws["A"].send("run")
    settle(args.warmup)
    rate = window(ws["A"], args.measure)
    results["work_conservation"] = {
        "share_pct": s.share_of("A") / 100,
        "throughput_vs_alone": rate / solo,
        "target": ">= 0.95 (MIG: 0.25)",
    }
    log(f"work conservation: {rate / solo:.3f} of alone, share {s.share_of('A') / 100}%")


def reclaim(
    args: argparse.Namespace, s: Scene, ws: dict[str, Worker], solo: float, results: dict[str, Any]
) -> None:
    """B goes idle, then busy again, repeatedly, while A stays busy."""
    by_slot: list[float | None] = []
    by_throughput: list[float | None] = []
    for _ in range(args.repeats):
        ws["B"].send("idle")
        s.wait_share("B", lambda v: v <= 200, time.monotonic(), timeout=10)
        settle(0.5)
        start = time.monotonic()
        ws["B"].send("run")
        by_slot.append(s.wait_share("B", lambda v: v >= 0.9 * 2500, start))
        settle(1.0)
        by_throughput.append(first_time_at(ws["B"], start, 0.9 * 0.25 * solo))
    results["reclaim"] = {
        "slot_share_s": by_slot,
        "throughput_s": by_throughput,
        "target": "<= 0.100 s",
    }
    log(f"reclaim (slot): {by_slot}; (throughput): {by_throughput}")


def fairness(
    args: argparse.Namespace, ws: dict[str, Worker], solo: float, results: dict[str, Any]
) -> None:
    """All four busy: Jain's index over throughput normalised to a quarter of alone."""
    names = sorted(ws)
    for n in names:
        ws[n].send("run")
    settle(args.warmup)
    t0 = time.monotonic()
    settle(args.measure * 2)
    t1 = time.monotonic()
    rates = {n: ws[n].rate(t0, t1) for n in names}
    norm = [rates[n] / (0.25 * solo) for n in names]
    jain = sum(norm) ** 2 / (len(norm) * sum(x * x for x in norm)) if any(norm) else math.nan
    results["fairness"] = {
        "normalised_throughput": dict(zip(names, norm, strict=True)),
        "jain": jain,
        "sum_vs_alone": sum(rates.values()) / solo,
        "target": ">= 0.995",
    }
    log(f"fairness: Jain {jain:.4f}, normalised {norm}")


def workday(
    args: argparse.Namespace, s: Scene, ws: dict[str, Worker], results: dict[str, Any]
) -> None:
    """The article's day: all four busy, B at lunch, D in a meeting, only A, all back."""
    names = sorted(ws)
    origin = time.monotonic()
    phases = [
        ("all four", set(names)),
        ("B at lunch", {"A", "C", "D"}),
        ("D in a meeting", {"A", "C"}),
        ("only A", {"A"}),
        ("all back", set(names)),
    ]
    marks = []
    for label, busy in phases:
        at = time.monotonic()
        for n in names:
            ws[n].send("run" if n in busy else "idle")
        marks.append((label, at - origin))
        settle(args.phase)
    results["workday"] = {
        "phases": marks,
        "phase_s": args.phase,
        "shares": phase_shares(s, origin, marks, args.phase),
        # Returning tenants: time from "all back" until each holds >= 90 % of 25 %.
        "all_back_reclaim_s": {
            n: s.wait_share(n, lambda v: v >= 2250, origin + marks[-1][1], timeout=0.1)
            for n in names
        },
    }
    plot(args, "workday", s, ws, origin=origin, marks=marks)
    log(f"workday: {results['workday']['shares']}")


def resize(
    args: argparse.Namespace, s: Scene, ws: dict[str, Worker], solo: float, results: dict[str, Any]
) -> None:
    """A and B busy at 25 %; `fcspctl set A --sm 60 --mode strict`: time to the new share."""
    for n, w in ws.items():
        w.send("run" if n in {"A", "B"} else "idle")
    settle(args.warmup)
    cmd = [sys.executable, "-m", "fcsp_hook.ctl", "--config", str(s.root / "config.toml")]
    invoked = time.monotonic()
    subprocess.run(
        [*cmd, "set", "A", "--sm", "60", "--mode", "strict"],
        check=True,
        env={**os.environ, "PYTHONPATH": observer_proc.pythonpath()},
        capture_output=True,
        cwd=observer_proc.REPO,  # python -m looks in the working directory first
    )
    written = time.monotonic()
    to_share = s.wait_share("A", lambda v: v == 6000, written)
    settle(1.0)
    results["resize"] = {
        "fcspctl_set_command_s": written - invoked,
        "to_new_share_after_write_s": to_share,
        "throughput_reaches_90pct_s": first_time_at(ws["A"], written, 0.9 * 0.6 * solo),
    }
    log(f"resize: {results['resize']}")


def first_time_at(w: Worker, start: float, target_rate: float, span: float = 0.05) -> float | None:
    """Seconds after start at which the throughput over `span` first reaches target_rate."""
    for t, _ in w.samples:
        if t < start + span:
            continue
        if w.rate(t - span, t) >= target_rate:
            return t - start
    return None


def phase_shares(
    s: Scene, origin: float, marks: list[tuple[str, float]], phase: float
) -> dict[str, dict[str, float]]:
    """Each tenant's share at the end of each phase, in percent."""
    out = {}
    for label, offset in marks:
        end = origin + offset + phase - 0.05
        row = next((r for t, r in reversed(s.shares) if t <= end), {})
        out[label] = {k: v / 100 for k, v in row.items()}
    return out


def noisy_neighbour(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Victim V at 50 % busy; neighbour N at 50 % light, then saturating; both modes.

    Two drops are reported.  Against V's throughput with a light neighbour, the drop also
    counts the idle capacity V borrowed while N was light (work conservation giving it
    back).  Against V's guaranteed share (V alone, strict at 50 %), it is what the
    neighbour takes from what V was promised: the noisy-neighbour impact proper.
    """
    with scene(args, "noisy") as s:
        v, n = s.add_tenant("V", 5000), s.add_tenant("N", 5000)
        s.wait_ready()
        s.start_observer()
        out: dict[str, Any] = {}
        s.set_limits("V", isolation_mode=abi.IsolationMode.STRICT)
        n.send("idle")
        v.send("run")
        settle(args.warmup)
        guaranteed = window(v, args.measure)
        out["victim_guaranteed_share_alone"] = guaranteed
        for mode in (abi.IsolationMode.BALANCED, abi.IsolationMode.ADAPTIVE):
            for name in ("V", "N"):
                s.set_limits(name, isolation_mode=mode)
            v.send("run")
            n.send("light")
            settle(args.warmup)
            light = window(v, args.measure)
            n.send("run")
            settle(args.warmup)
            heavy = window(v, args.measure)
            out[mode.name.lower()] = {
                "victim_light_neighbour": light,
                "victim_saturating_neighbour": heavy,
                "drop": 1 - heavy / light if light else math.nan,
                "drop_vs_guaranteed": 1 - heavy / guaranteed if guaranteed else math.nan,
            }
            log(
                f"noisy neighbour ({mode.name.lower()}): drop {out[mode.name.lower()]['drop']:.3%}"
                f" vs light, {out[mode.name.lower()]['drop_vs_guaranteed']:.3%} vs guaranteed"
            )
        results["noisy_neighbour"] = {**out, "target": "drop <= 0.03 (article: 4.66% / 11.5%)"}

        # Latency isolation: V becomes latency-sensitive and launches short kernels.
        s.set_limits("V", isolation_mode=abi.IsolationMode.BALANCED, priority=abi.Priority.LATENCY)
        s.set_limits("N", isolation_mode=abi.IsolationMode.BALANCED)
        alone, busy, _ = latency_alone_then_busy(args, v, n)
        results["latency_isolation"] = {
            "alone_us": alone,
            "with_saturating_neighbour_us": busy,
            "p99_ratio": busy["p99"] / alone["p99"] if alone["p99"] else math.nan,
            "reference": "H200 time-slicing 25 -> 1364 us p99 (55x); MPS 4.4x",
        }
        log(f"latency: alone {alone}, with neighbour {busy}")


def accuracy(args: argparse.Namespace, results: dict[str, Any], solo: float) -> None:
    """One tenant alone, strict at sm = 10, 25, 50, 75: its throughput over alone's.

    Under MPS strict is the client's thread percentage (a fresh process per share: MPS
    reads it when the client connects); time-sliced, it is the launch limiter."""
    out: dict[str, Any] = {}
    with scene(args, "accuracy") as s:
        s.start_observer()
        for share in (int(x) for x in args.accuracy_shares.split(",")):
            w = s.add_tenant(f"S{share}", share * 100, mode=abi.IsolationMode.STRICT)
            s.wait_ready()
            w.send("run")
            settle(args.warmup)
            before, clocks = s.usage(w.name), ClockSampler(args.gpu_uuid)
            achieved = window(w, args.measure) / solo * 100
            spent = s.usage(w.name) - before
            limits = slot.read_limits(s.slot_dir(w.name) / abi.LIMITS_FILE)
            w.send("idle")
            w.stop()
            del s.workers[f"S{share}"]
            # Gone, as after its container's poststop: a slot left behind would keep its
            # strict share, and the observer scales strict shares that add up past 100 %.
            slot.remove_slot(s.run_dir, f"S{share}")
            # Where the time went, to tell the limiter from the clock: the GPU time the shim
            # admitted and the time its launches waited, per second, and the SM clock.
            out[str(share)] = {
                "achieved_pct": achieved,
                "error_points": achieved - share,
                "shim_busy_per_s": spent.busy_ns / 1e9 / spent.seconds,
                "shim_throttled_per_s": spent.throttled_ns / 1e9 / spent.seconds,
                "sm_clock_mhz": clocks.stop(),
                "clock_scale": limits.device[0].clock_scale_centi / 10000,
            }
            log(f"accuracy: sm {share} -> {achieved:.1f} % {out[str(share)]}")
    results["accuracy"] = {**out, "target": "|error| <= 3 points"}


def pair_rates(
    s: Scene, ws: dict[str, Worker], args: argparse.Namespace, solo: float, *, shimmed: bool
) -> dict[str, Any]:
    """Both busy: each one's throughput over alone's, and where its time went."""
    for w in ws.values():
        w.send("run")
    settle(args.warmup)
    before, clocks = {n: s.usage(n) for n in ws}, ClockSampler(args.gpu_uuid)
    t0 = time.monotonic()
    settle(args.measure)
    t1 = time.monotonic()
    got: dict[str, Any] = {n: ws[n].rate(t0, t1) / solo * 100 for n in ws}
    got["sum"] = sum(got[n] for n in ws)
    # Is a tenant charged more per matmul than a matmul takes alone?  Kernel times measured
    # while the other tenant's time slice runs would inflate its costs.  Did its launches
    # wait for their share, or for a GPU that had no room left?
    for n, w in ws.items():
        if not shimmed:
            break
        spent, ops = s.usage(n) - before[n], w.rate(t0, t1) * (t1 - t0)
        got[f"{n}_gpu_time_per_s"] = spent.busy_ns / 1e9 / spent.seconds
        got[f"{n}_waited_per_s"] = spent.throttled_ns / 1e9 / spent.seconds
        got[f"{n}_charged_ms_per_matmul"] = spent.busy_ns / 1e6 / max(ops, 1)
    got["solo_ms_per_matmul"] = 1000 / solo
    got["sm_clock_mhz"] = clocks.stop()
    return got


def pair(args: argparse.Namespace, results: dict[str, Any], solo: float) -> None:
    """Two busy tenants (30 / 70 by default), strict then balanced: each over alone's.

    First the same two workers without FCSP: what plain time-slicing leaves of the GPU when
    two contexts share it, the most any split of it can add up to."""
    out: dict[str, Any] = {}
    with scene(args, "pair-plain") as s:
        ws = {n: s.add_tenant(n, WHOLE, shim=False) for n in ("Q1", "Q2")}
        s.wait_ready()
        out["plain"] = pair_rates(s, ws, args, solo, shimmed=False)
        log(f"pair (no FCSP): {out['plain']}")
    for shares in args.pair_shares.split(","):
        small, large = (int(x) for x in shares.split("/"))
        for mode in (abi.IsolationMode[m.upper()] for m in args.pair_modes.split(",")):
            label = f"{small}-{large}-{mode.name.lower()}"
            with scene(args, f"pair-{label}") as s:
                s.start_observer()
                names = (f"P{small}", f"P{large}")
                ws = {n: s.add_tenant(n, int(n[1:]) * 100, mode=mode) for n in names}
                s.wait_ready()
                got = pair_rates(s, ws, args, solo, shimmed=True)
            out[label if shares != "30/70" else mode.name.lower()] = got
            log(f"pair ({label}): {got}")
    results["pair"] = {**out, "target": "30 / 70 within 3 points (HAMi-core 46 / 54)"}


def latency_alone_then_busy(
    args: argparse.Namespace, v: Worker, n: Worker
) -> tuple[dict[str, float], dict[str, float], float]:
    """V's latency percentiles with N idle, then with N saturating; and N's rate meanwhile."""
    n.send("idle")
    v.send("latency")
    settle(args.warmup)
    v.latency_stats()
    settle(args.measure)
    alone = percentiles(v.latency_stats())
    n.send("run")
    settle(args.warmup)
    v.latency_stats()
    t0 = time.monotonic()
    settle(args.measure)
    busy = percentiles(v.latency_stats())
    return alone, busy, n.rate(t0, time.monotonic())


def latency_capped(args: argparse.Namespace, results: dict[str, Any], solo: float) -> None:
    """Latency of V (fcsp.priority=latency, 30 %) next to a saturating best-effort N (70 %,
    balanced) that started after it.  Under MPS V's clients get 30 % of the SMs and N's the
    other 70 % (what the hook grants), so V's kernels never wait for a neighbour's."""
    with scene(args, "latency-capped") as s:
        v = s.add_tenant("V", 3000, priority=abi.Priority.LATENCY)
        n = s.add_tenant("N", 7000)
        s.wait_ready()
        s.start_observer()
        alone, busy, neighbour_rate = latency_alone_then_busy(args, v, n)
        neighbour = neighbour_rate / solo
    results["latency_capped"] = {
        "alone_us": alone,
        "with_neighbour_70_us": busy,
        "p99_ratio": busy["p99"] / alone["p99"] if alone["p99"] else math.nan,
        "neighbour_throughput_vs_alone": neighbour,
    }
    log(f"latency, priority tenant next to a 70 % neighbour: {results['latency_capped']}")


def fault(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """MPS only: a tenant's kernel faults next to a busy tenant.  What the neighbour sees,
    when the observer notices, whether it restarts the daemon and a new client runs."""
    faulty = args.out / "fault_client"
    source = REPO / "bench" / "mps_fault.cu"
    build = subprocess.run(
        ["nvcc", "-o", str(faulty), str(source)], capture_output=True, text=True, check=False
    )
    if build.returncode != 0:
        results["fault"] = {"error": f"nvcc: {build.stderr[-300:]}"}
        return
    with scene(args, "fault") as s:
        victim = s.add_tenant("V", 5000)
        s.wait_ready()
        victim.send("run")
        settle(args.warmup)
        before = victim.rate(time.monotonic() - 1, time.monotonic())
        first_pid = mps.read_state(s.run_dir, args.gpu_uuid).get("pid")
        slot.write_slot(
            s.slot_dir("F"),
            slot.SlotSpec(
                container_id="F",
                devices=(
                    slot.DeviceLimits(host_index=0, uuid=args.gpu_uuid, backend=abi.Backend.MPS),
                ),
            ),
            {},
        )
        (s.slot_dir("F") / abi.MPS_DIR).symlink_to(mps.client_dir(s.run_dir, args.gpu_uuid))
        env = {**os.environ, "LD_PRELOAD": str(SHIM), "FCSP_SLOT_DIR": str(s.slot_dir("F"))}
        env["CUDA_VISIBLE_DEVICES"] = args.gpu_uuid
        t_fault = time.monotonic()
        ran = subprocess.run(
            [str(faulty)], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        detected = wait_until(
            lambda: mps.read_state(s.run_dir, args.gpu_uuid).get("faults", 0) >= 1, 30
        )
        t_detect = time.monotonic() - t_fault
        restarted = wait_until(
            lambda: (
                mps.read_state(s.run_dir, args.gpu_uuid).get("pid") not in (None, 0, first_pid)
                and mps.ready(s.run_dir, args.gpu_uuid)
            ),
            60,
        )
        t_restart = time.monotonic() - t_fault
        settle(1.0)
        now = time.monotonic()
        victim_alive = victim.proc.poll() is None and victim.rate(now - 1, now) > 0
        after = s.add_tenant("W", 5000)
        new_ok = after.ready.wait(120)
        if new_ok:
            after.send("run")
            settle(args.warmup)
        now = time.monotonic()
        results["fault"] = {
            "faulting_client_output": ran.stdout.strip()[-200:],
            "victim_rate_before": before,
            "victim_still_running_after": victim_alive,
            "victim_returncode": victim.proc.poll(),
            "observer_detected": detected,
            "detected_after_s": t_detect if detected else None,
            "daemon_restarted": restarted,
            "restarted_after_s": t_restart if restarted else None,
            "new_client_runs": bool(new_ok and after.rate(now - 1, now) > 0),
            "state": mps.read_state(s.run_dir, args.gpu_uuid),
        }
        log(f"fault: {results['fault']}")


# ---- output -------------------------------------------------------------------------------


def plot(
    args: argparse.Namespace,
    label: str,
    s: Scene,
    ws: dict[str, Worker],
    *,
    origin: float,
    marks: list[tuple[str, float]],
) -> None:
    """Shares and throughput over time: PNG with matplotlib, else CSV."""
    rows = [(t - origin, r) for t, r in s.shares if t >= origin]
    names = sorted(ws)
    try:
        import matplotlib  # noqa: PLC0415  # optional on the GPU machine

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        with (args.out / f"observer-{args.backend}-{label}.csv").open("w") as f:
            f.write("t_s," + ",".join(f"share_{n}_pct" for n in names) + "\n")
            for t, r in rows:
                f.write(f"{t:.4f}," + ",".join(str(r.get(n, 0) / 100) for n in names) + "\n")
        return
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    for n in names:
        top.plot([t for t, _ in rows], [r.get(n, 0) / 100 for _, r in rows], label=n)
        pts = [(t - origin, ws[n].rate(t - 0.1, t)) for t, _ in ws[n].samples if t >= origin + 0.1]
        bottom.plot([p[0] for p in pts], [p[1] for p in pts], label=n)
    for text, offset in marks:
        for ax in (top, bottom):
            ax.axvline(offset, color="grey", linewidth=0.5)
        top.text(offset, 102, text, fontsize=7)
    top.set_ylabel("effective share (%)")
    bottom.set_ylabel("matmul/s (100 ms)")
    bottom.set_xlabel("seconds")
    top.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"observer-{args.backend}-{label}.png", dpi=110)
    plt.close(fig)


def fmt(value: Any) -> str:
    if value is None:
        return "not reached"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def write_markdown(args: argparse.Namespace, results: dict[str, Any]) -> None:
    lines = [
        f"# fcsp-observer on {results.get('gpu', 'the GPU')} ({time.strftime('%Y-%m-%d')})",
        "",
        f"`python3 bench/observer_bench.py --size {args.size} --batch {args.batch}"
        f" --interval-ms {args.interval_ms or 'default'}`; raw numbers in observer-raw.json.",
        "",
        "| measure | result | target |",
        "|---|---|---|",
    ]
    wc = results.get("work_conservation", {})
    rc = results.get("reclaim", {})
    fa = results.get("fairness", {})
    nn = results.get("noisy_neighbour", {})
    li = results.get("latency_isolation", {})
    rs = results.get("resize", {})

    def slowest(values: list[float | None]) -> str:
        got = [v for v in values if v is not None]
        if not got:
            return "not reached"
        worst = "not reached" if len(got) < len(values) else f"{max(got) * 1000:.0f} ms"
        return f"median {statistics.median(got) * 1000:.0f} ms, max {worst}"

    lines += [
        f"| work conservation (1 of 4 busy) | {fmt(wc.get('throughput_vs_alone'))} of alone "
        f"(share {fmt(wc.get('share_pct'))} %) | >= 0.95 (MIG 0.25) |",
        f"| reclaim, slot share >= 90 % | {slowest(rc.get('slot_share_s', []))} | <= 100 ms |",
        f"| reclaim, throughput >= 90 % of share | {slowest(rc.get('throughput_s', []))} | "
        "<= 100 ms |",
        f"| fairness, Jain (4 busy) | {fmt(fa.get('jain'))} | >= 0.995 |",
        f"| GPU total with 4 busy | {fmt(fa.get('sum_vs_alone'))} of alone | ~1 |",
    ]
    for mode in ("balanced", "adaptive"):
        drop = nn.get(mode, {}).get("drop")
        vs_share = nn.get(mode, {}).get("drop_vs_guaranteed")
        lines.append(
            f"| noisy neighbour drop vs its guaranteed share ({mode}) | {fmt(vs_share)} | <= 0.03 |"
        )
        lines.append(
            f"| victim drop vs light neighbour, borrowing included ({mode}) | {fmt(drop)} | |"
        )
    alone, busy = li.get("alone_us", {}), li.get("with_saturating_neighbour_us", {})
    lines += [
        f"| latency alone p50 / p99 (us) | {fmt(alone.get('p50'))} / {fmt(alone.get('p99'))} | |",
        f"| latency with saturating neighbour p50 / p99 (us) | {fmt(busy.get('p50'))} / "
        f"{fmt(busy.get('p99'))} (p99 x{fmt(li.get('p99_ratio'))}) | time-slicing 55x, MPS 4.4x |",
        f"| resize (fcspctl set --sm 60) to new share | "
        f"{fmt(rs.get('to_new_share_after_write_s'))} s after the write "
        f"(command {fmt(rs.get('fcspctl_set_command_s'))} s) | one tick |",
        f"| observer CPU during the run | {fmt(results.get('observer_cpu_pct_of_core'))} % "
        "of a core | < 2 % |",
        "",
        "## Workday (shares in % at the end of each phase)",
        "",
    ]
    for label, row in results.get("workday", {}).get("shares", {}).items():
        lines.append(f"- {label}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(row.items())))
    lines += [
        "",
        f"![workday](observer-{args.backend}-workday.png)",
        "",
        "Latency isolation is bounded by time-slicing: without MPS the GPU runs one context "
        "at a time, so a neighbour's kernels delay a short kernel by up to a time slice "
        "however the neighbour's launches are throttled; throttling divides throughput.",
    ]
    rows: list[str] = []
    acc = results.get("accuracy", {})
    for share in ("10", "25", "50", "75"):
        row = acc.get(share, {})
        rows.append(
            f"| accuracy, one tenant strict at {share} % | {fmt(row.get('achieved_pct'))} % "
            f"(error {fmt(row.get('error_points'))} points; GPU time admitted "
            f"{fmt(row.get('shim_busy_per_s'))}/s, waited {fmt(row.get('shim_throttled_per_s'))}"
            f"/s, SM {fmt(row.get('sm_clock_mhz'))} MHz) | within 3 points |"
        )
    for label, got in results.get("pair", {}).items():
        if isinstance(got, dict):
            names = [n for n in got if n[0] in "PQ" and "_" not in n]
            measured = " / ".join(f"{fmt(got[n])}" for n in names)
            where = "; ".join(
                f"{n}: GPU time admitted {fmt(got[f'{n}_gpu_time_per_s'])} s/s, waited "
                f"{fmt(got[f'{n}_waited_per_s'])} s/s, charged "
                f"{fmt(got[f'{n}_charged_ms_per_matmul'])} ms/matmul"
                for n in names
                if f"{n}_gpu_time_per_s" in got
            )
            split = "two busy, no FCSP" if label == "plain" else " / ".join(n[1:] for n in names)
            rows.append(
                f"| pair {split} ({label}) | {measured} % "
                f"(sum {fmt(got.get('sum'))}; {where + '; ' if where else ''}alone "
                f"{fmt(got.get('solo_ms_per_matmul'))} ms/matmul; SM "
                f"{fmt(got.get('sm_clock_mhz'))} MHz) | each within 3 points |"
            )
    lc = results.get("latency_capped", {})
    if "alone_us" in lc:
        alone_c, busy_c = lc["alone_us"], lc["with_neighbour_70_us"]
        rows.append(
            "| latency (priority latency, 30 %) next to a saturating 70 % neighbour, p50 / p99 "
            f"(us) | "
            f"{fmt(busy_c.get('p50'))} / {fmt(busy_c.get('p99'))} (alone {fmt(alone_c.get('p99'))}"
            f", p99 x{fmt(lc.get('p99_ratio'))}; neighbour at "
            f"{fmt(lc.get('neighbour_throughput_vs_alone'))} of alone) | <= 2x |"
        )
    for name in ("four", "noisy", "accuracy", "pair", "latency_capped", "fault"):
        if "error" in results.get(name, {}):
            rows.append(f"| {name} | failed: {results[name]['error']} | |")
    if "fault" in results and "error" not in results["fault"]:
        f = results["fault"]
        rows.append(
            f"| MPS fault next to a busy tenant | neighbour still running: "
            f"{f['victim_still_running_after']}; observer noticed after "
            f"{fmt(f['detected_after_s'])} s, daemon restarted after "
            f"{fmt(f['restarted_after_s'])} s; new client runs: {f['new_client_runs']} | |"
        )
    at = lines.index("## Workday (shares in % at the end of each phase)") - 1
    lines[at:at] = rows
    (args.out / f"observer-{args.backend}.md").write_text("\n".join(lines) + "\n")


def guarded(name: str, results: dict[str, Any], run: Any) -> None:
    """A section that fails is a row saying why, not the end of the run."""
    try:
        run()
    except Exception as exc:  # reported in the results
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"{name} failed: {exc}")


def nvidia_smi(query: str, *extra: str) -> str:
    """The first line nvidia-smi answers to --query-gpu, or "" without it."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader", *extra],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def gpu_uuid() -> str:
    return nvidia_smi("uuid", "-i", "0")


def gpu_name() -> str:
    return nvidia_smi("name,driver_version") or "unknown GPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="matmul side (fp16)")
    parser.add_argument("--batch", type=int, default=8, help="matmuls per synchronize")
    parser.add_argument("--interval-ms", type=int, default=0, help="observer tick; 0: default")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--measure", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--phase", type=float, default=3.0, help="seconds per workday phase")
    parser.add_argument("--repeats", type=int, default=5, help="reclaim repetitions")
    parser.add_argument("--fake", action="store_true", help="no GPU: check the plumbing")
    parser.add_argument(
        "--only",
        default="",
        help="comma list: solo,four,noisy,accuracy,pair,latency_capped,fault",
    )
    parser.add_argument("--backend", choices=("timeslice", "mps"), default="timeslice")
    parser.add_argument("--clock-normalise", choices=("off", "full-load"), default="full-load")
    parser.add_argument("--clock-max-speedup-pct", type=int, default=0, help="0: the default")
    parser.add_argument("--gpu-uuid", default="", help="the GPU's UUID; default: nvidia-smi's")
    parser.add_argument("--shim", type=Path, default=SHIM, help="the libvgpu.so tenants preload")
    parser.add_argument("--pair-shares", default="30/70", help="comma list of small/large")
    parser.add_argument("--accuracy-shares", default="10,25,50,75", help="comma list")
    parser.add_argument("--pair-modes", default="strict,balanced", help="comma list")
    parser.add_argument(
        "--calib-log", action="store_true", help="each tenant's calibration samples to $OUT"
    )
    parser.add_argument(
        "--mps-control",
        default=shutil.which("nvidia-cuda-mps-control", path=MPS_PATH) or "nvidia-cuda-mps-control",
    )
    args = parser.parse_args()
    args.out = Path(os.environ.get("OUT", REPO / "bench" / "results" / "out"))
    args.out.mkdir(parents=True, exist_ok=True)
    args.gpu_uuid = args.gpu_uuid or gpu_uuid()
    # One observer state directory for every scene, like /var/lib/fcsp on a host.
    args.state_dir = Path(tempfile.mkdtemp(prefix="fo-state-", dir="/tmp"))
    if not args.fake and not args.shim.exists():
        subprocess.run(["make", "-C", str(REPO), "shim"], check=True)
    only = set(filter(None, args.only.split(","))) or {"solo", "four", "noisy"}
    sections = {"accuracy": accuracy, "pair": pair, "latency_capped": latency_capped}
    results: dict[str, Any] = {
        "gpu": gpu_name(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    try:
        # Every section's ratios are against the solo run, and it is where the observer
        # learns the full-load clock: without it the noisy-neighbour drop read 21 % instead
        # of 5 % (bench/results/2026-11-29-compute-s7.md), the pair 2e5 %.
        needs_solo = {"solo", "four", "noisy", "pair", "accuracy", "latency_capped"}
        solo = solo_baseline(args, results) if only & needs_solo else 1.0
        if "four" in only:
            guarded("four", results, lambda: four_tenants(args, results, solo))
        if "noisy" in only:
            guarded("noisy", results, lambda: noisy_neighbour(args, results))
        for name, run in sections.items():
            if name in only:
                guarded(name, results, lambda run=run: run(args, results, solo))
        if "fault" in only and args.backend == "mps":
            guarded("fault", results, lambda: fault(args, results))
    finally:
        raw = args.out / f"observer-{args.backend}-raw.json"
        raw.write_text(json.dumps(results, indent=2, default=str))
        write_markdown(args, results)
    log(f"wrote {args.out / f'observer-{args.backend}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
