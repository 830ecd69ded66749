"""Prometheus metrics of the observer, served on <metrics_address>:<metrics_port>/metrics
(127.0.0.1 unless config.toml says otherwise).

The observer publishes an immutable Snapshot after each tick; a collector turns the
latest one into metric families when scraped, so tenants that disappear disappear
from the metrics with them (no stale label sets to clean up).  Each tenant's series
carry its container id, tenant name and GPU, and for a Kubernetes container its pod,
namespace and container name (empty elsewhere).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

NS_PER_S = 1e9
CENTI_PER_RATIO = 10_000


@dataclass(frozen=True)
class TenantGpuSample:
    container_id: str
    tenant: str
    gpu: str
    mode: str
    requested_centi: int
    effective_centi: int
    mem_used_bytes: int
    mem_quota_bytes: int
    throttled_ns: int
    busy_ns: int
    active: bool
    unshimmed_processes: int
    mps_faults: int = 0
    mps_processes: int = 0  # its processes NVML lists as MPS clients there
    turn_ratio: float = 0.0  # its window of the observer's turn cycle; 0: no turns
    driver_used_pct: int | None = None  # its GPU time by NVML's count; None: not measured
    mem_driver_bytes: int | None = None  # its memory by NVML's count; None: not measured
    held_pct: int = 0  # of the time the host backstop keeps it frozen
    pressure_level: int | None = None  # slot.rules.Pressure, 0-3; None: no quota
    mem_spilled_bytes: int = 0  # spill mode: served past the quota from host memory
    mem_migrated_in_bytes: int = 0  # unified memory moved to the GPU, in total
    mem_migrated_out_bytes: int = 0  # ... and to the host
    # Kubernetes: the pod, namespace and container the hook recorded ('' elsewhere).
    pod: str = ""
    namespace: str = ""
    container: str = ""


TENANT_LABELS = ("container_id", "tenant", "gpu", "pod", "namespace", "container")


@dataclass(frozen=True)
class Snapshot:
    samples: tuple[TenantGpuSample, ...] = ()
    contention_pct: dict[str, int] = field(default_factory=dict)  # per GPU
    ticks: int = 0
    tick_seconds_total: float = 0.0
    # Per GPU on the MPS backend: (daemon serving tenants, daemon restarts, faults seen).
    mps: dict[str, tuple[bool, int, int]] = field(default_factory=dict)


class _Collector(Collector):
    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot  # one reference read: the observer swaps whole snapshots
        labels = list(TENANT_LABELS)
        fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "req": GaugeMetricFamily(
                "fcsp_sm_requested_ratio", "Requested compute share (0-1)", labels=labels
            ),
            "eff": GaugeMetricFamily(
                "fcsp_sm_effective_ratio", "Compute share in force (0-1)", labels=labels
            ),
            "mem": GaugeMetricFamily(
                "fcsp_memory_used_bytes", "Device memory charged to the tenant", labels=labels
            ),
            "quota": GaugeMetricFamily(
                "fcsp_memory_quota_bytes", "Memory quota (0: none)", labels=labels
            ),
            "thr": CounterMetricFamily(
                "fcsp_throttled_seconds", "Time the tenant waited for compute tokens", labels=labels
            ),
            "busy": CounterMetricFamily(
                "fcsp_busy_seconds", "GPU time of the tenant's kernels", labels=labels
            ),
            "active": GaugeMetricFamily(
                "fcsp_tenant_active", "1 if the tenant used the GPU lately", labels=labels
            ),
            "unshim": GaugeMetricFamily(
                "fcsp_unshimmed_processes",
                "Processes of the tenant on the GPU without the shim",
                labels=labels,
            ),
            "mps_faults": CounterMetricFamily(
                "fcsp_mps_faults",
                "Neighbours' fatal GPU errors that tore down the tenant's MPS clients",
                labels=labels,
            ),
            "mps_processes": GaugeMetricFamily(
                "fcsp_mps_processes",
                "The tenant's processes that are MPS clients of the GPU (MPS caps each one's "
                "SMs, not the tenant's)",
                labels=labels,
            ),
            "turn": GaugeMetricFamily(
                "fcsp_turn_ratio",
                "The tenant's window of the GPU's turn cycle (0-1; 0: no turns)",
                labels=labels,
            ),
            "driver_used": GaugeMetricFamily(
                "fcsp_driver_used_ratio",
                "The tenant's time on the GPU by the driver's count (NVML, 0-1)",
                labels=labels,
            ),
            "driver_mem": GaugeMetricFamily(
                "fcsp_driver_memory_bytes",
                "Device memory of the tenant's processes by the driver's count (NVML)",
                labels=labels,
            ),
            "held": GaugeMetricFamily(
                "fcsp_host_frozen_ratio",
                "Part of the time the host keeps the tenant frozen for using more than its "
                "share by the driver's count (0-1)",
                labels=labels,
            ),
            "pressure": GaugeMetricFamily(
                "fcsp_memory_pressure_level",
                "Device memory against the quota at the tenant's profile's levels "
                "(0 ok, 1 warning, 2 high, 3 critical; absent without a quota)",
                labels=labels,
            ),
            "spilled": GaugeMetricFamily(
                "fcsp_memory_spilled_bytes",
                "Memory served past the quota from host memory the GPU maps (spill mode)",
                labels=labels,
            ),
            "migrated": CounterMetricFamily(
                "fcsp_memory_migrated_bytes",
                "Unified memory moved to the GPU (in) and to the host (out)",
                labels=[*labels, "direction"],
            ),
        }
        for s in snap.samples:
            key = [s.container_id, s.tenant, s.gpu, s.pod, s.namespace, s.container]
            fams["req"].add_metric(key, s.requested_centi / CENTI_PER_RATIO)
            fams["eff"].add_metric(key, s.effective_centi / CENTI_PER_RATIO)
            fams["mem"].add_metric(key, s.mem_used_bytes)
            fams["quota"].add_metric(key, s.mem_quota_bytes)
            fams["thr"].add_metric(key, s.throttled_ns / NS_PER_S)
            fams["busy"].add_metric(key, s.busy_ns / NS_PER_S)
            fams["active"].add_metric(key, 1.0 if s.active else 0.0)
            fams["unshim"].add_metric(key, s.unshimmed_processes)
            fams["mps_faults"].add_metric(key, s.mps_faults)
            fams["mps_processes"].add_metric(key, s.mps_processes)
            fams["turn"].add_metric(key, s.turn_ratio)
            if s.driver_used_pct is not None:
                fams["driver_used"].add_metric(key, s.driver_used_pct / 100)
            if s.mem_driver_bytes is not None:
                fams["driver_mem"].add_metric(key, s.mem_driver_bytes)
            fams["held"].add_metric(key, s.held_pct / 100)
            if s.pressure_level is not None:
                fams["pressure"].add_metric(key, s.pressure_level)
            fams["spilled"].add_metric(key, s.mem_spilled_bytes)
            fams["migrated"].add_metric([*key, "in"], s.mem_migrated_in_bytes)
            fams["migrated"].add_metric([*key, "out"], s.mem_migrated_out_bytes)
        yield from fams.values()
        contention = GaugeMetricFamily(
            "fcsp_gpu_contention_ratio", "Unmet compute demand on the GPU (0-1)", labels=["gpu"]
        )
        for gpu, pct in sorted(snap.contention_pct.items()):
            contention.add_metric([gpu], pct / 100)
        yield contention
        up = GaugeMetricFamily(
            "fcsp_mps_daemon_up",
            "1 if the GPU's MPS daemon serves tenants (0: time-sliced)",
            labels=["gpu"],
        )
        restarts = CounterMetricFamily(
            "fcsp_mps_daemon_restarts", "Restarts of the GPU's MPS daemon", labels=["gpu"]
        )
        faults = CounterMetricFamily(
            "fcsp_mps_gpu_faults",
            "Fatal GPU errors that tore down the GPU's MPS clients",
            labels=["gpu"],
        )
        for gpu, (serving, restarted, faulted) in sorted(snap.mps.items()):
            up.add_metric([gpu], 1.0 if serving else 0.0)
            restarts.add_metric([gpu], restarted)
            faults.add_metric([gpu], faulted)
        yield from (up, restarts, faults)
        ticks = CounterMetricFamily("fcsp_observer_ticks", "Observer ticks")
        ticks.add_metric([], snap.ticks)
        yield ticks
        cost = CounterMetricFamily("fcsp_observer_tick_seconds", "Time spent in ticks")
        cost.add_metric([], snap.tick_seconds_total)
        yield cost


class Metrics:
    """Holds the registry; `serve` starts the HTTP thread (port 0: no server)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._collector = _Collector()
        self.registry.register(self._collector)
        self._server: object | None = None
        self._thread: threading.Thread | None = None

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Serve on address:port (localhost by default: tenant names and ids are not for
        the network at large)."""
        if port:
            # prometheus-client >= 0.19 returns (server, thread); older ones return None.
            started: Any = start_http_server(port, addr=address, registry=self.registry)
            if isinstance(started, tuple):
                self._server, self._thread = started

    def publish(self, snapshot: Snapshot) -> None:
        self._collector.snapshot = snapshot

    def close(self) -> None:
        shutdown = getattr(self._server, "shutdown", None)
        if shutdown is not None:
            shutdown()
