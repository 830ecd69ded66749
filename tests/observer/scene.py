"""The observer's duties in-process over real slot files.

A Scene is a run_dir holding tenants' slots written as the hook writes them, a HostState
over it (NVML as this host has it: none, unless a test names GPUs), and a hand on each
tenant's usage file to play its shim.  Duties run at explicit times, so a test steps
through ticks without waiting on a clock.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
from structlog.testing import CapturingLogger

from fcsp_hook import config, nvml
from fcsp_hook.observer.state import Duty, HostState, Tenant
from fcsp_hook.slot import abi, files, live, uvm

MS = 1_000_000
GiB = 1 << 30
_DEVICE_SIZE = ctypes.sizeof(abi.UsageDevice)
_PROC_SIZE = ctypes.sizeof(abi.UsageProc)


class UsageWriter:
    """Plays a tenant's libvgpu.so: writes its usage counters and process records."""

    def __init__(self, directory: Path) -> None:
        self.fd = os.open(directory / abi.USAGE_FILE, os.O_RDWR)

    def device(self, index: int = 0, **counters: int) -> None:
        """Set some of one GPU's fcsp_usage_device counters, keeping the others."""
        offset = abi.Usage.device.offset + index * _DEVICE_SIZE
        record = abi.UsageDevice.from_buffer_copy(os.pread(self.fd, _DEVICE_SIZE, offset))
        for name, value in counters.items():
            setattr(record, name, value)
        os.pwrite(self.fd, bytes(record), offset)

    def add(self, index: int = 0, **deltas: int) -> None:
        """Advance some counters of one GPU by the given amounts."""
        offset = abi.Usage.device.offset + index * _DEVICE_SIZE
        record = abi.UsageDevice.from_buffer_copy(os.pread(self.fd, _DEVICE_SIZE, offset))
        self.device(index, **{k: getattr(record, k) + v for k, v in deltas.items()})

    def process(self, slot: int, pid: int, mem: tuple[int, ...] = ()) -> None:
        """A LIVE per-process record, as the shim claims one."""
        record = abi.UsageProc(state=abi.ProcState.LIVE, pid=pid, heartbeat_ns=1)
        record.mem_used_bytes[: len(mem)] = list(mem)
        os.pwrite(self.fd, bytes(record), abi.Usage.proc.offset + slot * _PROC_SIZE)

    def raw(self, data: bytes, offset: int = 0) -> None:
        os.pwrite(self.fd, data, offset)

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Scene:
    root: Path
    state: HostState
    logged: CapturingLogger  # what the duties logged, as structlog event dicts
    writers: dict[str, UsageWriter] = field(default_factory=dict)
    now_ns: int = 1_000 * MS

    @classmethod
    def create(
        cls,
        root: Path,
        gpus: tuple[nvml.GpuInfo, ...] = (),
        *,
        backend: dict[str, Any] | None = None,
        driver_dir: Path | None = None,
        **observer: Any,
    ) -> Scene:
        """observer: [observer] settings; backend: the [backend] table of config.toml."""
        paths = {"run_dir": str(root / "run"), "state_dir": str(root / "state")}
        if driver_dir is not None:
            paths["driver_dir"] = str(driver_dir)
        cfg = config.from_mapping(
            {"paths": paths, "observer": {"metrics_port": 0, **observer}, "backend": backend or {}}
        )
        files.ensure_tenants_dir(cfg.paths.run_dir)
        logged = CapturingLogger()
        log = structlog.wrap_logger(logged, processors=[structlog.processors.add_log_level])
        state = HostState(cfg, log, nvml.Nvml(), interval_ns=10 * MS, gpus=list(gpus))
        return cls(root, state, logged)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The events logged so far (those named `name`), newest last."""
        out = [dict(call.kwargs) for call in self.logged.calls]
        return [e for e in out if name is None or e["event"] == name]

    @property
    def run_dir(self) -> Path:
        return self.state.run_dir

    def configure(self, **observer: Any) -> None:
        cfg = self.state.cfg
        self.state.cfg = replace(cfg, observer=replace(cfg.observer, **observer))

    def add(
        self,
        cid: str,
        *devices: files.DeviceLimits,
        mode: abi.IsolationMode = abi.IsolationMode.BALANCED,
        priority: abi.Priority = abi.Priority.BEST_EFFORT,
        init_pid: int = 0,
        init_start_time: int = 0,
        mem_mode: abi.MemMode = abi.MemMode.HARD,
        uvm_profile: str = "default",
    ) -> UsageWriter:
        """A slot as the hook writes it (one GPU, index 0, 25 % unless devices are given)."""
        spec = files.SlotSpec(
            container_id=cid,
            tenant=f"team-{cid}",
            isolation_mode=mode,
            mem_mode=mem_mode,
            uvm=uvm.PROFILES[uvm_profile],
            priority=priority,
            devices=devices or (files.DeviceLimits(host_index=0, sm_requested_centi=2500),),
            init_host_pid=init_pid,
            init_start_time=init_start_time,
        )
        directory = files.slot_path(self.run_dir, cid)
        files.write_slot(directory, spec, {})
        self.writers[cid] = UsageWriter(directory)
        return self.writers[cid]

    def tenant(self, cid: str) -> Tenant:
        return self.state.tenants[cid]

    def limits(self, cid: str) -> abi.Limits:
        return files.read_limits(files.slot_path(self.run_dir, cid) / abi.LIMITS_FILE)

    def effective(self, cid: str, index: int = 0) -> int:
        return int(self.limits(cid).device[index].sm_effective_centi)

    def turn(self, cid: str, index: int = 0) -> tuple[int, int, int]:
        return abi.unpack_turn(int(self.limits(cid).device[index].turn))

    def run(self, *duties: Duty, ticks: int = 1, step_ns: int = 10 * MS) -> None:
        """Run the duties in order, once per tick, ticks apart."""
        for _ in range(ticks):
            self.now_ns += step_ns
            for duty in duties:
                duty.run(self.state, self.now_ns)

    def busy(self, *cids: str, busy_ns: int = 8 * MS, throttled_ns: int = 6 * MS,
             kernel_ns: int = 100_000) -> None:  # fmt: skip
        """One tick's worth of work for each tenant: launches of kernel_ns, GPU time, and
        time spent waiting for tokens (a tenant held to its share)."""
        for cid in cids:
            self.writers[cid].add(
                launches=busy_ns // kernel_ns,
                busy_ns=busy_ns,
                busy_sq=busy_ns * (kernel_ns >> 10) ** 2 // kernel_ns,
                throttled_ns=throttled_ns,
            )

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.state.close()


def live_limits(scene: Scene, cid: str) -> live.LimitsMap:
    return live.LimitsMap(files.slot_path(scene.run_dir, cid) / abi.LIMITS_FILE)
