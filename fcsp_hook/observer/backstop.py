"""Duty: hold tenants to their shares from the host, by what the driver says they used.

The shim holds a tenant that cooperates to its share on the fast path.  One that forges
its usage file, runs processes without the shim, or launches kernels the shim cannot see
escapes it; only what the tenant cannot write can hold it.  So this duty measures each
time-sliced tenant's GPU time from NVML's per-process utilisation of the processes in its
container's cgroup (state.members), and a tenant whose time stays more than
[observer] backstop_margin_pct points above its share in force, averaged over
backstop_window_s, is frozen (its cgroup) for part of every PERIOD_NS until it is back at
its share.  A tenant held by its shim is at or below its share and is never frozen.

The driver counts the time a tenant's kernels wait for a neighbour's time slice as the
tenant's own (bench/results/authority.md: a shimmed tenant at 10 % read 25-61 % next to one
that bypassed its shim).  So on a GPU where nobody is held, the tenant furthest above its
share by the latest reading is judged on its window's readings as they are; every other
one, and everyone on a GPU where a tenant is held, is first allowed the time the driver
counted for its neighbours there over the window: what it may have waited on.  The furthest
is held first; the rest are judged on what is left.  A tenant is judged on two readings at
least, never on the first alone (a process's first reading can come before its
neighbours' do).

Freezing stops a tenant's processes, not the kernels already on the GPU: kernels that run
for longer than a period are held only as far as the next launches wait.  A cgroup that
something else froze (an engine's pause) is left alone, and every cgroup this duty froze
is thawed when the observer stops; <run_dir>/frozen names them, so that an observer that
died with some frozen thaws them when it starts again.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from fcsp_hook import cgroups
from fcsp_hook.cgroups import Cgroup, CgroupError
from fcsp_hook.observer.state import NS_PER_MS, Duty, HostState
from fcsp_hook.slot import abi

PERIOD_NS = 500_000_000  # frozen for the first duty * PERIOD_NS of every period
MAX_DUTY = 0.95  # a tenant always runs a little: its processes must be able to exit
FROZEN_FILE = "frozen"


@dataclass
class Hold:
    """One tenant under the backstop."""

    readings: int = 0  # taken since it was first seen
    duty: float = 0.0  # fraction of each period it is frozen
    frozen: bool = False  # frozen by this duty now


@dataclass(frozen=True)
class Reading:
    """One tenant on one time-sliced GPU: the driver's percent, and its share there."""

    cid: str
    gpu: str
    used_pct: float
    share_pct: float
    judged: bool  # limited, so held by time (an unlimited tenant is only a neighbour)


def furthest_above_share(readings: list[Reading]) -> dict[str, str]:
    """Per GPU, the judged tenant furthest above its share in these readings."""
    furthest: dict[str, Reading] = {}
    for r in readings:
        best = furthest.get(r.gpu)
        if r.judged and (best is None or r.used_pct - r.share_pct > best.used_pct - best.share_pct):
            furthest[r.gpu] = r
    return {gpu: r.cid for gpu, r in furthest.items()}


def points_above_share(
    readings: list[Reading], held: set[str], furthest: dict[str, str] | None = None
) -> dict[str, float]:
    """The points above its share each judged tenant is held to account for, its worst
    GPU's: on a GPU where no tenant is `held`, the furthest above its share as read;
    every other one less the time the driver counted for its neighbours there.
    furthest: per GPU, who that is (default: furthest_above_share of these readings)."""
    if furthest is None:
        furthest = furthest_above_share(readings)
    by_gpu: dict[str, list[Reading]] = {}
    for r in readings:
        by_gpu.setdefault(r.gpu, []).append(r)
    points: dict[str, float] = {}
    for gpu, on_gpu in by_gpu.items():
        as_read = None if any(r.cid in held for r in on_gpu) else furthest.get(gpu)
        everyone = sum(r.used_pct for r in on_gpu)
        for r in on_gpu:
            if not r.judged:
                continue
            waited = 0.0 if r.cid == as_read else everyone - r.used_pct
            p = r.used_pct - r.share_pct - waited
            points[r.cid] = max(points.get(r.cid, p), p)
    return points


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
        self.history: deque[tuple[int, dict[tuple[str, str], int]]] = deque()  # the window's
        self.since_us: dict[str, int] = {}  # per GPU: NVML's sample clock, for the next read
        self.next_measure_ns = 0

    def due(self, state: HostState, now_ns: int, next_ns: int) -> bool:
        return (state.cfg.observer.backstop_margin_pct > 0 and state.nv.available) or any(
            h.frozen for h in self.holds.values()
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
        measure_ns = obs.nvml_interval_ms * NS_PER_MS
        if now_ns >= self.next_measure_ns:
            self.next_measure_ns = now_ns + measure_ns
            self.record(state, now_ns, self.measure(state), measure_ns)
        self.actuate(state, now_ns)

    def stop(self, state: HostState) -> None:
        self.release(state)

    def measure(self, state: HostState) -> dict[tuple[str, str], int]:
        """Percent of each GPU's time each tenant's processes ran there, per (tenant, GPU)."""
        used: dict[tuple[str, str], int] = {}
        for gpu in state.gpus:
            by_pid, self.since_us[gpu.uuid] = state.nv.utilisation(
                gpu, self.since_us.get(gpu.uuid, 0)
            )
            for pid, pct in by_pid.items():
                owner = state.members.get(pid)
                if owner is not None:
                    key = (owner[0], gpu.uuid)
                    used[key] = used.get(key, 0) + pct
        return used

    def record(
        self, state: HostState, now_ns: int, used: dict[tuple[str, str], int], step_ns: int
    ) -> None:
        """A reading for every held-able tenant: its worst device's points above its share
        over the window (NVML's readings are snapshots: averaged, time before a tenant's
        first one counting as 0); then each tenant's duty, by the latest reading."""
        obs = state.cfg.observer
        window_ns = obs.backstop_window_s * 1_000_000_000
        for cid in set(self.holds) - set(state.tenants):
            self.thaw(state, cid)
            del self.holds[cid]
        self.history.append((now_ns, used))
        while self.history[0][0] <= now_ns - window_ns:
            self.history.popleft()
        averaged: dict[tuple[str, str], float] = {}
        for _, snapshot in self.history:
            for key, pct in snapshot.items():
                averaged[key] = averaged.get(key, 0.0) + pct * step_ns / window_ns

        def readings(source: Mapping[tuple[str, str], float]) -> list[Reading]:
            return [
                Reading(
                    cid,
                    d.grant.gpu,
                    source.get((cid, d.grant.gpu), 0),
                    tenant.limits.effective(i) / 100,
                    d.grant.mode != abi.IsolationMode.NONE,
                )
                for cid, tenant in state.tenants.items()
                for i, d in enumerate(tenant.devices)
                if d.grant.backend == abi.Backend.TIMESLICE
            ]

        latest = readings(used)
        held = {c for c, h in self.holds.items() if h.duty > 0}
        points = points_above_share(readings(averaged), held, furthest_above_share(latest))
        for cid, tenant in state.tenants.items():
            for device in tenant.devices:
                device.driver_used_pct = used.get((cid, device.grant.gpu))
            mine = [r for r in latest if r.cid == cid and r.judged]
            if not mine or tenant.cgroup is None:
                continue
            worst = max(mine, key=lambda r: r.used_pct - r.share_pct)
            used_pct, share_pct = worst.used_pct, worst.share_pct
            hold = self.holds.setdefault(cid, Hold())
            hold.readings += 1
            if hold.duty == 0.0:
                if points[cid] > obs.backstop_margin_pct and hold.readings > 1:
                    hold.duty = next_duty(0.0, used_pct, share_pct)
                    tenant.log.warning(
                        "tenant above its share by the driver's count: frozen part of the time",
                        used_pct=used_pct, share_pct=share_pct, frozen_pct=round(hold.duty * 100),
                    )  # fmt: skip
                    self.save(state)
            else:
                hold.duty = next_duty(hold.duty, used_pct, share_pct)
                if hold.duty == 0.0:
                    tenant.log.info("tenant back at its share: no longer frozen")
                    self.save(state)
            tenant.held_pct = round(hold.duty * 100)

    def actuate(self, state: HostState, now_ns: int) -> None:
        """Freeze or thaw each held tenant for its part of the period."""
        phase = now_ns % PERIOD_NS
        for cid, hold in self.holds.items():
            tenant = state.tenants.get(cid)
            if tenant is None or tenant.cgroup is None:
                continue
            want = phase < hold.duty * PERIOD_NS
            if want == hold.frozen:
                continue
            if want and tenant.cgroup.frozen():
                continue  # frozen by someone else (a paused container): not ours to cycle
            try:
                tenant.cgroup.set_frozen(want)
                hold.frozen = want
            except CgroupError as exc:
                tenant.log.error("cannot freeze the tenant's cgroup", error=str(exc))
                hold.duty = 0.0

    def thaw(self, state: HostState, cid: str) -> None:
        hold = self.holds.get(cid)
        tenant = state.tenants.get(cid)
        if hold is None or not hold.frozen:
            return
        hold.frozen = False
        if tenant is not None and tenant.cgroup is not None:
            with contextlib.suppress(CgroupError):
                tenant.cgroup.set_frozen(False)

    def release(self, state: HostState) -> None:
        for cid, hold in self.holds.items():
            self.thaw(state, cid)
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


def _cgroup(state: HostState, cid: str) -> Cgroup | None:
    tenant = state.tenants.get(cid)
    return tenant.cgroup if tenant is not None else None
