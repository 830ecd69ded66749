"""Duty: one MPS control daemon per GPU that config.toml puts on the mps backend.

Started (or adopted after an observer restart), kept alive, restarted after a client's
fatal fault tore down every client on the GPU, stopped when the config no longer asks
for it (observer.mpsd does the work).  A fault is charged to every MPS tenant of the GPU.
"""

from __future__ import annotations

import time

from fcsp_hook.gpus import host_gpu_uuids
from fcsp_hook.observer import mpsd
from fcsp_hook.observer.state import Duty, HostState
from fcsp_hook.slot import abi

PERIOD_NS = 500_000_000  # how often daemons are checked: alive, faults in their log


class Backends(Duty):
    name = "backends"

    def __init__(self) -> None:
        self.daemons: dict[str, mpsd.Daemon] = {}

    def period_ns(self, state: HostState) -> int:
        return PERIOD_NS

    def run(self, state: HostState, now_ns: int) -> None:
        wanted = {}
        backend = state.cfg.backend
        if backend.any_mps:
            # Host index -> UUID: the driver's procfs files, else NVML's inventory.
            gpus = host_gpu_uuids(state.cfg.paths.driver_dir) or state.minors
            wanted = {u: i for i, u in gpus.items() if backend.for_gpu(u, i) == abi.Backend.MPS}
        for uuid in list(self.daemons):
            if uuid not in wanted:
                state.log.info("MPS backend no longer configured; stopping its daemon", gpu=uuid)
                self.daemons.pop(uuid).stop()
                del state.backends[uuid]
                state.dirty = True
        now = time.monotonic()
        for uuid in wanted:
            daemon = self.daemons.get(uuid)
            if daemon is None:
                daemon = mpsd.Daemon(state.run_dir, uuid, backend.mps_control, state.log)
                self.daemons[uuid] = daemon
            before = (daemon.state.backend, daemon.state.faults, daemon.state.threads_pct)
            daemon.ensure(now)
            state.backends[uuid] = daemon.state  # a (re)started daemon has a new record
            if daemon.state.faults != before[1]:
                charge_fault(state, uuid)
            if (daemon.state.backend, daemon.state.faults, daemon.state.threads_pct) != before:
                state.dirty = True


def charge_fault(state: HostState, gpu: str) -> None:
    """Every MPS tenant of the GPU lost its clients to a neighbour's fault."""
    for cid, tenant in state.tenants.items():
        on_gpu = any(d.grant.gpu == gpu for d in tenant.devices)
        if on_gpu and tenant.devices[0].grant.backend == abi.Backend.MPS:
            tenant.mps_faults += 1
            state.log.error("tenant hit by an MPS fault on its GPU", container_id=cid, gpu=gpu)
