"""The tenants of bench/observer_bench.py: observer_worker.py processes steered over stdin,
their slots, and the share the observer gives each, sampled every 5 ms.

Built on lib.scene: one Scene per experiment, in a short /tmp directory (MPS socket paths
must fit in 107 bytes), with the observer's state_dir shared by all of them, as
/var/lib/fcsp is on a host.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lib import BENCH
from lib.scene import Device, Scene, python

from fcsp_hook.slot import abi, files, live

WORKER = BENCH / "observer_worker.py"
SAMPLE_S = 0.005
WHOLE = abi.WHOLE_GPU_CENTI


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


@dataclass
class Tenants:
    """One experiment: its scene, its workers, and the shares the observer gave them."""

    scene: Scene
    args: argparse.Namespace
    workers: dict[str, Worker] = field(default_factory=dict)
    shares: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    halt: threading.Event = field(default_factory=threading.Event)

    @property
    def run_dir(self) -> Path:
        return self.scene.run_dir

    def slot_dir(self, name: str) -> Path:
        return self.scene.slot_dir(name)

    def add_tenant(
        self,
        name: str,
        sm_centi: int,
        mode: abi.IsolationMode = abi.IsolationMode.BALANCED,
        priority: abi.Priority = abi.Priority.BEST_EFFORT,
        shim: bool = True,
    ) -> Worker:
        """A slot and its worker; shim=False: the slot exists, the worker ignores it."""
        uuid = self.args.gpu_uuid
        on_mps = shim and self.args.backend == "mps"
        threads = 0
        if on_mps:
            # MPS clients must find the daemon when CUDA initialises: observer first.
            self.start_observer()
            self.scene.wait_mps(uuid)
            threads = self.scene.mps_threads(name, uuid, sm_centi, mode, priority)
        backend = abi.Backend.MPS if on_mps else abi.Backend.TIMESLICE
        device = Device(uuid=uuid, sm_centi=sm_centi, backend=backend, mps_threads_centi=threads)
        slot = self.scene.slot(name, [device], mode=mode, priority=priority)
        if on_mps:
            self.scene.link_mps(slot, uuid)
        # One GPU per worker: an MPS client sees only its daemon's GPU, and PyTorch must
        # not count the others (through NVML) and then fail to initialise them.
        extra = {"BUD_LOG_LEVEL": "debug"} if shim and self.args.calib_log else {}
        env = self.scene.env(
            slot if shim else None, visible=uuid or None, preload=not self.args.fake, extra=extra
        )
        argv = python(WORKER, "--size", str(self.args.size), "--batch", str(self.args.batch))
        argv += ["--fake"] if self.args.fake else []
        child = self.scene.spawn(f"{self.scene.name}-{name}", argv, env=env, interactive=True)
        worker = Worker(name, child.proc)
        worker.start_reader()
        self.workers[name] = worker
        return worker

    def wait_ready(self, timeout: float = 180.0) -> None:
        for w in self.workers.values():
            if not w.ready.wait(timeout):
                raise RuntimeError(f"worker {w.name} did not start (CUDA init?)")

    def drop(self, name: str) -> None:
        """The tenant stops and its slot goes, as after its container's poststop."""
        self.workers.pop(name).stop()
        self.scene.drop_slot(name)

    def start_observer(self) -> None:
        if self.scene.observer is not None:
            return
        mps = self.args.backend == "mps"
        self.scene.start_observer(
            interval_ms=self.args.interval_ms,
            clock_normalise=self.args.clock_normalise,
            clock_max_speedup_pct=self.args.clock_max_speedup_pct,
            mps_gpus=(self.args.gpu_uuid,) if mps else (),
            mps_control=self.args.mps_control if mps else "",
        )
        threading.Thread(target=self._sample_shares, daemon=True).start()

    def _sample_shares(self) -> None:
        maps: dict[str, live.LimitsMap] = {}
        while not self.halt.wait(SAMPLE_S):
            now = time.monotonic()
            row = {}
            for name in list(self.workers):
                if name not in maps:
                    try:
                        maps[name] = live.LimitsMap(self.slot_dir(name) / abi.LIMITS_FILE)
                    except Exception:  # noqa: S112  # not there yet
                        continue
                row[name] = maps[name].effective(0)
            self.shares.append((now, row))
        for m in maps.values():
            m.close()

    def usage(self, name: str) -> Counters:
        dev = files.read_usage(self.slot_dir(name) / abi.USAGE_FILE).device[0]
        return Counters(time.monotonic(), int(dev.busy_ns), int(dev.throttled_ns))

    def share_of(self, name: str) -> int:
        limits = files.read_limits(self.slot_dir(name) / abi.LIMITS_FILE)
        return int(limits.device[0].sm_effective_centi)

    def set_limits(self, name: str, **values: int) -> None:
        """Change seqlocked fields of a running tenant (what fcspctl set does)."""
        limits = live.LimitsMap(self.slot_dir(name) / abi.LIMITS_FILE)
        try:
            with limits.update() as view:
                for key, value in values.items():
                    if key == "sm_requested_centi":
                        view.device[0].sm_requested_centi = value
                    else:
                        setattr(view, key, value)
        finally:
            limits.close()

    def wait_share(
        self, name: str, predicate: Callable[[int], bool], since: float, timeout: float = 10.0
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
        return self.scene.observer_cpu_s()

    def close(self) -> None:
        self.halt.set()
        for w in self.workers.values():
            w.stop()
        self.scene.close()  # the observer, then the MPS daemon it leaves to running clients


@contextlib.contextmanager
def scene(args: argparse.Namespace, label: str) -> Iterator[Tenants]:
    # Short: <root>/run/mps/<uuid>/pipe/control_privileged must fit a socket's 107 bytes, or
    # the MPS daemon cannot be told to quit (the label names the logs instead).
    root = Path(tempfile.mkdtemp(prefix="fo-", dir="/tmp"))
    s = Tenants(Scene(root, args.raw, shim=args.shim, state_dir=args.state_dir, name=label), args)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


def wait_until(predicate: Callable[[], object], timeout: float) -> bool:
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


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "n": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)]

    return {"p50": pick(0.50), "p99": pick(0.99), "n": len(ordered)}
