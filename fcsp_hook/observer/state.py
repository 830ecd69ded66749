"""The host state every duty of the observer works on, and the shape of a duty.

The observer is a list of duties (sample tenants, decide shares, clocks, MPS daemons, the
reaper, the NVML cross-check, publishing) over one HostState.  A duty reads and writes
the state and the slots, never another duty: what one learns for another (the GPUs that
take turns, the pids in each container, the MPS daemons' state) is a field here.  The
daemon (observer.daemon) runs each duty when it is due.

The observer keeps no state of its own on disk: a restarted observer rebuilds all of this
from /run/fcsp (new tenants are presumed active for one idle window).
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcsp_hook import config, nvml
from fcsp_hook.cgroups import Cgroup
from fcsp_hook.observer import policy
from fcsp_hook.observer.mpsd import DaemonState
from fcsp_hook.slot import abi, live, rules

NS_PER_MS = 1_000_000
NS_PER_US = 1_000
KERNEL_SPANS = 5  # the launch size is the median of this many spans (duties.tenants)

Logger = Any  # structlog's BoundLogger: its methods are dynamically typed


@dataclass(frozen=True)
class Grant:
    """What a tenant's limits grant on one GPU, as the duties use it (rebuilt when the
    limits' generation changes)."""

    gpu: str  # the host GPU: its UUID, else nvidia<minor>, else "<container>/<i>"
    key: str  # this tenant's entry in the policy: "<container>/<i>"
    mode: abi.IsolationMode
    requested_centi: int
    priority: abi.Priority
    backend: abi.Backend
    mem_limit_bytes: int
    mem_limit_basis_points: int
    mem_mode: abi.MemMode = abi.MemMode.HARD
    pressure_pct: int = 0  # the tenant's pressure levels (rules.unpack_pressure); 0: default


@dataclass
class TenantDevice:
    """One GPU of one tenant: its grant, and what its usage counters have shown."""

    grant: Grant
    last_active_ns: int
    launches: int = -1  # -1: no sample yet
    busy_ns: int = 0
    throttled_ns: int = 0
    active: bool = True
    unmet: int = 0  # centi of demand its share does not cover; 1: wants what it has
    throttled_pct: int = 0  # smoothed share of the last ticks spent waiting for tokens
    kernel_us: float = 0.0  # size of its launches, weighted by GPU time; 0: unknown
    kernel_span: tuple[int, int, int] = (0, 0, 0)  # (since, busy_sq, busy_ns) then
    kernel_spans: deque[float] = field(default_factory=lambda: deque(maxlen=KERNEL_SPANS))
    usage: live.DeviceUsage = field(default_factory=live.DeviceUsage)
    driver_used_pct: int | None = None  # its processes' time on the GPU by NVML's count
    # Its memory against its quota (duties.memory): the level now, None without a quota;
    # the level last logged, and since when the level has been below it.
    pressure: rules.Pressure | None = None
    pressure_logged: rules.Pressure = rules.Pressure.OK
    pressure_lower_since_ns: int | None = None
    rated: tuple[int, Grant] | None = None  # (bytes used, grant) the level was taken from

    def restart_kernel_span(self) -> None:
        """Measure the size of its launches afresh from the next sample on; spans already
        measured are kept."""
        self.kernel_span = (0, 0, 0)


@dataclass
class Tenant:
    """A slot the observer has open: its limits mapped, its usage file, what it learned."""

    container_id: str
    directory: Path
    limits: live.LimitsMap
    usage: live.UsageReader
    spec: abi.Limits  # the seqlocked fields as of spec.generation
    log: Logger
    devices: list[TenantDevice] = field(default_factory=list)
    problem: str = ""  # why its usage file cannot be read now
    last_samples: list[live.DeviceUsage] | None = None
    dead_processes: list[int] = field(default_factory=list)  # pids in its namespace
    dead_bytes: int = 0
    unshimmed: list[int] = field(default_factory=list)  # host pids NVML saw without the shim
    mps_faults: int = 0  # neighbours' fatal GPU errors that tore down its MPS clients
    outside_mps: list[int] = field(default_factory=list)  # host pids NVML saw outside MPS
    mps_clients: list[int] = field(default_factory=list)  # host pids NVML saw as MPS clients
    # The container's cgroup as the hook recorded it: whose processes are the tenant's.
    cgroup: Cgroup | None = None
    held_pct: int = 0  # of the time the host backstop keeps it frozen
    held_reading_pct: int = 0  # of the GPU: the reading its hold last followed
    # Kubernetes: its pod, namespace and container as the hook recorded them ('' elsewhere).
    pod: str = ""
    namespace: str = ""
    container: str = ""

    @property
    def name(self) -> str:
        return str(self.spec.tenant.decode(errors="replace"))

    @property
    def mode(self) -> abi.IsolationMode:
        return isolation_mode(int(self.spec.isolation_mode))

    @property
    def device_count(self) -> int:
        return min(int(self.spec.device_count), abi.MAX_DEVICES)

    @property
    def quiescent(self) -> bool:
        """Idle on every GPU with no throttling left to decay: a tick can skip it."""
        return not any(d.active or d.throttled_pct or d.unmet for d in self.devices)

    def close(self) -> None:
        self.limits.close()
        self.usage.close()


@dataclass(frozen=True)
class GpuClock:
    """clock_normalise on one GPU: the full-load clock learned, the reading the scale
    came from, and the scale published to its tenants."""

    full_load_mhz: float
    reading: nvml.ClockReading
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


@dataclass
class GpuShare:
    """What the share duty decided for one GPU."""

    policy_state: policy.GpuState = field(default_factory=policy.GpuState)
    contention_pct: int = 0
    turning: bool = False  # its busy tenants take turns


@dataclass
class HostState:
    cfg: config.Config
    log: Logger
    nv: nvml.Nvml
    interval_ns: int
    gpus: list[nvml.GpuInfo] = field(default_factory=list)  # NVML's inventory, at start
    tenants: dict[str, Tenant] = field(default_factory=dict)
    # Slots the tenants duty cannot watch now, and why ('' while not worth saying).
    unwatched: dict[str, str] = field(default_factory=dict)
    shares: dict[str, GpuShare] = field(default_factory=dict)  # per host GPU key
    clocks: dict[str, GpuClock] = field(default_factory=dict)  # per GPU UUID
    backends: dict[str, DaemonState] = field(default_factory=dict)  # MPS, per GPU UUID
    # Every host process in the tenants' pid namespaces: host pid -> (container, ns pid).
    members: dict[int, tuple[str, int]] = field(default_factory=dict)
    nvml_memory: dict[tuple[str, str], int] = field(default_factory=dict)
    foreign: dict[str, list[int]] = field(default_factory=dict)  # GPU -> host pids
    dirty: bool = True  # something fcspctl shows changed: publish now
    ticks: int = 0
    tick_ns_total: int = 0

    @property
    def run_dir(self) -> Path:
        return self.cfg.paths.run_dir

    @property
    def minors(self) -> dict[int, str]:
        return {g.minor: g.uuid for g in self.gpus}

    def memory_total(self, gpu: str) -> int:
        return next((g.memory_total for g in self.gpus if g.uuid == gpu), 0)

    def memory_quota(self, grant: Grant) -> int:
        """The bytes a grant's tenant may hold on its GPU, as the shim computes it from
        the GPU's real total (NVML's); 0: no quota."""
        return rules.memory_quota(
            grant.mem_limit_bytes, grant.mem_limit_basis_points, self.memory_total(grant.gpu)
        )

    def drop_tenant(self, container_id: str, why: str) -> None:
        tenant = self.tenants.pop(container_id)
        tenant.close()
        self.dirty = True
        tenant.log.info(why)

    def close(self) -> None:
        for name in list(self.tenants):
            self.tenants.pop(name).close()
        self.nv.close()


class Duty:
    """One of the observer's duties: run(state, now_ns) whenever it is due."""

    name = "duty"

    def period_ns(self, state: HostState) -> int:
        """How often it runs; the tick interval unless it says otherwise."""
        return state.interval_ns

    def due(self, state: HostState, now_ns: int, next_ns: int) -> bool:
        return now_ns >= next_ns

    def run(self, state: HostState, now_ns: int) -> None:
        raise NotImplementedError

    def start(self, state: HostState) -> None:
        """Before the first tick."""

    def stop(self, state: HostState) -> None:
        """On a clean exit, before the tenants' slots are closed."""


def isolation_mode(value: int) -> abi.IsolationMode:
    try:
        return abi.IsolationMode(value)
    except ValueError:
        return abi.IsolationMode.BALANCED  # host-written, but never let a bad byte stop us


def mem_mode(value: int) -> abi.MemMode:
    try:
        return abi.MemMode(value)
    except ValueError:
        return abi.MemMode.HARD  # host-written; the shim treats an unknown mode as hard


def priority(value: int) -> abi.Priority:
    try:
        return abi.Priority(value)
    except ValueError:
        return abi.Priority.BEST_EFFORT


def backend(value: int) -> abi.Backend:
    with contextlib.suppress(ValueError):
        return abi.Backend(value)
    return abi.Backend.TIMESLICE
