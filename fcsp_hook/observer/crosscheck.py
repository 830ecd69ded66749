"""Duty: NVML's view against the tenants' (at most once a second: process-list queries
hold the driver's global lock and slow every tenant).

Per tenant and GPU: the memory NVML counts for the container's processes, processes that
run on the GPU without the shim (static or musl binaries), processes of an MPS tenant
that run outside MPS, and memory past the quota, warned about or killed
([observer] over_quota_action).  nvml.cross_check is the pure part.
"""

from __future__ import annotations

import contextlib
import os
import signal

from fcsp_hook import config, nvml
from fcsp_hook.errors import SlotError
from fcsp_hook.observer import mpsd
from fcsp_hook.observer.state import NS_PER_MS, Duty, HostState
from fcsp_hook.slot import abi, rules


class CrossCheck(Duty):
    name = "crosscheck"

    def __init__(self) -> None:
        self.over_quota: set[tuple[str, str]] = set()  # (container, GPU) warned about

    def period_ns(self, state: HostState) -> int:
        return state.cfg.observer.nvml_interval_ms * NS_PER_MS

    def due(self, state: HostState, now_ns: int, next_ns: int) -> bool:
        return state.nv.available and now_ns >= next_ns

    def run(self, state: HostState, now_ns: int) -> None:
        self.apply(state, nvml.cross_check(views(state), processes(state), state.members.get))

    def apply(self, state: HostState, result: nvml.CrossCheck) -> None:
        state.nvml_memory = result.memory
        state.foreign = result.foreign
        for cid, tenant in state.tenants.items():
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
            log = state.log.bind(container_id=over.container_id)
            if state.cfg.observer.over_quota_action == config.OVER_QUOTA_KILL:
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


def views(state: HostState) -> list[nvml.TenantView]:
    """What each tenant is granted and which of its pids report through the shim."""
    out = []
    for cid, tenant in state.tenants.items():
        quotas = {
            d.grant.gpu: rules.memory_quota(
                d.grant.mem_limit_bytes,
                d.grant.mem_limit_basis_points,
                state.memory_total(d.grant.gpu),
            )
            for d in tenant.devices
        }
        try:
            shimmed = frozenset(r.pid for r in tenant.usage.live_processes())
        except SlotError:
            shimmed = frozenset()
        on_mps = frozenset(
            d.grant.gpu for d in tenant.devices if d.grant.backend == abi.Backend.MPS
        )
        out.append(nvml.TenantView(cid, quotas, shimmed, on_mps))
    return out


def processes(state: HostState) -> dict[str, list[nvml.GpuProcess]]:
    """NVML's compute processes per GPU, without the MPS daemons themselves."""
    served = frozenset(u for u, d in state.backends.items() if d.backend == "mps")
    return {
        uuid: [p for p in procs if not mpsd.is_mps_process(p.host_pid)]
        for uuid, procs in state.nv.processes(state.gpus, served).items()
    }
