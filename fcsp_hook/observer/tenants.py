"""Duty: find the tenants' slots and sample their usage, every tick.

Slots appear under <run_dir>/tenants as the hook creates them; each is opened (limits
mapped, usage read with pread: the tenant writes it), dropped when it goes, reopened when
a restarted container rewrote it.  Each tick folds every tenant's counters into what the
share duty decides on: active or idle, unmet demand, and the size of its launches; the
memory counters (held, spilled, migrated) are kept for the memory duty and publishing.
"""

from __future__ import annotations

import errno
import os
import statistics

from fcsp_hook import cgroups, config, inventory
from fcsp_hook.errors import SlotError, SlotVersionError
from fcsp_hook.observer.state import (
    NS_PER_MS,
    NS_PER_US,
    Duty,
    Grant,
    HostState,
    Logger,
    Tenant,
    TenantDevice,
    backend,
    isolation_mode,
    mem_mode,
    priority,
)
from fcsp_hook.slot import abi, files, kubernetes, live

RESCAN_NS = 1_000_000_000  # a full rescan at least this often, whatever the mtime says
KERNEL_SPAN_NS = 500_000_000  # the size of a tenant's launches is measured over spans this long
# ... and taken as the median of the last KERNEL_SPANS (state.py) spans, once there are this
# many: the shim's estimates move with its samples, and a tenant's first spans hold its
# launches from before calibration.
MIN_KERNEL_SPANS = 3


def gpu_key(dev: abi.LimitsDevice, container_id: str, index: int, minors: dict[int, str]) -> str:
    """The host GPU a tenant's device entry is (inventory.gpu_key), else its own."""
    key = inventory.gpu_key(dev.uuid.decode(errors="replace"), int(dev.host_index), minors)
    return key or f"{container_id}/{index}"  # unknown GPU: shares it with nobody we know of


def grants(spec: abi.Limits, container_id: str, minors: dict[int, str]) -> list[Grant]:
    """What each GPU entry of a tenant's limits grants."""
    count = min(int(spec.device_count), abi.MAX_DEVICES)
    out = []
    for i in range(count):
        dev = spec.device[i]
        out.append(
            Grant(
                gpu=gpu_key(dev, container_id, i, minors),
                key=f"{container_id}/{i}",
                mode=isolation_mode(int(spec.isolation_mode)),
                requested_centi=min(int(dev.sm_requested_centi), abi.WHOLE_GPU_CENTI),
                priority=priority(int(spec.priority)),
                backend=backend(int(dev.backend)),
                mem_limit_bytes=int(dev.mem_limit_bytes),
                mem_limit_basis_points=int(dev.mem_limit_basis_points),
                mem_mode=mem_mode(int(spec.mem_mode)),
                pressure_pct=int(spec.pressure_pct),
            )
        )
    return out


def update_track(
    device: TenantDevice,
    sample: live.DeviceUsage,
    *,
    effective: int,
    now_ns: int,
    dt_ns: int,
    obs: config.ObserverConfig,
) -> None:
    """Fold one usage sample into a device's record: activity, idleness, unmet demand."""
    first = device.launches < 0
    # Counters only grow; one that went backwards was reset (or forged): rebase on it.
    d_launch = max(sample.launches - device.launches, 0) if not first else 0
    d_busy = max(sample.busy_ns - device.busy_ns, 0) if not first else 0
    d_throttle = max(sample.throttled_ns - device.throttled_ns, 0) if not first else 0
    device.launches, device.busy_ns, device.throttled_ns = (
        sample.launches,
        sample.busy_ns,
        sample.throttled_ns,
    )
    device.usage = sample
    update_kernel_time(device, sample, now_ns)
    if d_launch or d_busy or d_throttle:
        device.last_active_ns = now_ns
    device.active = now_ns - device.last_active_ns < obs.idle_window_ms * NS_PER_MS
    # Several threads can wait at once: the throttled fraction is capped at 1.  It is
    # averaged (half old, half new) so that a shim reporting in bursts does not make
    # the tenant's burst share flap tick by tick.
    sample_pct = min(d_throttle * 100 // max(dt_ns, 1), 100)
    device.throttled_pct = (device.throttled_pct + sample_pct) // 2
    throttled_pct = device.throttled_pct
    if not device.active:
        device.unmet = 0
    elif throttled_pct >= max(obs.throttled_min_pct, 1):
        estimate = effective * throttled_pct // 100
        device.unmet = max(sample.demand_centi - effective, estimate, 1)
    else:
        # Not throttled, but using (nearly) all it has: it still wants what it has.  Were
        # that 0, a busy tenant's burst would be withdrawn the tick it stops being
        # throttled, it would be throttled again, and a lone busy tenant's share would
        # swing between its burst and its request every few ticks.  A claim alone never
        # counts as more than that: 1 keeps the burst, it does not ask for more.
        device.unmet = 1 if sample.demand_centi * 10 >= effective * 9 else 0


def update_kernel_time(device: TenantDevice, sample: live.DeviceUsage, now_ns: int) -> None:
    """The size of the launches that take a tenant's GPU time: their mean cost weighted by
    that cost (sum of squares over sum), over spans of KERNEL_SPAN_NS, their median.  Not the
    plain mean: a GEMM launched with a tiny kernel after it is one 5 ms unit of work in a
    turn window, not two of 2.5 ms.  Counters that went backwards start a new span;
    forged ones give a wrong value, never an unbounded one."""
    since, busy_sq, busy = device.kernel_span
    if since and now_ns - since < KERNEL_SPAN_NS:
        return
    d_sq, d_busy = sample.busy_sq - busy_sq, sample.busy_ns - busy
    if since and d_sq > 0 and d_busy > 0:
        # busy_sq is in (ns >> 10) ** 2: one unit of it per 1024 ns of busy time, squared
        spans = device.kernel_spans
        spans.append(min(d_sq * 1024 * 1024 / d_busy / NS_PER_US, abi.TURN_MAX_US))
        if len(spans) >= MIN_KERNEL_SPANS:
            device.kernel_us = statistics.median(spans)
    device.kernel_span = (now_ns, sample.busy_sq, sample.busy_ns)


class Tenants(Duty):
    """Discover slots and sample every tenant's usage."""

    name = "tenants"

    def __init__(self) -> None:
        self.tenants_mtime = -1
        self.next_scan_ns = 0
        self.last_ns = 0

    def run(self, state: HostState, now_ns: int) -> None:
        dt = max(now_ns - self.last_ns, 1) if self.last_ns else state.interval_ns
        self.last_ns = now_ns
        self.discover(state, now_ns)
        for tenant in state.tenants.values():
            self.sample(state, tenant, now_ns, dt)

    def discover(self, state: HostState, now_ns: int) -> None:
        """Open new slots, drop vanished ones, reopen slots that were recreated.

        A new or removed slot changes the tenants directory's mtime, so a tick costs one
        stat() unless it changed; the full rescan (which also notices a slot rewritten in
        place by a restarted container) runs at least once every RESCAN_NS.
        """
        base = files.tenants_dir(state.run_dir)
        try:
            mtime = os.stat(base).st_mtime_ns
        except OSError:
            mtime = -1
        if mtime == self.tenants_mtime and now_ns < self.next_scan_ns:
            return
        self.tenants_mtime = mtime
        self.next_scan_ns = now_ns + RESCAN_NS
        try:
            with os.scandir(base) as entries:
                names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            names = []
        seen: set[str] = set()
        for name in names:
            try:
                files.validate_container_id(name)
            except SlotError:
                continue
            seen.add(name)
            tenant = state.tenants.get(name)
            if tenant is not None and not _same_file(tenant):
                state.drop_tenant(name, "tenant slot recreated")
                tenant = None
            if tenant is None:
                problem = _open(state, name, now_ns)
                if problem and state.unwatched.get(name) != problem:
                    state.log.error("tenant not watched", container_id=name, error=problem)
                if name in state.tenants:
                    state.unwatched.pop(name, None)
                else:
                    state.unwatched[name] = problem
        for name in set(state.unwatched) - seen:
            del state.unwatched[name]
        for name in set(state.tenants) - seen:
            state.drop_tenant(name, "tenant slot gone")

    def sample(self, state: HostState, tenant: Tenant, now_ns: int, dt: int) -> None:
        if tenant.limits.generation != tenant.spec.generation:
            try:
                tenant.spec = tenant.limits.snapshot()
            except SlotError as exc:
                tenant.log.warning("limits unreadable", error=str(exc))
            _describe(state, tenant, now_ns)
            state.dirty = True
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
        for i, (device, sample) in enumerate(zip(tenant.devices, samples, strict=True)):
            was_active = device.active
            update_track(
                device,
                sample,
                effective=tenant.limits.effective(i),
                now_ns=now_ns,
                dt_ns=dt,
                obs=state.cfg.observer,
            )
            if device.active != was_active:
                tenant.log.info("tenant active" if device.active else "tenant idle", device=i)
                state.dirty = True


def _same_file(tenant: Tenant) -> bool:
    try:
        return os.stat(tenant.directory / abi.LIMITS_FILE).st_ino == tenant.limits.inode
    except OSError:
        return False


def _open(state: HostState, name: str, now_ns: int) -> str:
    """Watch a slot; '' once it is open, else why not when that is worth an error: out
    of descriptors (most often the hook is writing the slot now: that is only debug)."""
    directory = files.tenants_dir(state.run_dir) / name
    log = state.log.bind(container_id=name)
    try:
        limits = live.LimitsMap(directory / abi.LIMITS_FILE)
    except SlotError as exc:
        return _not_opened(log, exc)
    try:
        usage = live.UsageReader(directory / abi.USAGE_FILE)
        spec = limits.snapshot()
    except SlotError as exc:
        limits.close()
        return _not_opened(log, exc)
    kube = kubernetes.read_record(directory)  # the hook's record; '' when none
    tenant = Tenant(
        name,
        directory,
        limits,
        usage,
        spec,
        log,
        cgroup=cgroups.read_record(directory),
        pod=kube["pod"],
        namespace=kube["namespace"],
        container=kube["container"],
    )
    _describe(state, tenant, now_ns)
    state.tenants[name] = tenant
    state.dirty = True
    log.info(
        "tenant found", tenant=tenant.name, mode=tenant.mode.name.lower(), gpus=tenant.device_count
    )
    return ""


def _not_opened(log: Logger, exc: SlotError) -> str:
    if isinstance(exc, SlotVersionError):
        return str(exc)  # an older install's container: the reaper still removes its slot
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno in {errno.EMFILE, errno.ENFILE}:
        return f"out of descriptors (raise LimitNOFILE): {exc}"
    log.debug("slot not ready", error=str(exc))
    return ""


def _describe(state: HostState, tenant: Tenant, now_ns: int) -> None:
    """Per-device records that follow the limits: grants rebuilt, what was learned of
    each device kept; a new device (or a restarted observer) presumes activity for one
    idle window."""
    new = grants(tenant.spec, tenant.container_id, state.minors)
    kept = tenant.devices[: len(new)]
    tenant.devices = [
        TenantDevice(grant=grant, last_active_ns=now_ns) if i >= len(kept) else kept[i]
        for i, grant in enumerate(new)
    ]
    for device, grant in zip(tenant.devices, new, strict=True):
        device.grant = grant
    tenant.last_samples = None  # the device list may have changed: sample afresh
