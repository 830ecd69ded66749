"""fcsp-observer: the host-wide daemon that shares every GPU among its tenants.

Each tick (config [observer] interval_ms): discover slots under <run_dir>/tenants,
read each tenant's usage (pread, bounded: the tenant writes it), decide per GPU with
fcsp_hook.policy, write the shares back (one aligned store each) and the heartbeat.
Less often: reap slots of containers that are gone, cross-check with NVML, publish
state for fcspctl and metrics, talk to systemd.

Decisions worth knowing:

- Per-process records (pid LIVE in a usage file) are reaped by the shims, not here:
  releasing a dead process's memory charge exactly once needs a compare-and-swap on
  shared memory, which the shim does natively on its next allocation.  The observer
  only reports dead records (status, metrics, log), mapping pids through the
  container's pid namespace (/proc/<host pid>/status NSpid).
- A whole tenant is reaped when the container's init process, recorded by the hook in
  limits (init_host_pid, init_start_time), is gone or its pid was reused.  A slot
  without that record is never reaped (we cannot tell a dead container from an idle
  one), only reported.
- The observer keeps no state of its own on disk: a restarted observer rebuilds
  everything from /run/fcsp (new tenants are presumed active for one idle window).
- On SIGTERM it writes every tenant's requested share back as its effective share and
  a zero heartbeat ("no observer"), so the shims run on their requests at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from fcsp_hook import (
    abi,
    clockstore,
    config,
    metrics,
    mps,
    mpsd,
    notify,
    nvml,
    policy,
    slot,
    slotio,
)
from fcsp_hook.errors import ConfigError, FcspError, SlotError
from fcsp_hook.gpus import host_gpu_uuids
from fcsp_hook.procfs import proc_stat

NS_PER_MS = 1_000_000
NS_PER_US = 1_000
STATUS_PERIOD_NS = 1_000_000_000
KERNEL_SPAN_NS = 500_000_000  # the size of a tenant's launches is measured over spans this long
# ... and taken as the median of the last KERNEL_SPANS spans, once there are MIN_KERNEL_SPANS:
# on the H200 1 s spans of one 5.34 ms GEMM read 5.32-5.73 ms (the shim's estimates move with
# its samples), and a tenant's first spans hold its launches before calibration; a cycle
# fitted to each span moved every few seconds (44.7-55.9 ms).
KERNEL_SPANS, MIN_KERNEL_SPANS = 5, 3
STATE_FILE = "observer.json"
# How often MPS daemons are checked (alive, faults in their log).
MPS_CHECK_NS = 500_000_000
# How often SM clocks are read for clock normalisation (they move over seconds).
CLOCK_CHECK_NS = 250_000_000
# The clock kernels run at is the highest read over the last second: a reading taken while
# a throttled GPU idles between kernels is lower.
CLOCK_WINDOW = 4
# How often, at most, learned full-load clocks are written to the state directory.
CLOCK_SAVE_NS = 10_000_000_000
MIN_WRITTEN_CENTI = 1
INTERVAL_ENV = "BUD_OBSERVER_INTERVAL_US"

Logger = Any  # structlog's BoundLogger: its methods are dynamically typed


def configure_logging() -> Logger:
    """JSON lines on stderr (journald keeps them), one object per event."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger("fcsp-observer")


# ---- /proc: is a container still there, which of its processes are dead ----------------


def container_alive(pid: int, start_time: int, proc: Path = Path("/proc")) -> bool | None:
    """True/False for a recorded init process; None when the slot has no record."""
    if pid <= 0:
        return None
    stat = proc_stat(pid, proc)
    if stat is None or stat[0] in {"Z", "X"}:
        return False
    return not (start_time and stat[1] != start_time)


def namespace_members(
    init_pids: dict[str, int], proc: Path = Path("/proc")
) -> dict[int, tuple[str, int]]:
    """Every host process in the tenants' pid namespaces: host pid -> (container id, ns pid).

    A pid namespace that several tenants share (containers run with --pid=host, or joined
    to one another's) names no single owner: its processes are attributed to none, rather
    than all to whichever tenant came last (which would flag the others' processes as
    running without the shim).
    """
    ns_owner: dict[str, str] = {}
    shared: set[str] = set()
    for cid, pid in init_pids.items():
        with contextlib.suppress(OSError):
            ns = os.readlink(proc / str(pid) / "ns" / "pid")
            if ns in ns_owner and ns_owner[ns] != cid:
                shared.add(ns)
            ns_owner[ns] = cid
    for ns in shared:
        del ns_owner[ns]
    members: dict[int, tuple[str, int]] = {}
    if not ns_owner:
        return members
    with os.scandir(proc) as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                owner = ns_owner.get(os.readlink(f"{entry.path}/ns/pid"))
                if owner is None:
                    continue
                status = Path(entry.path, "status").read_text()
            except OSError:
                continue  # exited while we looked
            for line in status.splitlines():
                if line.startswith("NSpid:"):
                    members[int(entry.name)] = (owner, int(line.split()[-1]))
                    break
    return members


# ---- per-tenant tracking ------------------------------------------------------------------


@dataclass
class DeviceTrack:
    """One GPU of one tenant: last counters, and what they say about demand."""

    last_active_ns: int
    launches: int = -1  # -1: no sample yet
    busy_ns: int = 0
    throttled_ns: int = 0
    active: bool = True
    unmet: int = 0
    throttled_pct: int = 0  # smoothed share of the last ticks spent waiting for tokens
    kernel_us: float = 0.0  # size of its launches (update_kernel_time); 0: unknown
    kernel_span: tuple[int, int, int] = (0, 0, 0)  # (since, busy_sq, busy_ns) then
    kernel_spans: deque[float] = field(default_factory=lambda: deque(maxlen=KERNEL_SPANS))
    usage: slotio.DeviceUsage = field(default_factory=slotio.DeviceUsage)


@dataclass
class Tenant:
    container_id: str
    directory: Path
    limits: slotio.LimitsMap
    usage: slotio.UsageReader
    spec: abi.Limits
    log: Logger
    devices: list[DeviceTrack] = field(default_factory=list)
    problem: str = ""
    dead_processes: list[int] = field(default_factory=list)
    dead_bytes: int = 0
    unshimmed: list[int] = field(default_factory=list)
    mps_faults: int = 0  # neighbours' fatal GPU errors that tore down this tenant's clients
    outside_mps: list[int] = field(default_factory=list)  # host pids NVML saw outside MPS
    last_samples: list[slotio.DeviceUsage] | None = None
    # Per device, from the limits (rebuilt when their generation changes):
    # (GPU key, policy key, mode, requested centi, priority).
    described: list[tuple[str, str, abi.IsolationMode, int, abi.Priority]] = field(
        default_factory=list
    )

    @property
    def quiescent(self) -> bool:
        """Idle on every GPU with no throttling left to decay: a tick can skip it."""
        return not any(d.active or d.throttled_pct or d.unmet for d in self.devices)

    @property
    def device_count(self) -> int:
        return min(int(self.spec.device_count), abi.MAX_DEVICES)

    def close(self) -> None:
        self.limits.close()
        self.usage.close()


def _mode(value: int) -> abi.IsolationMode:
    try:
        return abi.IsolationMode(value)
    except ValueError:
        return abi.IsolationMode.BALANCED  # host-written, but never let a bad byte stop us


def _priority(value: int) -> abi.Priority:
    try:
        return abi.Priority(value)
    except ValueError:
        return abi.Priority.BEST_EFFORT


def update_track(
    track: DeviceTrack,
    sample: slotio.DeviceUsage,
    *,
    effective: int,
    now_ns: int,
    dt_ns: int,
    obs: config.ObserverConfig,
) -> None:
    """Fold one usage sample into a device's track: activity, idleness, unmet demand."""
    first = track.launches < 0
    # Counters only grow; one that went backwards was reset (or forged): rebase on it.
    d_launch = max(sample.launches - track.launches, 0) if not first else 0
    d_busy = max(sample.busy_ns - track.busy_ns, 0) if not first else 0
    d_throttle = max(sample.throttled_ns - track.throttled_ns, 0) if not first else 0
    track.launches, track.busy_ns, track.throttled_ns = (
        sample.launches,
        sample.busy_ns,
        sample.throttled_ns,
    )
    track.usage = sample
    update_kernel_time(track, sample, now_ns)
    if d_launch or d_busy or d_throttle:
        track.last_active_ns = now_ns
    track.active = now_ns - track.last_active_ns < obs.idle_window_ms * NS_PER_MS
    # Several threads can wait at once: the throttled fraction is capped at 1.  It is
    # averaged (half old, half new) so that a shim reporting in bursts does not make
    # the tenant's burst share flap tick by tick.
    sample_pct = min(d_throttle * 100 // max(dt_ns, 1), 100)
    track.throttled_pct = (track.throttled_pct + sample_pct) // 2
    throttled_pct = track.throttled_pct
    if not track.active:
        track.unmet = 0
    elif throttled_pct >= max(obs.throttled_min_pct, 1):
        estimate = effective * throttled_pct // 100
        track.unmet = max(sample.demand_centi - effective, estimate, 1)
    else:
        # Not throttled, but using (nearly) all it has: it still wants what it has.  Were
        # that 0, a busy tenant's burst would be withdrawn the tick it stops being
        # throttled, it would be throttled again, and its share would flap (seen on the
        # H200: 97 % <-> 65 % every ~0.3 s for a lone busy tenant).  A claim alone never
        # counts as more than that: 1 keeps the burst, it does not ask for more.
        track.unmet = 1 if sample.demand_centi * 10 >= effective * 9 else 0


def update_kernel_time(track: DeviceTrack, sample: slotio.DeviceUsage, now_ns: int) -> None:
    """The size of the launches that take a tenant's GPU time: their mean cost weighted by
    that cost (sum of squares over sum), over spans of KERNEL_SPAN_NS, their median.  Not the
    plain mean: a GEMM launched with a tiny kernel after it is one 5 ms unit of work in a
    turn window, not two of 2.5 ms.  Counters that went backwards start a new span;
    forged ones give a wrong value, never an unbounded one."""
    since, busy_sq, busy = track.kernel_span
    if since and now_ns - since < KERNEL_SPAN_NS:
        return
    d_sq, d_busy = sample.busy_sq - busy_sq, sample.busy_ns - busy
    if since and d_sq > 0 and d_busy > 0:
        # busy_sq is in (ns >> 10) ** 2: one unit of it per 1024 ns of busy time, squared
        spans = track.kernel_spans
        spans.append(min(d_sq * 1024 * 1024 / d_busy / NS_PER_US, abi.TURN_MAX_US))
        if len(spans) >= MIN_KERNEL_SPANS:
            track.kernel_us = statistics.median(spans)
    track.kernel_span = (now_ns, sample.busy_sq, sample.busy_ns)


def skip_kernel_span(track: DeviceTrack) -> None:
    """A tenant's launch size counts only spans measured while it takes turns: time-sliced,
    its estimates hold its neighbour's slices (on the H200 the shim's estimate of a 5.15 ms
    GEMM fell from 9.7 ms before turns to 4.6-5.4 ms in them), and a cycle fitted to spans of
    both moved three times in the 4 s after turns began (57.8, 54.5, 51.9 ms).  Spans from
    earlier turns are kept: turns that lapse for a tick resume fitted."""
    track.kernel_span = (0, 0, 0)


@dataclass(frozen=True)
class GpuClock:
    """clock_normalise on one GPU: the full-load clock learned, the reading the scale
    came from (its clock the highest of the last CLOCK_WINDOW), and the scale."""

    full_load_mhz: float
    reading: policy.ClockReading
    scale_centi: int

    def status(self) -> dict[str, object]:
        """For the state file: with the utilisation and power that weighted the scale
        (policy.power_bound_centi), so that a scale can be checked against them."""
        return {
            "full_load_mhz": round(self.full_load_mhz),
            "sm_mhz": self.reading.sm_mhz,
            "scale_centi": self.scale_centi,
            "util_pct": self.reading.util_pct,
            "power_w": self.reading.power_w,
        }


def turn_ratio(word: int) -> float:
    cycle, _, length = abi.unpack_turn(word)
    return length / cycle if cycle else 0.0


def gpu_key(dev: abi.LimitsDevice, container_id: str, index: int, minors: dict[int, str]) -> str:
    """The host GPU a tenant's device entry is: UUID, else nvidia<minor>, else its own."""
    uuid = str(dev.uuid.decode(errors="replace"))
    if uuid:
        return uuid
    if dev.host_index >= 0:
        return minors.get(int(dev.host_index), f"nvidia{dev.host_index}")
    return f"{container_id}/{index}"  # unknown GPU: shares it with nobody we know of


# ---- the daemon ---------------------------------------------------------------------------


def interval_ns(cfg: config.Config, env: dict[str, str]) -> int:
    raw = env.get(INTERVAL_ENV, "")
    if not raw:
        return cfg.observer.interval_ms * NS_PER_MS
    if not raw.isdigit() or not 100 <= int(raw) <= 10_000_000:
        raise ConfigError(
            f"{INTERVAL_ENV}={raw!r} is invalid: expected microseconds from 100 to 10000000"
        )
    return int(raw) * NS_PER_US


@dataclass
class Observer:
    cfg: config.Config
    config_path: Path
    log: Logger
    notifier: notify.Notifier
    nvml_factory: Callable[[], nvml.Nvml] = nvml.Nvml
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    tenants: dict[str, Tenant] = field(default_factory=dict)
    gpu_states: dict[str, policy.GpuState] = field(default_factory=dict)
    contention: dict[str, int] = field(default_factory=dict)
    exporter: metrics.Metrics = field(default_factory=metrics.Metrics)
    ticks: int = 0
    tick_ns_total: int = 0

    def __post_init__(self) -> None:
        self.interval = interval_ns(self.cfg, self.env)
        self.nv = self.nvml_factory()
        self.gpus = self.nv.inventory()
        self.minors = {g.minor: g.uuid for g in self.gpus}
        self.memory_total = {g.uuid: g.memory_total for g in self.gpus}
        self.nvml_memory: dict[tuple[str, str], int] = {}
        self.over_quota: set[tuple[str, str]] = set()
        self.foreign: dict[str, list[int]] = {}
        self.members: dict[int, tuple[str, int]] = {}
        self.tenants_mtime = -1
        self.next_scan_ns = 0
        # Per GPU: (signature of the policy's inputs, allocation); see _decide.
        self.decisions: dict[str, tuple[tuple[object, ...], policy.Allocation]] = {}
        self.last_tick_ns = slotio.monotonic_ns()
        self.next_reap_ns = 0
        self.next_nvml_ns = 0
        self.next_status_ns = 0
        self.next_watchdog_ns = 0
        self.status_line = ""
        self.dirty_status = True
        self.mps: dict[str, mpsd.Daemon] = {}
        self.next_mps_ns = 0
        # Per GPU UUID: the full-load SM clock learned so far, the reading, the scale.
        self.clocks: dict[str, GpuClock] = {}
        self.recent_mhz: dict[str, deque[int]] = {}
        # GPUs whose busy tenants take turns (policy.turns) as of the last tick.
        self.turning: set[str] = set()
        self.next_clock_ns = 0
        # Full-load clocks learned before (clockstore), and what the state file holds.
        self.full_load: dict[str, float] = {}
        self.saved_full_load: dict[str, float] | None = None  # None: not read yet
        self.next_clock_save_ns = 0
        if not self.nv.available:
            self.log.info("running without NVML", reason=self.nv.reason)

    @property
    def run_dir(self) -> Path:
        return self.cfg.paths.run_dir

    # -- discovery --

    def discover(self, now_ns: int) -> None:
        """Open new slots, drop vanished ones, reopen slots that were recreated.

        A new or removed slot changes the tenants directory's mtime, so a tick costs one
        stat() unless it changed; the full rescan (which also notices a slot rewritten in
        place by a restarted container) runs at least once a second.
        """
        base = slot.tenants_dir(self.run_dir)
        try:
            mtime = os.stat(base).st_mtime_ns
        except OSError:
            mtime = -1
        if mtime == self.tenants_mtime and now_ns < self.next_scan_ns:
            return
        self.tenants_mtime = mtime
        self.next_scan_ns = now_ns + STATUS_PERIOD_NS
        seen: set[str] = set()
        try:
            with os.scandir(base) as entries:
                names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            names = []
        for name in names:
            try:
                slot.validate_container_id(name)
            except SlotError:
                continue
            seen.add(name)
            tenant = self.tenants.get(name)
            if tenant is not None and not self._same_file(tenant):
                self._drop(name, "tenant slot recreated")
                tenant = None
            if tenant is None:
                self._open(name, base / name, now_ns)
        for name in set(self.tenants) - seen:
            self._drop(name, "tenant slot gone")

    @staticmethod
    def _same_file(tenant: Tenant) -> bool:
        try:
            return os.stat(tenant.directory / abi.LIMITS_FILE).st_ino == tenant.limits.inode
        except OSError:
            return False

    def _open(self, name: str, directory: Path, now_ns: int) -> None:
        log = self.log.bind(container_id=name)
        try:
            limits = slotio.LimitsMap(directory / abi.LIMITS_FILE)
        except SlotError as exc:
            log.debug("slot not ready", error=str(exc))  # the hook may be writing it now
            return
        try:
            usage = slotio.UsageReader(directory / abi.USAGE_FILE)
            spec = limits.snapshot()
        except SlotError as exc:
            limits.close()
            log.debug("slot not ready", error=str(exc))
            return
        tenant = Tenant(name, directory, limits, usage, spec, log)
        self._resize(tenant, now_ns)
        self.tenants[name] = tenant
        self.dirty_status = True
        log.info(
            "tenant found",
            tenant=spec.tenant.decode(errors="replace"),
            mode=_mode(spec.isolation_mode).name.lower(),
            gpus=tenant.device_count,
        )

    def _drop(self, name: str, why: str) -> None:
        tenant = self.tenants.pop(name)
        tenant.close()
        self.dirty_status = True
        tenant.log.info(why)

    def _resize(self, tenant: Tenant, now_ns: int) -> None:
        count = tenant.device_count
        # A new tenant (or a restarted observer) presumes activity for one idle window.
        while len(tenant.devices) < count:
            tenant.devices.append(DeviceTrack(last_active_ns=now_ns))
        del tenant.devices[count:]
        spec, cid = tenant.spec, tenant.container_id
        tenant.last_samples = None  # the device list changed: sample afresh
        tenant.described = [
            (
                gpu_key(spec.device[i], cid, i, self.minors),
                f"{cid}/{i}",
                _mode(spec.isolation_mode),
                min(int(spec.device[i].sm_requested_centi), abi.WHOLE_GPU_CENTI),
                _priority(spec.priority),
            )
            for i in range(count)
        ]

    # -- one tick --

    def tick(self, now_ns: int) -> None:
        started = slotio.monotonic_ns()
        dt = max(now_ns - self.last_tick_ns, 1)
        self.last_tick_ns = now_ns
        self.discover(now_ns)
        for tenant in self.tenants.values():
            self._sample(tenant, now_ns, dt)
        self._decide()
        beat = slotio.monotonic_ns()
        for tenant in self.tenants.values():
            tenant.limits.set_heartbeat(beat)
        if now_ns >= self.next_reap_ns:
            self.next_reap_ns = now_ns + self.cfg.observer.reap_interval_ms * NS_PER_MS
            self.reap()
        if now_ns >= self.next_mps_ns:
            self.next_mps_ns = now_ns + MPS_CHECK_NS
            self.sync_backends()
        if now_ns >= self.next_clock_ns:
            self.next_clock_ns = now_ns + CLOCK_CHECK_NS
            self.normalise_clocks()
        if self.nv.available and now_ns >= self.next_nvml_ns:
            self.next_nvml_ns = now_ns + self.cfg.observer.nvml_interval_ms * NS_PER_MS
            self.check_nvml()
        self.ticks += 1
        self.tick_ns_total += slotio.monotonic_ns() - started
        if now_ns >= self.next_status_ns or self.dirty_status:
            self.next_status_ns = now_ns + STATUS_PERIOD_NS
            self.dirty_status = False
            self.publish()

    def _sample(self, tenant: Tenant, now_ns: int, dt: int) -> None:
        if tenant.limits.generation != tenant.spec.generation:
            try:
                tenant.spec = tenant.limits.snapshot()
            except SlotError as exc:
                tenant.log.warning("limits unreadable", error=str(exc))
            self._resize(tenant, now_ns)
            self.dirty_status = True
        try:
            samples = tenant.usage.devices(tenant.device_count)
        except SlotError as exc:
            if tenant.problem != str(exc):
                tenant.log.warning("usage unreadable; keeping the last view", error=str(exc))
            tenant.problem = str(exc)
            return
        tenant.problem = ""
        if samples is tenant.last_samples and tenant.quiescent:
            return  # idle, nothing moved, nothing decaying: this tick changes nothing
        tenant.last_samples = samples
        for i, (track, sample) in enumerate(zip(tenant.devices, samples, strict=True)):
            was_active = track.active
            update_track(
                track,
                sample,
                effective=tenant.limits.effective(i),
                now_ns=now_ns,
                dt_ns=dt,
                obs=self.cfg.observer,
            )
            if track.active != was_active:
                tenant.log.info("tenant active" if track.active else "tenant idle", device=i)
                self.dirty_status = True

    def _decide(self) -> None:
        """Run the policy on every GPU and store the shares that changed.

        The policy looks at unmet demand only as "wants more or not", and at contention
        only as "above the high mark, below the low one, or between": when those, the
        requests and adaptive mode's state are what they were last tick, last tick's
        answer stands and the policy is not run (the common, steady case).
        """
        groups: dict[str, list[tuple[Tenant, int]]] = {}
        for tenant in self.tenants.values():
            for i, described in enumerate(tenant.described):
                groups.setdefault(described[0], []).append((tenant, i))
        obs = self.cfg.observer
        self.contention = {}
        for gpu, members in groups.items():
            signature = tuple(
                (*t.described[i][1:], t.devices[i].active, t.devices[i].unmet > 0)
                for t, i in members
            )
            contention = policy.contention_of(
                [
                    t.devices[i].unmet
                    for t, i in members
                    if t.devices[i].active and t.described[i][2] != abi.IsolationMode.NONE
                ]
            )
            self.contention[gpu] = contention
            state = self.gpu_states.get(gpu, policy.GpuState())
            key = (
                signature,
                state,
                contention >= obs.contention_high_pct,
                contention <= obs.contention_low_pct,
            )
            cached = self.decisions.get(gpu)
            if cached is None or cached[0] != key:
                cached = (key, self._allocate(members, state))
                self.decisions[gpu] = cached
            result = cached[1]
            self.gpu_states[gpu] = result.state
            for tenant, i in members:
                # The shim reads 0 as "no share set" and falls back to the request, so
                # "nothing" is written as the least share there is, 0.01 %.
                share = max(result.shares[tenant.described[i][1]], MIN_WRITTEN_CENTI)
                if tenant.limits.effective(i) != share:
                    tenant.limits.set_effective(i, share)
            if self._set_turns(members, obs.turn_cycle_ms * 1000):
                self.turning.add(gpu)
            else:
                self.turning.discard(gpu)
        for gpu in set(self.gpu_states) - set(groups):
            del self.gpu_states[gpu]
            self.decisions.pop(gpu, None)
        self.turning &= set(groups)

    @staticmethod
    def _set_turns(members: list[tuple[Tenant, int]], cycle_us: int) -> bool:
        """Windows of the cycle for the GPU's busy time-sliced tenants (policy.turns).
        Latency-priority tenants never wait for a turn; MPS runs clients side by side.
        Busy: using at least 90 % of its share (unmet > 0), and a tenant that has a turn
        keeps it down to half, so that one filling its window about exactly does not make
        the turns come and go tick by tick (seen on the H200 at 75 %)."""
        inputs = []
        for tenant, i in members:
            _, key, mode, _, priority = tenant.described[i]
            track = tenant.devices[i]
            may_take_turns = (
                mode != abi.IsolationMode.NONE
                and priority != abi.Priority.LATENCY
                and tenant.spec.device[i].backend == abi.Backend.TIMESLICE
            )
            effective = tenant.limits.effective(i)
            taking_turns = tenant.limits.turn(i) != 0
            if not taking_turns:
                skip_kernel_span(track)
            keeps = taking_turns and track.usage.demand_centi * 2 >= effective
            busy = may_take_turns and track.active and (track.unmet > 0 or keeps)
            inputs.append(policy.TurnInput(key, effective, busy, track.kernel_us))
        current = max(abi.unpack_turn(tenant.limits.turn(i))[0] for tenant, i in members)
        words = policy.turns(inputs, cycle_us, current)
        for (tenant, i), turn_input in zip(members, inputs, strict=True):
            word = words[turn_input.key]
            if tenant.limits.turn(i) == word:
                continue
            tenant.limits.set_turn(i, word)
            cycle, start, length = abi.unpack_turn(word)
            if word:
                tenant.log.info("turn", device=i, cycle_ms=cycle / 1000,
                                start_ms=start / 1000, length_ms=length / 1000)  # fmt: skip
            else:  # why, for whoever tunes turn_cycle_ms or the thresholds
                track = tenant.devices[i]
                tenant.log.info("turns end", device=i, busy=turn_input.busy,
                                demand_centi=track.usage.demand_centi,
                                throttled_pct=track.throttled_pct)  # fmt: skip
        return any(words.values())

    @staticmethod
    def _inputs(members: list[tuple[Tenant, int]]) -> list[policy.TenantInput]:
        out = []
        for tenant, i in members:
            _, key, mode, requested, priority = tenant.described[i]
            track = tenant.devices[i]
            out.append(
                policy.TenantInput(key, mode, requested, track.active, track.unmet, priority)
            )
        return out

    def _allocate(
        self, members: list[tuple[Tenant, int]], state: policy.GpuState
    ) -> policy.Allocation:
        obs = self.cfg.observer
        return policy.allocate(
            self._inputs(members),
            policy.Pools(**vars(self.cfg.policy)),
            obs.idle_share_pct * abi.CENTI_PER_PERCENT,
            state,
            policy.AdaptiveParams(
                obs.contention_high_pct, obs.contention_low_pct, obs.adaptive_step_pct
            ),
        )

    # -- slower duties --

    def host_gpus(self) -> dict[int, str]:
        """Host index -> UUID: the driver's procfs files, else NVML's inventory."""
        return host_gpu_uuids(self.cfg.paths.driver_dir) or dict(self.minors)

    def sync_backends(self) -> None:
        """One MPS daemon per GPU configured for mps: started, kept alive, stopped when
        the config no longer asks for it."""
        wanted = {}
        if self.cfg.backend.any_mps:
            for index, uuid in self.host_gpus().items():
                if self.cfg.backend.for_gpu(uuid, index) == abi.Backend.MPS:
                    wanted[uuid] = index
        for uuid in list(self.mps):
            if uuid not in wanted:
                self.log.info("MPS backend no longer configured; stopping its daemon", gpu=uuid)
                self.mps.pop(uuid).stop()
        now = time.monotonic()
        for uuid in wanted:
            daemon = self.mps.get(uuid)
            if daemon is None:
                daemon = mpsd.Daemon(self.run_dir, uuid, self.cfg.backend.mps_control, self.log)
                self.mps[uuid] = daemon
            before = (daemon.state.backend, daemon.state.faults)
            daemon.ensure(now)
            if daemon.state.faults != before[1]:
                self._mark_fault(uuid)
            if (daemon.state.backend, daemon.state.faults) != before:
                self.dirty_status = True

    def normalise_clocks(self) -> None:
        """[observer] clock_normalise = "full-load": learn each GPU's full-load SM clock and
        publish to its tenants how much faster it runs now (0 when off or not known)."""
        on = self.cfg.observer.clock_normalise == config.CLOCK_FULL_LOAD and self.nv.available
        if not on and not self.clocks:
            return  # off, and no scale left in any slot to take back
        if on and self.saved_full_load is None:
            self.full_load, problem = clockstore.load(self.cfg.paths.state_dir)
            self.saved_full_load = dict(self.full_load)
            if problem:
                self.log.warning("full-load clocks not restored", reason=problem)
        for gpu in self.gpus if on else ():
            reading = self.nv.clock(gpu)
            if reading is None:
                continue
            reference = policy.learn_full_load_clock(self.full_load.get(gpu.uuid, 0.0), reading)
            if reference > 0:
                self.full_load[gpu.uuid] = reference
            recent = self.recent_mhz.setdefault(gpu.uuid, deque(maxlen=CLOCK_WINDOW))
            recent.append(reading.sm_mhz)
            busy = replace(reading, sm_mhz=max(recent))
            scale = policy.clock_scale_centi(
                reference, busy, self.cfg.observer.clock_max_speedup_pct
            )
            if scale and gpu.uuid in self.turning:
                # Tenants taking turns keep the GPU busy: a clock above the full-load one
                # then comes from gaps between turns, which no tenant's share should pay.
                scale = abi.WHOLE_GPU_CENTI
            self.clocks[gpu.uuid] = GpuClock(reference, busy, scale)
        if on:
            self._save_full_load()
        for cid, tenant in self.tenants.items():
            for i in range(tenant.device_count):
                uuid = gpu_key(tenant.spec.device[i], cid, i, self.minors)
                known = self.clocks.get(uuid)
                scale = known.scale_centi if on and known else 0
                if tenant.limits.clock_scale(i) != scale:
                    tenant.limits.set_clock_scale(i, scale)
        if not on:
            self.clocks.clear()
            self.recent_mhz.clear()

    def _save_full_load(self) -> None:
        """Keep the learned full-load clocks (at most every CLOCK_SAVE_NS, and only when
        one moved by more than 1 %), so that a restarted observer need not wait for the GPU
        to be saturated again before it can normalise."""
        now = slotio.monotonic_ns()
        saved = self.saved_full_load or {}
        moved = any(
            abs(mhz - saved.get(uuid, 0.0)) > mhz / 100 for uuid, mhz in self.full_load.items()
        )
        if not moved or now < self.next_clock_save_ns:
            return
        self.next_clock_save_ns = now + CLOCK_SAVE_NS
        problem = clockstore.save(self.cfg.paths.state_dir, self.full_load)
        if problem:
            self.log.warning("full-load clocks not saved", reason=problem)
        else:
            self.saved_full_load = dict(self.full_load)

    def _mark_fault(self, uuid: str) -> None:
        """Every tenant with processes on the GPU lost them to a neighbour's fault."""
        for cid, tenant in self.tenants.items():
            on_gpu = any(
                gpu_key(tenant.spec.device[i], cid, i, self.minors) == uuid
                for i in range(tenant.device_count)
            )
            if on_gpu and tenant.spec.device[0].backend == abi.Backend.MPS:
                tenant.mps_faults += 1
                self.log.error("tenant hit by an MPS fault on its GPU", container_id=cid, gpu=uuid)

    def reap(self) -> None:
        """Remove slots of containers that are gone; report dead per-process records."""
        init_pids: dict[str, int] = {}
        for cid, tenant in list(self.tenants.items()):
            alive = container_alive(
                int(tenant.spec.init_host_pid), int(tenant.spec.init_start_time)
            )
            if alive is False:
                self._drop(cid, "container gone, slot reaped")
                slot.remove_slot(self.run_dir, cid)
            elif alive:
                init_pids[cid] = int(tenant.spec.init_host_pid)
        self.members = namespace_members(init_pids) if init_pids else {}
        live_ns: dict[str, set[int]] = {}
        for cid, ns_pid in self.members.values():
            live_ns.setdefault(cid, set()).add(ns_pid)
        for cid, tenant in self.tenants.items():
            self._report_dead(tenant, live_ns.get(cid) if cid in init_pids else None)

    def _report_dead(self, tenant: Tenant, live: set[int] | None) -> None:
        try:
            records = tenant.usage.live_processes()
        except SlotError:
            return
        if live is None:  # no namespace to look in: cannot tell
            tenant.dead_processes, tenant.dead_bytes = [], 0
            return
        dead = [r for r in records if r.pid not in live]
        pids = [r.pid for r in dead]
        if pids != tenant.dead_processes:
            if pids:
                tenant.log.warning(
                    "dead processes still charged; the shim releases them on its next allocation",
                    pids=pids,
                )
            self.dirty_status = True
        tenant.dead_processes = pids
        tenant.dead_bytes = sum(sum(r.mem_used_bytes) for r in dead)

    def check_nvml(self) -> None:
        """NVML's view: memory per tenant, processes without the shim, quotas."""
        views = []
        for cid, tenant in self.tenants.items():
            gpus = {}
            for i in range(tenant.device_count):
                dev = tenant.spec.device[i]
                uuid = gpu_key(dev, cid, i, self.minors)
                quota = int(dev.mem_limit_bytes) or (
                    self.memory_total.get(uuid, 0)
                    * int(dev.mem_limit_basis_points)
                    // abi.WHOLE_GPU_CENTI
                )
                gpus[uuid] = quota
            try:
                shimmed = frozenset(r.pid for r in tenant.usage.live_processes())
            except SlotError:
                shimmed = frozenset()
            on_mps = frozenset(
                gpu_key(tenant.spec.device[i], cid, i, self.minors)
                for i in range(tenant.device_count)
                if tenant.spec.device[i].backend == abi.Backend.MPS
            )
            views.append(nvml.TenantView(cid, gpus, shimmed, on_mps))
        served = frozenset(u for u, d in self.mps.items() if d.state.backend == "mps")
        processes = {
            uuid: [p for p in procs if not mpsd.is_mps_process(p.host_pid)]
            for uuid, procs in self.nv.processes(self.gpus, served).items()
        }
        self.apply_cross_check(nvml.cross_check(views, processes, self.members.get))

    def apply_cross_check(self, result: nvml.CrossCheck) -> None:
        self.nvml_memory = result.memory
        self.foreign = result.foreign
        for cid, tenant in self.tenants.items():
            pids = sorted(result.unshimmed.get(cid, []))
            if pids != tenant.unshimmed and pids:
                tenant.log.warning("processes on the GPU without the shim", host_pids=pids)
            tenant.unshimmed = pids
            outside = sorted(result.outside_mps.get(cid, []))
            if outside != tenant.outside_mps and outside:
                tenant.log.warning(
                    "processes of an MPS tenant run outside MPS (time-sliced, no SM limit)",
                    host_pids=outside,
                )
            tenant.outside_mps = outside
        now_over = set()
        for over in result.over_quota:
            key = (over.container_id, over.gpu)
            now_over.add(key)
            log = self.log.bind(container_id=over.container_id)
            if self.cfg.observer.over_quota_action == config.OVER_QUOTA_KILL:
                for pid in over.culprits:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                log.error(
                    "over memory quota: processes killed",
                    gpu=over.gpu,
                    used=over.used_bytes,
                    quota=over.quota_bytes,
                    host_pids=list(over.culprits),
                )
            elif key not in self.over_quota:
                log.warning(
                    "over memory quota", gpu=over.gpu, used=over.used_bytes, quota=over.quota_bytes
                )
        self.over_quota = now_over

    # -- reporting --

    def status_text(self) -> str:
        gpus = {
            gpu_key(t.spec.device[i], cid, i, self.minors)
            for cid, t in self.tenants.items()
            for i in range(t.device_count)
        }
        worst = max(self.contention.values(), default=0) / 100
        text = (
            f"{len(self.tenants)} tenant{'s' if len(self.tenants) != 1 else ''} on "
            f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''}, contention {worst:.2f}"
        )
        if self.mps:
            text += "; mps: " + ", ".join(
                f"{uuid[:12]} {d.state.backend if d.state.backend == 'mps' else 'FAILED'}"
                for uuid, d in sorted(self.mps.items())
            )
        return text

    def snapshot(self) -> dict[str, object]:
        tenants: dict[str, object] = {}
        for cid, t in self.tenants.items():
            tenants[cid] = {
                "active": [d.active for d in t.devices],
                "unmet_centi": [d.unmet for d in t.devices],
                "throttled_pct": [d.throttled_pct for d in t.devices],
                "dead_processes": t.dead_processes,
                "dead_bytes": t.dead_bytes,
                "unshimmed_host_pids": t.unshimmed,
                "problem": t.problem,
                "backend": [
                    mps.backend_name(int(t.spec.device[i].backend)) for i in range(t.device_count)
                ],
                "mps_faults": t.mps_faults,
                "outside_mps_host_pids": t.outside_mps,
            }
        return {
            "pid": os.getpid(),
            "updated_ns": slotio.monotonic_ns(),
            "interval_ms": self.interval / NS_PER_MS,
            "nvml": "ok" if self.nv.available else self.nv.reason,
            "gpus": {
                gpu: {
                    "contention_pct": self.contention.get(gpu, 0),
                    "tightness_pct": state.tightness_pct,
                }
                for gpu, state in self.gpu_states.items()
            },
            "backends": {uuid: asdict(d.state) for uuid, d in self.mps.items()},
            "clocks": {uuid: clock.status() for uuid, clock in self.clocks.items()},
            "foreign_host_pids": self.foreign,
            "tenants": tenants,
            "ticks": self.ticks,
            "tick_seconds_total": self.tick_ns_total / 1e9,
        }

    def publish(self) -> None:
        """State file for fcspctl, metrics snapshot, and the systemd STATUS line."""
        doc = self.snapshot()
        path = self.run_dir / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.tmp")
        try:
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, path)
        except OSError as exc:
            self.log.warning("cannot write state file", path=str(path), error=exc.strerror)
        self.exporter.publish(self._metrics_snapshot())
        text = self.status_text()
        if text != self.status_line:
            self.status_line = text
            self.notifier.status(text)

    def _metrics_snapshot(self) -> metrics.Snapshot:
        samples = []
        for cid, t in self.tenants.items():
            for i, track in enumerate(t.devices):
                dev = t.spec.device[i]
                uuid = gpu_key(dev, cid, i, self.minors)
                samples.append(
                    metrics.TenantGpuSample(
                        container_id=cid,
                        tenant=t.spec.tenant.decode(errors="replace"),
                        gpu=uuid,
                        mode=_mode(t.spec.isolation_mode).name.lower(),
                        requested_centi=int(dev.sm_requested_centi),
                        effective_centi=t.limits.effective(i),
                        mem_used_bytes=track.usage.mem_used_bytes,
                        mem_quota_bytes=int(dev.mem_limit_bytes)
                        or self.memory_total.get(uuid, 0)
                        * int(dev.mem_limit_basis_points)
                        // abi.WHOLE_GPU_CENTI,
                        throttled_ns=track.usage.throttled_ns,
                        busy_ns=track.usage.busy_ns,
                        active=track.active,
                        unshimmed_processes=len(t.unshimmed),
                        mps_faults=t.mps_faults,
                        turn_ratio=turn_ratio(t.limits.turn(i)),
                    )
                )
        return metrics.Snapshot(
            tuple(samples),
            dict(self.contention),
            self.ticks,
            self.tick_ns_total / 1e9,
            {
                uuid: (d.state.backend == "mps", d.state.restarts, d.state.faults)
                for uuid, d in self.mps.items()
            },
        )

    # -- lifecycle --

    def reload(self) -> None:
        """SIGHUP: a new config.toml, or the old one kept if the new one is bad."""
        self.notifier.reloading(slotio.monotonic_ns() // NS_PER_US)
        try:
            new = config.load(self.config_path)
            new_interval = interval_ns(new, self.env)
        except ConfigError as exc:
            self.log.error("config reload rejected; keeping the running config", error=str(exc))
            self.notifier.send(READY="1", STATUS=f"config reload rejected: {exc}")
            return
        if new.paths.run_dir != self.cfg.paths.run_dir:
            self.log.warning("paths.run_dir changes need a restart; keeping the old one")
            new = replace(new, paths=self.cfg.paths)
        if new.observer.metrics_port != self.cfg.observer.metrics_port:
            self.log.warning("metrics_port changes need a restart")
        self.cfg, self.interval = new, new_interval
        self.decisions.clear()  # cached answers were for the old pools and thresholds
        self.log.info("config reloaded", path=str(self.config_path))
        self.notifier.send(READY="1", STATUS=self.status_text())

    def release(self) -> None:
        """Clean exit: tenants go back to their requests, heartbeat 0 ("no observer"); what
        was learned of full-load clocks is kept."""
        self.next_clock_save_ns = 0
        self._save_full_load()
        for tenant in self.tenants.values():
            for i in range(tenant.device_count):
                tenant.limits.set_effective(i, int(tenant.spec.device[i].sm_requested_centi))
                tenant.limits.set_clock_scale(i, 0)
                tenant.limits.set_turn(i, 0)
            tenant.limits.set_heartbeat(0)
        for name in list(self.tenants):
            self.tenants.pop(name).close()
        self.nv.close()
        self.exporter.close()
        with contextlib.suppress(OSError):
            (self.run_dir / STATE_FILE).unlink()

    def watchdog(self, now_ns: int) -> None:
        if self.notifier.watchdog_ns and now_ns >= self.next_watchdog_ns:
            self.next_watchdog_ns = now_ns + self.notifier.watchdog_ns // 2
            self.notifier.watchdog()

    def run(self) -> int:
        """The loop: ticks on time, signals through a self-pipe (SIGHUP, SIGTERM, SIGINT)."""
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous_fd = signal.set_wakeup_fd(write_fd)
        handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
        previous = {s: signal.signal(s, lambda *_: None) for s in handled}
        selector = selectors.DefaultSelector()
        selector.register(read_fd, selectors.EVENT_READ)
        try:
            slot.ensure_tenants_dir(self.run_dir)
            self.exporter.serve(self.cfg.observer.metrics_port)
            now = slotio.monotonic_ns()
            self.tick(now)
            self.notifier.ready(self.status_text())
            self.log.info("observer ready", interval_ms=self.interval / NS_PER_MS)
            return self._loop(selector, read_fd, now + self.interval)
        finally:
            selector.close()
            signal.set_wakeup_fd(previous_fd)
            for s, handler in previous.items():
                signal.signal(s, handler)
            os.close(read_fd)
            os.close(write_fd)
            self.release()

    def _loop(self, selector: selectors.BaseSelector, read_fd: int, next_tick: int) -> int:
        while True:
            now = slotio.monotonic_ns()
            for _ in selector.select(max(next_tick - now, 0) / 1e9):
                for signum in _drain(read_fd):
                    if signum == signal.SIGHUP:
                        self.reload()
                    elif signum in (signal.SIGTERM, signal.SIGINT):
                        self.notifier.stopping()
                        self.log.info("stopping", signal=signal.Signals(signum).name)
                        return 0
            now = slotio.monotonic_ns()
            if now >= next_tick:
                self.tick(now)
                # Late (suspended, overloaded): skip the missed ticks rather than burst.
                next_tick = max(next_tick + self.interval, now + self.interval // 2)
            self.watchdog(now)


def _drain(fd: int) -> Iterable[int]:
    try:
        return os.read(fd, 512)
    except BlockingIOError:
        return b""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcsp-observer", description="Share every GPU among its FCSP tenants."
    )
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH, help="config.toml")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = configure_logging()
    try:
        cfg = config.load(args.config)
        observer = Observer(cfg, args.config, log, notify.Notifier())
        return observer.run()
    except FcspError as exc:
        print(f"fcsp-observer: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
