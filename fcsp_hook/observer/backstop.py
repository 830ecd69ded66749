"""Duty: hold tenants to their shares from the host, by what the driver says they used.

The shim holds a tenant that cooperates to its share on the fast path.  One that forges
its usage file, runs processes without the shim, or launches kernels the shim cannot see
escapes it; only what the tenant cannot write can hold it.  So this duty measures each
tenant's GPU time from NVML's per-process utilisation of the processes in its container's
cgroup (state.members), and a tenant whose time stays more than
[observer] backstop_margin_pct points above its share in force, averaged over
backstop_window_s, is frozen (its cgroup) for the first part of every period until it is
back at its share: while its readings over the window average at least a quarter of its
share, frozen for all but the time it takes to use its share of what the others leave it,
so that readings that count less than it ran (a duty-cycled tenant's do) cannot let it run
longer.  A tenant held by its shim is at or below its share and is never held for long.

The driver counts the time a tenant's kernels wait for a neighbour's time slice as the
tenant's own (bench/results/authority.md: a shimmed tenant at 10 % read 25-61 % next to one
that bypassed its shim, one at 40 % read 79 %).  So on a GPU where nobody is held, one
tenant is suspected (suspect_per_gpu: one with processes that run without the shim,
else the one furthest above its share by the latest reading) and judged on its window's
readings as they are; every other one is first allowed the time the driver counted for its
neighbours there over the window: what it may have waited on.  The suspect is held first,
on suspicion.  Once a tenant is held, its neighbours are judged on quiet readings: NVML
samples taken wholly inside the part of a period in which every held tenant of that GPU is
frozen, when nobody held is left to wait on (QUIET_AFTER_US).  A period lasts long enough
for every hold to give them (hold_period_ns), up to half the window; where a hold still
leaves too little frozen time, its neighbours are judged on the allowance as before.  A
tenant found above its share on quiet readings is held on proof, and those held on
suspicion there are let go: its time may be all they read above their shares; the quiet
readings of them, once it is frozen, hold again those that are not.  The held tenants
themselves are charged the whole GPU's samples less what the quiet ones give everyone else,
or what their own samples say they ran if more: the driver keeps no per-process sample for
a process frozen when the sample ends, so a held tenant's own read next to nothing (none at
all for one frozen 0.9 of each second, on an H100), but running, it can take more from a
neighbour than the neighbour leaves while it is frozen.  A tenant is judged on two readings
at least, never on the first alone (a process's first reading can come before its
neighbours' do).

On a GPU whose MPS daemon is up, an MPS tenant is read by its processes that NVML lists
outside MPS (observer.crosscheck): a process that skips both the shim and MPS runs a context
of its own, time-sliced beside the MPS server and outside every thread percentage.  The
driver's per-process utilisation does not tell MPS clients apart, and the daemon caps their
SMs, so they count for nobody.  There the MPS server's clients keep the whole GPU busy,
frozen or not, so a held tenant is read by its own samples alone, its periods long enough
to run RUNNING_SEEN_NS (the driver keeps samples of it only while it runs), and it is
frozen for all but what it takes to run its share while one of them says it is busy: the
driver counts its waiting for the server's time slices as its own, all of the time it runs,
so it is charged the part of that time the server leaves it (half, while the server is busy
all the time it is frozen).

Freezing stops a tenant's processes, not the kernels already on the GPU: kernels that run
for longer than a period are held only as far as the next launches wait.  A cgroup that
something else froze (an engine's pause) is left alone, and every cgroup this duty froze
is thawed when the observer stops; <run_dir>/frozen names them, so that an observer that
died with some frozen thaws them when it starts again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from fcsp_hook import cgroups
from fcsp_hook.cgroups import Cgroup, CgroupError
from fcsp_hook.nvml import SAMPLE_US, GpuInfo
from fcsp_hook.observer.state import NS_PER_MS, Duty, HostState, Tenant
from fcsp_hook.slot import abi

PERIOD_NS = 1_000_000_000  # a period at least; frozen for the first duty of each
# A frozen tenant's queued kernels are done within 50 ms (a stream holds a few ms of work).
# The newest sample when the held tenants freeze ends at most one sample before that, so a
# sample that ends QUIET_AFTER_US after it on the driver's clock lies wholly in the frozen
# time, past the drain.
QUIET_AFTER_US = 2 * SAMPLE_US + 50_000
# Frozen from the first tick of a period (a tick late at most) to its thaw, a GPU's held
# tenants give a quiet reading at the last tick before it if the driver's sample then (up
# to one old) ends QUIET_AFTER_US after their freeze: with 50 ms ticks, frozen 750 ms.
QUIET_FROZEN_NS = 750_000_000
# A period is made long enough for the least held tenant to be frozen 100 ms longer than
# that: near the edge a reading is missed now and then, and a duty shrinks within a period.
PERIOD_FROZEN_NS = QUIET_FROZEN_NS + 100_000_000
HELD_READ_NS = SAMPLE_US * 1000 // 2  # while a tenant is held: every sample is seen
# Running this long, a held tenant ends a driver's sample while it runs (one every 200 ms).
RUNNING_SEEN_NS = SAMPLE_US * 1000 + 50_000_000
MAX_DUTY = 0.95  # a tenant always runs a little: its processes must be able to exit
AT_SHARE = 0.75  # a limited tenant read at this much of its share or more is at it
FROZEN_FILE = "frozen"


@dataclass
class Hold:
    """One tenant under the backstop."""

    readings: int = 0  # taken since it was first seen
    duty: float = 0.0  # fraction of each period it is frozen
    frozen: Cgroup | None = None  # the cgroup it froze, while frozen: thawed if its slot goes
    proven: bool = False  # held on quiet readings: what it ran while the held were frozen
    changed_ns: int = 0  # when its duty last changed: moved again a period later at least


@dataclass
class Quiet:
    """A GPU while every tenant held on it is frozen."""

    from_us: int | None  # NVML's clock: samples after this are of the others alone
    taken: bool = False  # its quiet reading, one per period


@dataclass(frozen=True)
class QuietReading:
    """One GPU while every tenant held on it was frozen."""

    at_ns: int
    gpu: str
    held: frozenset[str]  # the tenants held on it then: it says nothing of other holds
    used: dict[str, int]  # percent of the GPU's time each tenant not held ran there
    busy_pct: float | None  # the whole GPU's; None: the driver gave no such sample


@dataclass(frozen=True)
class Reading:
    """One tenant on one time-sliced GPU: the driver's percent, and its share there."""

    cid: str
    gpu: str
    used_pct: float
    share_pct: float
    judged: bool  # limited, so held by time (an unlimited tenant is only a neighbour)


def suspect_per_gpu(
    readings: list[Reading], unshimmed: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Per GPU, the judged tenant to suspect first: one with processes that run without the
    shim (unshimmed) and on the GPU in these readings, else the furthest above its share.
    Whatever they read: beside a busy neighbour the driver's per-process readings can give
    the one that runs without the shim less than its share and the other the rest (on an
    H100, 14 % and 81 % for tenants at 40 % that ran 54 % and 42 % of their solo
    throughput).  Which processes run with the shim the tenant's records say and the host
    checks (observer.crosscheck.ShimMaps): one that maps the shim and bypasses it only has
    its neighbour suspected first, whom the quiet readings then clear."""

    def suspicion(r: Reading) -> tuple[bool, float]:
        return r.cid in unshimmed and r.used_pct > 0, r.used_pct - r.share_pct

    furthest: dict[str, Reading] = {}
    for r in readings:
        best = furthest.get(r.gpu)
        if r.judged and (best is None or suspicion(r) > suspicion(best)):
            furthest[r.gpu] = r
    return {gpu: r.cid for gpu, r in furthest.items()}


def points_above_share(
    readings: list[Reading], held: set[str], suspects: dict[str, str] | None = None
) -> dict[str, float]:
    """The points above its share each judged tenant is held to account for, its worst
    GPU's: on a GPU where no tenant is `held`, its suspect's as read; every other one's
    less the time the driver counted for its neighbours there.  suspects: per GPU, whom to
    suspect (default: suspect_per_gpu of these readings)."""
    if suspects is None:
        suspects = suspect_per_gpu(readings)
    by_gpu: dict[str, list[Reading]] = {}
    for r in readings:
        by_gpu.setdefault(r.gpu, []).append(r)
    points: dict[str, float] = {}
    for gpu, on_gpu in by_gpu.items():
        as_read = None if any(r.cid in held for r in on_gpu) else suspects.get(gpu)
        everyone = sum(r.used_pct for r in on_gpu)
        for r in on_gpu:
            if not r.judged:
                continue
            waited = 0.0 if r.cid == as_read else everyone - r.used_pct
            p = r.used_pct - r.share_pct - waited
            points[r.cid] = max(points.get(r.cid, p), p)
    return points


def hold_period_ns(duties: list[float], window_ns: int, on_mps: Sequence[float] = ()) -> int:
    """How long a period lasts while tenants are held these fractions of it: PERIOD_NS, or
    long enough for the least of them to be frozen PERIOD_FROZEN_NS, so that every hold
    gives quiet readings, and for those held on a GPU an MPS server keeps busy (on_mps) to
    run RUNNING_SEEN_NS, so that the driver gives samples of them (the only readings of
    them there); at most half the window, which is to hold two of them."""
    if not duties:
        return PERIOD_NS
    longest = max(PERIOD_NS, window_ns // 2)
    period = max(PERIOD_NS, math.ceil(PERIOD_FROZEN_NS / min(duties)))
    if on_mps:
        period = max(period, math.ceil(RUNNING_SEEN_NS / (1.0 - max(on_mps))))
    return min(period, longest)


def frozen_ns(duty: float, period_ns: int) -> int:
    """How long a tenant held duty of a period is frozen at its start."""
    return round(duty * period_ns)


def next_duty(duty: float, used_pct: float, share_pct: float) -> float:
    """The fraction of time to freeze a tenant that used used_pct of the GPU while frozen
    duty of the time, so that it uses share_pct: its demand unfrozen is used / (1 - duty).
    Once held, at most halving or doubling the time it runs per reading (readings are
    coarse); never past MAX_DUTY; 0 once running all the time keeps it at its share."""
    running = 1.0 - duty
    wanted = running * share_pct / max(used_pct, 0.1)
    if duty > 0.0:
        wanted = min(max(wanted, running / 2), running * 2)
    return 1.0 - min(max(wanted, 1.0 - MAX_DUTY), 1.0)


class Backstop(Duty):
    name = "backstop"

    def __init__(self) -> None:
        self.holds: dict[str, Hold] = {}
        # the window's readings: when, the time each stands for, percent per (tenant, GPU)
        self.history: deque[tuple[int, int, dict[tuple[str, str], int]]] = deque()
        self.quiet: dict[str, Quiet] = {}  # per GPU with every held tenant frozen now
        # per GPU: who is held there, and when one was last let go
        self.held_on: dict[str, tuple[frozenset[str], int]] = {}
        self.quiet_history: deque[QuietReading] = deque()  # the window's
        self.busy_since_us: dict[str, int] = {}  # per GPU with a hold: its newest busy sample
        # the last two windows' samples of held tenants' own: when read, tenant, GPU,
        # percent; the driver keeps none of a process frozen when a sample ends, so they are
        # of it running
        self.running: deque[tuple[int, str, str, int]] = deque()
        self.since_us: dict[str, int] = {}  # per GPU: NVML's sample clock, for the next read
        self.seen_us: dict[int, int] = {}  # per process: its newest sample read
        self.read_ns = 0  # when NVML was last read
        self.hold_period_start_ns = 0
        self.hold_period_ns = PERIOD_NS  # the one in force: set as it starts
        self.judged_ns = 0  # when the tenants were last judged

    def due(self, state: HostState, now_ns: int, next_ns: int) -> bool:
        return (state.cfg.observer.backstop_margin_pct > 0 and state.nv.available) or any(
            h.frozen is not None for h in self.holds.values()
        )

    def start(self, state: HostState) -> None:
        """Thaw what an observer before this one froze and could not thaw."""
        path = state.run_dir / FROZEN_FILE
        try:
            records = json.loads(path.read_text()[: 1 << 20])
        except (OSError, ValueError):
            return
        for text in records if isinstance(records, list) else ():
            with contextlib.suppress(CgroupError, TypeError):
                cgroups.Cgroup.from_text(str(text)).set_frozen(False)
        with contextlib.suppress(OSError):
            path.unlink()

    def run(self, state: HostState, now_ns: int) -> None:
        obs = state.cfg.observer
        if obs.backstop_margin_pct <= 0 or not state.nv.available:
            self.release(state)
            return
        judge_ns = obs.nvml_interval_ms * NS_PER_MS
        # Held, a tenant runs in bursts: NVML is read twice a sample, every sample seen, lest
        # one reading a second always fall in (or out of) them.  A sample stands for the
        # time since the last read, and never for less than its own span.
        read_ns = HELD_READ_NS if self.held_by_gpu(state) else judge_ns
        if now_ns >= self.read_ns + read_ns:
            span_ns = max(min(now_ns - self.read_ns, judge_ns), SAMPLE_US * 1000)
            self.read_ns = now_ns
            self.record(state, now_ns, self.measure(state, now_ns), span_ns)
        if now_ns >= self.judged_ns + judge_ns:
            self.judge(state, now_ns)
        self.actuate(state, now_ns)
        self.read_quiet(state, now_ns)

    def stop(self, state: HostState) -> None:
        self.release(state)

    def measure(self, state: HostState, now_ns: int) -> dict[tuple[str, str], int]:
        """Percent of each GPU's time each tenant's processes ran there in the samples since
        the last read, per (tenant, GPU); those of held tenants kept apart (running)."""
        used: dict[tuple[str, str], int] = {}
        held = self.held_by_gpu(state)
        for gpu in state.gpus:
            # Each process's samples end at times of its own: asked from one sample before
            # the newest seen, and each process's taken once.
            last_us = self.since_us.get(gpu.uuid, 0)
            samples, newest_us = state.nv.utilisation(
                gpu, max(last_us - SAMPLE_US, 1) if last_us else 0
            )
            self.since_us[gpu.uuid] = max(newest_us, last_us)  # none: still from the last
            by_pid: dict[int, int] = {}
            for pid, sample in samples.items():
                if sample.at_us > self.seen_us.get(pid, 0):
                    by_pid[pid] = sample.pct
                    self.seen_us[pid] = sample.at_us
            for cid, pct in _by_tenant(state, gpu.uuid, by_pid).items():
                used[(cid, gpu.uuid)] = pct
                if cid in held.get(gpu.uuid, {}):
                    self.running.append((now_ns, cid, gpu.uuid, pct))
            self.charge_held(state, gpu, held.get(gpu.uuid, {}), used)
        return used

    def charge_held(
        self,
        state: HostState,
        gpu: GpuInfo,
        held: dict[str, Hold],
        used: dict[tuple[str, str], int],
    ) -> None:
        """A GPU's held tenants, by the whole GPU's samples since the last read less what
        its quiet ones say the others use (others_use: a neighbour its shim holds at its
        share takes that share while they run, though the driver reads it a little under),
        split by the time each runs: the driver keeps no per-process sample for a process
        frozen when the sample ends, and a held tenant mostly is (on an H100, none at all
        for one frozen 0.9 of each second).  Not beside an MPS server, whose clients keep
        the whole GPU busy: there its own samples stand."""
        others = self.others_use(state, gpu.uuid, set(held)) if held else None
        if others is None or _mps_served(state, gpu.uuid):
            self.busy_since_us.pop(gpu.uuid, None)
            return
        since_us = self.busy_since_us.get(gpu.uuid)
        samples = state.nv.busy(gpu, since_us or 0)
        if samples:
            self.busy_since_us[gpu.uuid] = samples[-1].at_us
        if since_us is None:
            return  # the driver's whole buffer: from the next read on
        excess = max(statistics.mean(b.pct for b in samples) - others, 0.0) if samples else 0.0
        running = sum(1.0 - hold.duty for hold in held.values())
        for cid, hold in held.items():
            used[(cid, gpu.uuid)] = round(excess * (1.0 - hold.duty) / running)

    def read_quiet(self, state: HostState, now_ns: int) -> None:
        """Per GPU whose held tenants are all frozen now: when they freeze, NVML's clock;
        at the last tick before the first of them thaws, a reading of the samples since
        then (record_quiet), unless a tenant held there was let go less than a period
        before: it runs what its shim let build up while it was frozen."""
        held = self.held_by_gpu(state)
        for gpu in state.gpus:
            who = frozenset(held.get(gpu.uuid, {}))
            was, let_go_ns = self.held_on.get(gpu.uuid, (frozenset(), 0))
            self.held_on[gpu.uuid] = (who, now_ns if was - who else let_go_ns)
            on_gpu = list(held.get(gpu.uuid, {}).values())
            if not on_gpu or not all(h.frozen is not None for h in on_gpu):
                self.quiet.pop(gpu.uuid, None)
                continue
            quiet = self.quiet.get(gpu.uuid)
            if quiet is None:
                _, newest = state.nv.utilisation(gpu)
                self.quiet[gpu.uuid] = Quiet(newest + QUIET_AFTER_US if newest else None)
                continue
            thaw_ns = frozen_ns(min(h.duty for h in on_gpu), self.hold_period_ns)
            if (
                quiet.taken
                or quiet.from_us is None
                or now_ns - self.hold_period_start_ns + state.interval_ns < thaw_ns
            ):
                continue
            quiet.taken = True
            if now_ns - self.held_on[gpu.uuid][1] < self.hold_period_ns:
                continue
            samples, newest = state.nv.utilisation(gpu, quiet.from_us)
            if newest > quiet.from_us:  # none yet: this period gives no quiet reading
                by_pid = {pid: sample.pct for pid, sample in samples.items()}
                busy = state.nv.busy(gpu, quiet.from_us)
                self.record_quiet(
                    QuietReading(
                        now_ns,
                        gpu.uuid,
                        frozenset(held[gpu.uuid]),
                        _by_tenant(state, gpu.uuid, by_pid),
                        statistics.mean(b.pct for b in busy) if busy else None,
                    )
                )

    def record_quiet(self, reading: QuietReading) -> None:
        self.quiet_history.append(reading)

    def quiet_readings(self, gpu: str, held: set[str]) -> list[QuietReading]:
        """The window's quiet readings of a GPU taken while these tenants were held there."""
        return [q for q in self.quiet_history if q.gpu == gpu and q.held == held]

    def baseline(self, gpu: str, held: set[str]) -> float | None:
        """The whole GPU's use in its quiet readings with these held: everyone else's."""
        busy = [q.busy_pct for q in self.quiet_readings(gpu, held) if q.busy_pct is not None]
        return statistics.mean(busy) if busy else None

    def others_use(self, state: HostState, gpu: str, held: set[str]) -> float | None:
        """What the tenants not held on a GPU use there, by its quiet readings with these
        held: the whole GPU's, or their own summed if more, where a limited tenant read at
        AT_SHARE of its share or more counts at its share.  Its shim holds it there, and the
        driver reads it a little under what it takes (on an H100, quiet readings of 35 % for
        one at 40 % that ran 42 % of its solo throughput: bench/results/authority.md).
        None: no quiet reading yet."""
        baseline = self.baseline(gpu, held)
        if baseline is None:
            return None
        quiet = self.quiet_readings(gpu, held)
        theirs = 0.0
        for r in _readings(state, {}):
            if r.gpu == gpu and r.cid not in held:
                read = statistics.mean(q.used.get(r.cid, 0) for q in quiet)
                at_share = r.judged and AT_SHARE * r.share_pct <= read < r.share_pct
                theirs += r.share_pct if at_share else read
        return min(max(baseline, theirs), 100.0)

    def beside_mps_server(self, state: HostState, gpu: str, held: set[str]) -> float:
        """The part of a GPU's time a held tenant gets of the time it runs beside the MPS
        server there: the GPU time-slices the server's context and its own, so a server
        busy all the time its tenants are frozen (their quiet readings) takes half of it
        (an H100: a 30 % MPS client ran 38.2 % of its solo throughput alone, 35.3-36.4 %
        beside one that ran a tenth of the time; bench/results/authority.md).  All of it
        until there is a quiet reading."""
        busy = self.baseline(gpu, held)
        return 1.0 - min(busy or 0.0, 50.0) / 100

    def held_by_gpu(self, state: HostState) -> dict[str, dict[str, Hold]]:
        """The holds in force, per GPU of their tenants."""
        held: dict[str, dict[str, Hold]] = {}
        for cid, hold in self.holds.items():
            tenant = state.tenants.get(cid)
            for device in tenant.devices if tenant is not None and hold.duty > 0 else ():
                held.setdefault(device.grant.gpu, {})[cid] = hold
        return held

    def record(
        self, state: HostState, now_ns: int, used: dict[tuple[str, str], int], step_ns: int
    ) -> None:
        """A reading, standing for the step_ns before now_ns; the window's kept."""
        window_ns = _window_ns(state)
        self.history.append((now_ns, step_ns, used))
        while self.history[0][0] <= now_ns - window_ns:
            self.history.popleft()
        while self.running and self.running[0][0] <= now_ns - 2 * window_ns:
            self.running.popleft()

    def judge(self, state: HostState, now_ns: int) -> None:
        """Every held-able tenant: its worst device's points above its share over the window
        (window_use), to be held; once held, its duty, by its readings over a period."""
        gone = set(self.holds) - set(state.tenants)
        for cid in gone:
            self.thaw(cid)
            del self.holds[cid]
        if gone:
            self.save(state)
        self.seen_us = {pid: at for pid, at in self.seen_us.items() if pid in state.members}
        recent = [h for h in self.history if h[0] > self.judged_ns]
        if not recent:
            return
        since_judged_ns = now_ns - self.judged_ns if self.judged_ns else recent[0][1]
        self.judged_ns = now_ns
        used = _mean(recent, since_judged_ns)
        latest = _readings(state, used)
        window_ns = _window_ns(state)
        window = _mean(list(self.history), window_ns)
        held = {c for c, h in self.holds.items() if h.duty > 0}
        use, waiting, quiet = self.window_use(state, now_ns)
        judged = [r for r in _readings(state, use) if r.gpu not in waiting or r.cid in held]
        unshimmed = frozenset(cid for cid, t in state.tenants.items() if t.unshimmed)
        points = points_above_share(judged, held, suspect_per_gpu(latest, unshimmed))
        proof = points_above_share([r for r in judged if r.gpu in quiet], held)
        margin = state.cfg.observer.backstop_margin_pct
        for cid, tenant in state.tenants.items():
            for device in tenant.devices:
                pct = used.get((cid, device.grant.gpu))
                device.driver_used_pct = round(pct) if pct is not None else None
            mine = [r for r in latest if r.cid == cid and r.judged]
            if not mine or tenant.cgroup is None:
                continue
            hold = self.holds.setdefault(cid, Hold())
            hold.readings += 1
            if hold.duty == 0.0:
                if points.get(cid, 0.0) > margin and hold.readings > 1:
                    worst = max(mine, key=lambda r: r.used_pct - r.share_pct)
                    self.start_hold(state, cid, worst, proof.get(cid, 0.0) > margin, now_ns)
            elif now_ns - hold.changed_ns >= self.hold_period_ns:
                worst = self.worst_over_period(state, cid, hold.duty, now_ns)
                if worst.gpu in waiting and now_ns - hold.changed_ns < window_ns:
                    continue  # its own samples count next to nothing while it is frozen
                ran = window.get((cid, worst.gpu), 0.0)
                if _mps_served(state, worst.gpu):
                    # Its readings there are its own samples, a few a window, most of them
                    # of it frozen for part of the sample: busy while one of the last two
                    # windows' says it ran its share.
                    own = self.own_samples(cid, worst.gpu, now_ns - 2 * window_ns)
                    ran = max(ran, max(own, default=0) * (1.0 - hold.duty))
                busy = ran >= worst.share_pct / 4
                self.adjust_hold(state, cid, worst, busy, now_ns)

    def worst_over_period(self, state: HostState, cid: str, duty: float, now_ns: int) -> Reading:
        """A held tenant's worst device over the last period, whose readings were all taken
        under the duty in force, each at least as it ran."""
        since_ns = now_ns - self.hold_period_ns
        over = [h for h in self.history if h[0] > since_ns]
        ran = [
            self.at_least_as_ran(r, since_ns, duty)
            for r in _readings(state, _mean(over, self.hold_period_ns))
            if r.cid == cid and r.judged
        ]
        held = self.held_by_gpu(state)
        ran = [
            replace(r, used_pct=r.used_pct * self.beside_mps_server(state, r.gpu, set(held[r.gpu])))
            if _mps_served(state, r.gpu) and r.gpu in held
            else r
            for r in ran
        ]
        return max(ran, key=lambda r: r.used_pct - r.share_pct)

    def at_least_as_ran(self, r: Reading, since_ns: int, duty: float) -> Reading:
        """A held tenant's reading, or more if its own samples since say so: the median of
        them (taken while it ran, the first and last in part) for the part of the time it
        runs.  Charged the whole GPU's samples less what the others use while it is frozen,
        it is not charged what it takes from them while it runs (on the simulated GPU, a
        fifth of a shimmed neighbour's 40 %)."""
        own = self.own_samples(r.cid, r.gpu, since_ns)
        if not own:
            return r
        return replace(r, used_pct=max(r.used_pct, statistics.median(own) * (1.0 - duty)))

    def own_samples(self, cid: str, gpu: str, since_ns: int) -> list[int]:
        """A held tenant's own samples on a GPU read since since_ns: of it running."""
        return [p for at, c, g, p in self.running if at > since_ns and (c, g) == (cid, gpu)]

    def window_use(
        self, state: HostState, now_ns: int
    ) -> tuple[dict[tuple[str, str], float], set[str], set[str]]:
        """Per (tenant, GPU), its readings over the window, NVML's being snapshots: averaged,
        time before a tenant's first one counting as 0.  On a GPU with a tenant held, the
        quiet readings instead (kept over the window or two periods, whichever is longer),
        once there are two (the GPUs judged so, the third set); and the GPUs whose holds
        freeze long enough for quiet readings but have not given two yet, on which only the
        held are judged (the second)."""
        window_ns = _window_ns(state)
        # two periods' readings at least, however long the periods
        kept_ns = max(window_ns, 2 * self.hold_period_ns + PERIOD_NS)
        while self.quiet_history and self.quiet_history[0].at_ns <= now_ns - kept_ns:
            self.quiet_history.popleft()
        use = _mean(list(self.history), window_ns)
        waiting: set[str] = set()
        quiet_gpus: set[str] = set()
        for gpu, holds in self.held_by_gpu(state).items():
            quiet = [q.used for q in self.quiet_readings(gpu, set(holds))]
            if len(quiet) < 2:
                least = min(h.duty for h in holds.values())
                if frozen_ns(least, self.hold_period_ns) >= QUIET_FROZEN_NS:
                    waiting.add(gpu)
                continue
            quiet_gpus.add(gpu)
            for key in [k for k in use if k[1] == gpu]:
                del use[key]
            for by_tenant in quiet:
                for cid, pct in by_tenant.items():
                    use[(cid, gpu)] = use.get((cid, gpu), 0.0) + pct / len(quiet)
        return use, waiting, quiet_gpus

    def start_hold(
        self, state: HostState, cid: str, worst: Reading, proven: bool, now_ns: int
    ) -> None:
        """Hold a tenant whose points above its share over the window passed the margin, by
        its worst device's latest reading.  proven: on quiet readings, what it ran while
        every tenant held on that GPU was frozen.  Tenants held there on readings that could
        not tell running from waiting on it are let go: its time may be all they read above
        their shares.  Quiet readings of them, once it is frozen, hold those that are not."""
        hold = self.holds[cid]
        hold.duty = next_duty(0.0, worst.used_pct, worst.share_pct)
        hold.proven, hold.changed_ns = proven, now_ns
        tenant = state.tenants[cid]
        tenant.held_pct, tenant.held_reading_pct = round(hold.duty * 100), round(worst.used_pct)
        tenant.log.warning(
            "tenant above its share by the driver's count: frozen part of the time",
            used_pct=round(worst.used_pct), share_pct=worst.share_pct,
            frozen_pct=tenant.held_pct, proven=proven,
        )  # fmt: skip
        if proven:
            for other, held in self.held_by_gpu(state).get(worst.gpu, {}).items():
                if not held.proven and other != cid:
                    self.thaw(other)
                    held.duty, held.changed_ns = 0.0, now_ns
                    state.tenants[other].held_pct = 0
                    state.tenants[other].log.info(
                        "no longer frozen: a neighbour ran above its share while it was"
                    )
        self.save(state)

    def adjust_hold(
        self, state: HostState, cid: str, worst: Reading, busy: bool, now_ns: int
    ) -> None:
        """Hold a tenant more or less by its worst device's readings over the last period.
        busy: its readings there over the window average a quarter of its share or more."""
        tenant, hold = state.tenants[cid], self.holds[cid]
        duty = next_duty(hold.duty, worst.used_pct, worst.share_pct)
        if busy:
            # Never let it run for longer than it takes to use its share of what the others
            # leave it (others_use), whatever the latest readings say: a duty-cycled
            # tenant's count less than it ran, and too few to judge by alone
            # (bench/results/authority.md).  Beside an MPS server, what the others use
            # cannot be told from what it does (the server's clients keep the whole GPU
            # busy, it frozen or not): it is left what the server's time slices leave it.
            held = set(self.held_by_gpu(state).get(worst.gpu, {}))
            if _mps_served(state, worst.gpu):
                free_pct = 100.0 * self.beside_mps_server(state, worst.gpu, held)
            else:
                free_pct = 100.0 - (self.others_use(state, worst.gpu, held) or 0.0)
            duty = max(duty, min(1.0 - worst.share_pct / max(free_pct, worst.share_pct), MAX_DUTY))
        if duty != hold.duty:
            hold.duty, hold.changed_ns = duty, now_ns
        if hold.duty == 0.0:
            tenant.log.info("tenant back at its share: no longer frozen")
            self.save(state)
        tenant.held_pct, tenant.held_reading_pct = round(hold.duty * 100), round(worst.used_pct)

    def actuate(self, state: HostState, now_ns: int) -> None:
        """Freeze or thaw each held tenant for its part of the period; a period's length is
        set when it starts (hold_period_ns)."""
        if now_ns >= self.hold_period_start_ns + self.hold_period_ns:
            duties = [h.duty for h in self.holds.values() if h.duty > 0]
            on_mps = [
                hold.duty
                for gpu, holds in self.held_by_gpu(state).items()
                if _mps_served(state, gpu)
                for hold in holds.values()
            ]
            self.hold_period_ns = hold_period_ns(duties, _window_ns(state), on_mps)
            self.hold_period_start_ns = now_ns
        phase = now_ns - self.hold_period_start_ns
        for cid, hold in self.holds.items():
            tenant = state.tenants.get(cid)
            if tenant is None or tenant.cgroup is None:
                continue
            want = phase < frozen_ns(hold.duty, self.hold_period_ns)
            if want == (hold.frozen is not None):
                continue
            if want and tenant.cgroup.frozen():
                continue  # frozen by someone else (a paused container): not ours to cycle
            try:
                tenant.cgroup.set_frozen(want)
                hold.frozen = tenant.cgroup if want else None
            except CgroupError as exc:
                tenant.log.error("cannot freeze the tenant's cgroup", error=str(exc))
                hold.duty = 0.0

    def thaw(self, cid: str) -> None:
        hold = self.holds.get(cid)
        if hold is None or hold.frozen is None:
            return
        with contextlib.suppress(CgroupError):
            hold.frozen.set_frozen(False)
        hold.frozen = None

    def release(self, state: HostState) -> None:
        for cid, hold in self.holds.items():
            self.thaw(cid)
            hold.duty = 0.0
            if cid in state.tenants:
                state.tenants[cid].held_pct = 0
        self.save(state)

    def save(self, state: HostState) -> None:
        """The cgroups of held tenants, for an observer that starts after this one died."""
        held: list[Cgroup] = [
            c
            for cid, h in self.holds.items()
            if h.duty > 0 and (c := _cgroup(state, cid)) is not None
        ]
        path = state.run_dir / FROZEN_FILE
        try:
            if not held:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                return
            tmp = path.with_name(f".{FROZEN_FILE}.tmp")
            tmp.write_text(json.dumps([c.to_text() for c in held]))
            os.replace(tmp, path)
        except OSError as exc:
            state.log.warning("cannot record frozen tenants", error=exc.strerror)


def _readings(state: HostState, use: Mapping[tuple[str, str], float]) -> list[Reading]:
    """Every tenant on each of its GPUs: what it used there, and its share."""
    return [
        Reading(
            cid,
            d.grant.gpu,
            use.get((cid, d.grant.gpu), 0.0),
            tenant.limits.effective(i) / 100,
            d.grant.mode != abi.IsolationMode.NONE,
        )
        for cid, tenant in state.tenants.items()
        for i, d in enumerate(tenant.devices)
    ]


def _mean(
    readings: list[tuple[int, int, dict[tuple[str, str], int]]], over_ns: int
) -> dict[tuple[str, str], float]:
    """Per (tenant, GPU), the readings weighted by the time each stands for, over over_ns."""
    mean: dict[tuple[str, str], float] = {}
    for _, step_ns, used in readings:
        for key, pct in used.items():
            mean[key] = mean.get(key, 0.0) + pct * step_ns / max(over_ns, 1)
    return mean


def _by_tenant(state: HostState, gpu: str, by_pid: dict[int, int]) -> dict[str, int]:
    """Percent of a GPU per tenant: its processes' (state.members) summed; of an MPS
    tenant's, only those NVML lists outside MPS (the crosscheck's): the driver's per-process
    utilisation does not tell MPS clients apart, and the daemon caps their SMs."""
    used: dict[str, int] = {}
    for pid, pct in by_pid.items():
        owner = state.members.get(pid)
        tenant = state.tenants.get(owner[0]) if owner is not None else None
        if tenant is None or (pid not in tenant.outside_mps and _on_mps(tenant, gpu)):
            continue
        used[tenant.container_id] = used.get(tenant.container_id, 0) + pct
    return used


def _mps_served(state: HostState, gpu: str) -> bool:
    """An MPS server may run on the GPU: its daemon is up."""
    served = state.backends.get(gpu)
    return served is not None and served.backend == "mps"


def _on_mps(tenant: Tenant, gpu: str) -> bool:
    return any(d.grant.gpu == gpu and d.grant.backend == abi.Backend.MPS for d in tenant.devices)


def _window_ns(state: HostState) -> int:
    return state.cfg.observer.backstop_window_s * 1_000_000_000


def _cgroup(state: HostState, cid: str) -> Cgroup | None:
    tenant = state.tenants.get(cid)
    return tenant.cgroup if tenant is not None else None
