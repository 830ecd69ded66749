"""NVML: the slow cross-check of what the shims report (at most once a second).

Two parts: `Nvml`, the I/O (pynvml; absent driver or library means "unavailable"
with a reason, never an exception), and `cross_check`, pure code that matches NVML's
per-process view against the tenants: memory per tenant and GPU, processes in a
tenant's container that run without the shim (static or musl binaries), and
tenants over their memory quota.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SAMPLE_US = 200_000  # how often the driver samples per-process utilisation (H100, 580)


@dataclass(frozen=True)
class ClockReading:
    """One NVML reading of a GPU; power None where the GPU does not report it."""

    sm_mhz: int
    util_pct: int
    power_w: float | None = None
    power_limit_w: float | None = None


@dataclass(frozen=True)
class Sample:
    """One process's (or the whole GPU's) share of a GPU's time in one of the driver's
    samples, and its end."""

    pct: int
    at_us: int


def _percent(value: Any) -> int:
    """A driver's utilisation figure, clamped to 0-100 (it can report more)."""
    return min(max(int(value), 0), 100)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    minor: int
    memory_total: int


@dataclass(frozen=True)
class GpuProcess:
    host_pid: int
    used_bytes: int
    # On a GPU served by MPS: whether NVML lists it as an MPS client (None: not asked).
    mps_client: bool | None = None


class Nvml:
    """pynvml behind a small interface; every failure turns into `available = False`."""

    def __init__(self, loader: Callable[[], Any] | None = None) -> None:
        self.available = False
        self.reason = ""
        self._nv: Any = None
        try:
            self._nv = loader() if loader else _import_pynvml()
            self._nv.nvmlInit()
        except Exception as exc:  # any NVML failure means "no NVML here"
            self.reason = f"NVML unavailable: {exc}"
            return
        self.available = True

    def inventory(self) -> list[GpuInfo]:
        if not self.available:
            return []
        try:
            out = []
            for i in range(self._nv.nvmlDeviceGetCount()):
                handle = self._nv.nvmlDeviceGetHandleByIndex(i)
                uuid = self._nv.nvmlDeviceGetUUID(handle)
                out.append(
                    GpuInfo(
                        index=i,
                        uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                        minor=int(self._nv.nvmlDeviceGetMinorNumber(handle)),
                        memory_total=int(self._nv.nvmlDeviceGetMemoryInfo(handle).total),
                    )
                )
        except Exception as exc:  # the driver went away: report, go on
            self.reason = f"NVML inventory failed: {exc}"
            return []
        return out

    def processes(
        self, gpus: Sequence[GpuInfo], mps_gpus: frozenset[str] = frozenset()
    ) -> dict[str, list[GpuProcess]]:
        """Compute processes per GPU UUID (one driver-locked query per GPU, two on a GPU
        in mps_gpus, where each process is marked MPS client or not)."""
        out: dict[str, list[GpuProcess]] = {}
        if not self.available:
            return out
        for gpu in gpus:
            try:
                handle = self._nv.nvmlDeviceGetHandleByIndex(gpu.index)
                procs = self._nv.nvmlDeviceGetComputeRunningProcesses(handle)
                clients = None
                if gpu.uuid in mps_gpus:
                    found = self._nv.nvmlDeviceGetMPSComputeRunningProcesses(handle)
                    clients = {int(p.pid) for p in found}
            except Exception as exc:  # one GPU failing must not hide others
                self.reason = f"NVML process list of {gpu.uuid} failed: {exc}"
                continue
            out[gpu.uuid] = [
                GpuProcess(
                    int(p.pid),
                    int(p.usedGpuMemory or 0),
                    None if clients is None else int(p.pid) in clients,
                )
                for p in procs
            ]
        return out

    def utilisation(self, gpu: GpuInfo, since_us: int = 0) -> tuple[dict[int, Sample], int]:
        """Each process's newest sample after since_us (NVML's sample clock: us of the wall
        clock); and the newest sample's time.  ({}, since_us) when there is none.  The
        driver samples every SAMPLE_US and answers with one sample per process that ran in
        it, its latest, each process's at times of its own; with since_us 0 it answers for
        every process it still has a sample of, stale ones included, with figures it
        averages over them (H100, driver 580)."""
        samples = self._samples(
            gpu,
            "process utilisation",
            lambda handle: self._nv.nvmlDeviceGetProcessUtilization(handle, since_us),
        )
        newest: dict[int, Sample] = {}
        for s in samples:
            sample = Sample(_percent(s.smUtil), int(s.timeStamp))
            if int(s.pid) not in newest or sample.at_us > newest[int(s.pid)].at_us:
                newest[int(s.pid)] = sample
        return newest, max((s.at_us for s in newest.values()), default=since_us)

    def busy(self, gpu: GpuInfo, since_us: int = 0) -> list[Sample]:
        """The driver's samples of the whole GPU after since_us: the percentage of each
        SAMPLE_US in which a kernel of any process ran.  Unlike the per-process samples,
        these count a process that is frozen when the sample ends: the driver keeps no
        per-process sample for it (H100, driver 580)."""
        samples = self._samples(
            gpu,
            "utilisation samples",
            lambda handle: self._nv.nvmlDeviceGetSamples(
                handle, self._nv.NVML_GPU_UTILIZATION_SAMPLES, since_us
            )[1],
        )
        busy = [Sample(_percent(s.sampleValue.uiVal), int(s.timeStamp)) for s in samples]
        return sorted((b for b in busy if b.at_us > since_us), key=lambda b: b.at_us)

    def _samples(self, gpu: GpuInfo, what: str, ask: Callable[[Any], Any]) -> Any:
        """ask(gpu's handle): the driver's samples; none where it has none after the time
        asked (NOT_FOUND) or fails, and then self.reason says why."""
        if not self.available:
            return []
        try:
            return ask(self._nv.nvmlDeviceGetHandleByIndex(gpu.index))
        except Exception as exc:
            if "Not Found" not in str(exc):
                self.reason = f"NVML {what} of {gpu.uuid} failed: {exc}"
            return []

    def driver_version(self) -> str:
        if not self.available:
            return ""
        try:
            version = self._nv.nvmlSystemGetDriverVersion()
        except Exception:  # an old or partial driver: measurements are kept per GPU only
            return ""
        return version.decode() if isinstance(version, bytes) else str(version)

    def clock(self, gpu: GpuInfo) -> ClockReading | None:
        """SM clock, utilisation and power now, or None when NVML cannot tell the clock."""
        if not self.available:
            return None
        try:
            handle = self._nv.nvmlDeviceGetHandleByIndex(gpu.index)
            mhz = int(self._nv.nvmlDeviceGetClockInfo(handle, self._nv.NVML_CLOCK_SM))
            util = int(self._nv.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception as exc:  # a GPU without clock readings: no normalisation for it
            self.reason = f"NVML clock of {gpu.uuid} failed: {exc}"
            return None
        try:
            power_w: float | None = self._nv.nvmlDeviceGetPowerUsage(handle) / 1000
            limit_w: float | None = self._nv.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
        except Exception:  # no power readings on this GPU: the clock ratio alone
            power_w = limit_w = None
        return ClockReading(mhz, util, power_w, limit_w)

    def close(self) -> None:
        if self.available:
            with contextlib.suppress(Exception):  # shutting down: nothing left to tell
                self._nv.nvmlShutdown()
            self.available = False


def _import_pynvml() -> Any:
    import pynvml  # type: ignore[import-untyped]  # noqa: PLC0415  # only when NVML is wanted; absent on GPU-less hosts

    return pynvml


@dataclass(frozen=True)
class TenantView:
    """What the observer knows of one tenant for the cross-check."""

    container_id: str
    gpus: Mapping[str, int]  # GPU UUID -> memory quota in bytes (0: none)
    # LIVE records of its usage file: pids in the container's namespace.  The tenant writes
    # them: they only tell which processes say they run the shim, never who is the tenant's.
    shimmed_pids: frozenset[int]
    mps_gpus: frozenset[str] = frozenset()  # GPUs where the tenant is an MPS tenant
    hard: bool = True  # a hard quota (soft: past it is allowed, only reported)


@dataclass(frozen=True)
class OverQuota:
    container_id: str
    gpu: str
    used_bytes: int
    quota_bytes: int  # the quota plus each process's allowance
    # Host pids to stop to bring it back within: those without the shim first, then the
    # largest; empty for a soft quota.
    culprits: tuple[int, ...]


@dataclass
class CrossCheck:
    memory: dict[tuple[str, str], int] = field(default_factory=dict)  # (cid, uuid) -> bytes
    unshimmed: dict[str, list[int]] = field(default_factory=dict)  # cid -> host pids
    foreign: dict[str, list[int]] = field(default_factory=dict)  # uuid -> host pids of no tenant
    over_quota: list[OverQuota] = field(default_factory=list)
    # cid -> host pids on a GPU where the tenant is an MPS tenant that NVML does not list as
    # MPS clients: they run time-sliced beside the MPS server, outside its SM limits.
    outside_mps: dict[str, list[int]] = field(default_factory=dict)
    # cid -> host pids NVML lists as MPS clients there: MPS caps each one's SMs, not the
    # tenant's.
    mps_clients: dict[str, list[int]] = field(default_factory=dict)


def cross_check(
    tenants: Sequence[TenantView],
    processes: Mapping[str, Sequence[GpuProcess]],
    owner_of: Callable[[int], tuple[str, int] | None],
    allowance: Mapping[str, int] | None = None,
) -> CrossCheck:
    """Match NVML's processes to tenants.

    owner_of(host_pid) gives (container id, pid inside its namespace) for a process in
    a tenant's container, or None for any other process.  allowance: per GPU, the bytes
    each process may hold past the tenant's quota (its context, the driver's modules),
    which NVML counts and the shim does not.
    """
    result = CrossCheck()
    by_id = {t.container_id: t for t in tenants}
    tenant_gpus = {uuid for t in tenants for uuid in t.gpus}
    per_tenant: dict[tuple[str, str], list[tuple[GpuProcess, bool]]] = {}
    for uuid, procs in processes.items():
        for proc in procs:
            owner = owner_of(proc.host_pid)
            if owner is None or owner[0] not in by_id:
                if uuid in tenant_gpus:
                    result.foreign.setdefault(uuid, []).append(proc.host_pid)
                continue
            cid, ns_pid = owner
            shimmed = ns_pid in by_id[cid].shimmed_pids
            if not shimmed:
                result.unshimmed.setdefault(cid, []).append(proc.host_pid)
            if proc.mps_client is not None and uuid in by_id[cid].mps_gpus:
                mps = result.mps_clients if proc.mps_client else result.outside_mps
                mps.setdefault(cid, []).append(proc.host_pid)
            per_tenant.setdefault((cid, uuid), []).append((proc, shimmed))
    for (cid, uuid), entries in per_tenant.items():
        used = sum(p.used_bytes for p, _ in entries)
        result.memory[(cid, uuid)] = used
        quota = by_id[cid].gpus.get(uuid, 0)
        limit = quota + len(entries) * (allowance or {}).get(uuid, 0)
        if quota and used > limit:
            culprits = _to_stop(entries, used - limit) if by_id[cid].hard else ()
            result.over_quota.append(OverQuota(cid, uuid, used, limit, culprits))
    return result


def _to_stop(entries: list[tuple[GpuProcess, bool]], excess: int) -> tuple[int, ...]:
    """The fewest processes, bypassing ones first and then the largest, whose memory
    covers the excess."""
    order = sorted(entries, key=lambda e: (e[1], -e[0].used_bytes))
    chosen = []
    for proc, _ in order:
        if excess <= 0:
            break
        chosen.append(proc.host_pid)
        excess -= proc.used_bytes
    return tuple(chosen)
