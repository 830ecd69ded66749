"""Duty: each tenant's memory pressure on each of its GPUs, every tick.

The level (slot.rules.pressure_level: ok, warning, high, critical) of the bytes a tenant
holds on the GPU against its quota, at the percentages of its profile
(fcsp_limits.pressure_pct).  Every tenant with a quota has one, whatever its memory mode:
a hard tenant nears the point where its allocations fail, a spill tenant the point where
they are served from host memory, and a soft tenant past its quota is critical (that is
soft mode's over-quota warning, not an event of its own).  The bytes are the shim's report
(untrusted, bounded by slot.live): the level informs the operator, it never acts on the
tenant; the NVML cross-check is what enforces.

One log line each time a level changes: a rise at once; a fall once the level has stayed
below the one logged for FALL_HOLD_NS, so that a tenant that allocates and frees across a
level every step of its loop logs one rise, not two lines a step.
"""

from __future__ import annotations

from fcsp_hook.observer.state import Duty, HostState, Tenant, TenantDevice
from fcsp_hook.slot import rules

FALL_HOLD_NS = 2_000_000_000


class Memory(Duty):
    name = "memory"

    def run(self, state: HostState, now_ns: int) -> None:
        for tenant in state.tenants.values():
            for index, device in enumerate(tenant.devices):
                # Most ticks nothing that the level depends on moved: skip the arithmetic.
                rated = (device.usage.mem_used_bytes, device.grant)
                if rated == device.rated and device.pressure_lower_since_ns is None:
                    continue
                device.rated = rated
                quota = state.memory_quota(device.grant)
                was = observe(device, quota, now_ns)
                if was is not None:
                    log_change(tenant, index, device, quota, was)
                    state.dirty = True


def observe(device: TenantDevice, quota: int, now_ns: int) -> rules.Pressure | None:
    """Fold the device's last sample into its level (None without a quota); when the
    level to log changes, the one logged before, else None."""
    level = rules.pressure_level(device.usage.mem_used_bytes, quota, device.grant.pressure_pct)
    device.pressure = level if quota else None
    if level >= device.pressure_logged:
        device.pressure_lower_since_ns = None
        if level == device.pressure_logged:
            return None
    else:
        if device.pressure_lower_since_ns is None:
            device.pressure_lower_since_ns = now_ns
        if now_ns - device.pressure_lower_since_ns < FALL_HOLD_NS:
            return None
        device.pressure_lower_since_ns = None
    was, device.pressure_logged = device.pressure_logged, level
    return was


def log_change(
    tenant: Tenant, index: int, device: TenantDevice, quota: int, was: rules.Pressure
) -> None:
    """The one line of a change, at warning from high up (an operator acts on those).  The
    level is `pressure`: `level` is the line's own (structlog's add_log_level)."""
    level = device.pressure_logged
    log = tenant.log.warning if level >= rules.Pressure.HIGH else tenant.log.info
    log(
        "memory pressure",
        tenant=tenant.name,
        gpu=device.grant.gpu,
        device=index,
        pressure=level.name.lower(),
        was=was.name.lower(),
        mem_mode=device.grant.mem_mode.name.lower(),
        used_bytes=device.usage.mem_used_bytes,
        quota_bytes=quota,
        spilled_bytes=device.usage.mem_spilled_bytes,
    )
