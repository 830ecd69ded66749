"""Duty: say what the observer sees: the state file fcspctl reads (<run_dir>/observer.json),
the Prometheus metrics, and systemd's STATUS line.  Once a second, and at once when
something fcspctl shows changed (state.dirty).  At start, the GPUs' memory totals as NVML
gives them (<run_dir>/gpus.json), which the hook's admission adds hard quotas up against:
the hook never initialises NVML itself."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict

from fcsp_hook import config, inventory
from fcsp_hook.errors import ConfigError
from fcsp_hook.observer import STATE_FILE, metrics, notify
from fcsp_hook.observer.state import NS_PER_MS, Duty, HostState
from fcsp_hook.slot import abi, live, rules

PERIOD_NS = 1_000_000_000
# Overrides [observer] metrics_address: a DaemonSet's observer serves its pod's network,
# while the node's config.toml (shared with the host) keeps its own address.
METRICS_ADDRESS_ENV = "FCSP_METRICS_ADDRESS"


class Publish(Duty):
    name = "publish"

    def __init__(self, notifier: notify.Notifier, exporter: metrics.Metrics) -> None:
        self.notifier = notifier
        self.exporter = exporter
        self.status_line = ""

    def period_ns(self, state: HostState) -> int:
        return PERIOD_NS

    def due(self, state: HostState, now_ns: int, next_ns: int) -> bool:
        return state.dirty or now_ns >= next_ns

    def start(self, state: HostState) -> None:
        write_inventory(state)
        address = metrics_address(state, os.environ.get(METRICS_ADDRESS_ENV, ""))
        self.exporter.serve(state.cfg.observer.metrics_port, address)

    def run(self, state: HostState, now_ns: int) -> None:
        state.dirty = False
        # Metrics first: whoever sees the state file change finds the metrics current.
        self.exporter.publish(metrics_snapshot(state))
        path = state.run_dir / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.tmp")
        try:
            tmp.write_text(json.dumps(snapshot(state)))
            os.replace(tmp, path)
        except OSError as exc:
            state.log.warning("cannot write state file", path=str(path), error=exc.strerror)
        text = status_text(state)
        if text != self.status_line:
            self.status_line = text
            self.notifier.status(text)

    def stop(self, state: HostState) -> None:
        self.exporter.close()
        with contextlib.suppress(OSError):
            (state.run_dir / STATE_FILE).unlink()


def metrics_address(state: HostState, override: str) -> str:
    """[observer] metrics_address, or the environment's override when it is one."""
    if not override:
        return state.cfg.observer.metrics_address
    try:
        return config.from_mapping(
            {"observer": {"metrics_address": override}}
        ).observer.metrics_address
    except ConfigError as exc:
        state.log.warning(
            f"{METRICS_ADDRESS_ENV} ignored",
            error=str(exc).replace("[observer] metrics_address", METRICS_ADDRESS_ENV),
        )
        return state.cfg.observer.metrics_address


def write_inventory(state: HostState) -> None:
    """<run_dir>/gpus.json from NVML (kept when the observer stops: totals do not change
    while the host runs)."""
    try:
        inventory.write(state.run_dir, ((g.uuid, g.minor, g.memory_total) for g in state.gpus))
    except OSError as exc:
        state.log.warning(
            "cannot write GPU inventory",
            path=str(state.run_dir / inventory.FILE),
            error=exc.strerror,
        )


def status_text(state: HostState) -> str:
    """systemd's STATUS line: tenants, GPUs, the worst contention, MPS daemons."""
    gpus = {d.grant.gpu for t in state.tenants.values() for d in t.devices}
    worst = max((s.contention_pct for s in state.shares.values()), default=0) / 100
    count = len(state.tenants)
    text = (
        f"{count} tenant{'s' if count != 1 else ''} on "
        f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''}, contention {worst:.2f}"
    )
    if state.backends:
        text += "; mps: " + ", ".join(
            f"{uuid[:12]} {d.backend if d.backend == 'mps' else 'FAILED'}"
            for uuid, d in sorted(state.backends.items())
        )
    return text


def snapshot(state: HostState) -> dict[str, object]:
    """The state file's document (fcspctl status reads it defensively)."""
    tenants: dict[str, object] = {}
    for cid, t in state.tenants.items():
        tenants[cid] = {
            "active": [d.active for d in t.devices],
            "unmet_centi": [d.unmet for d in t.devices],
            "throttled_pct": [d.throttled_pct for d in t.devices],
            "dead_processes": t.dead_processes,
            "dead_bytes": t.dead_bytes,
            "unshimmed_host_pids": t.unshimmed,
            "problem": t.problem,
            "backend": [d.grant.backend.name.lower() for d in t.devices],
            "mps_faults": t.mps_faults,
            "outside_mps_host_pids": t.outside_mps,
            "mps_client_host_pids": t.mps_clients,
            "driver_used_pct": [d.driver_used_pct for d in t.devices],
            "driver_memory_bytes": [state.nvml_memory.get((cid, d.grant.gpu)) for d in t.devices],
            "held_pct": t.held_pct,
            # what the hold follows: the tenant's reading over the last period, of the GPU
            "held_reading_pct": t.held_reading_pct if t.held_pct else None,
            # Memory per device: the pressure level (None: no quota) and, in spill mode,
            # the bytes served from host memory and moved between it and the GPU.
            "pressure": [pressure_name(d.pressure) for d in t.devices],
            "mem_spilled_bytes": [d.usage.mem_spilled_bytes for d in t.devices],
            "mem_spill_peak_bytes": [d.usage.mem_spill_peak_bytes for d in t.devices],
            "mem_migrated_in_bytes": [d.usage.mem_migrated_in_bytes for d in t.devices],
            "mem_migrated_out_bytes": [d.usage.mem_migrated_out_bytes for d in t.devices],
            "pod": t.pod,
            "namespace": t.namespace,
            "container": t.container,
        }
    return {
        "pid": os.getpid(),
        "updated_ns": live.monotonic_ns(),
        "interval_ms": state.interval_ns / NS_PER_MS,
        "nvml": "ok" if state.nv.available else state.nv.reason,
        "gpus": {
            gpu: {
                "contention_pct": share.contention_pct,
                "tightness_pct": share.policy_state.tightness_pct,
            }
            for gpu, share in state.shares.items()
        },
        "backends": {uuid: asdict(d) for uuid, d in state.backends.items()},
        "clocks": {uuid: clock.status() for uuid, clock in state.clocks.items()},
        "foreign_host_pids": state.foreign,
        "tenants": tenants,
        "ticks": state.ticks,
        "tick_seconds_total": state.tick_ns_total / 1e9,
    }


def pressure_name(level: rules.Pressure | None) -> str | None:
    return None if level is None else level.name.lower()


def turn_ratio(word: int) -> float:
    cycle, _, length = abi.unpack_turn(word)
    return length / cycle if cycle else 0.0


def metrics_snapshot(state: HostState) -> metrics.Snapshot:
    samples = []
    for cid, t in state.tenants.items():
        for i, device in enumerate(t.devices):
            grant = device.grant
            samples.append(
                metrics.TenantGpuSample(
                    container_id=cid,
                    tenant=t.name,
                    gpu=grant.gpu,
                    mode=grant.mode.name.lower(),
                    requested_centi=grant.requested_centi,
                    effective_centi=t.limits.effective(i),
                    mem_used_bytes=device.usage.mem_used_bytes,
                    mem_quota_bytes=state.memory_quota(grant),
                    throttled_ns=device.usage.throttled_ns,
                    busy_ns=device.usage.busy_ns,
                    active=device.active,
                    unshimmed_processes=len(t.unshimmed),
                    mps_faults=t.mps_faults,
                    mps_processes=len(t.mps_clients),
                    turn_ratio=turn_ratio(t.limits.turn(i)),
                    driver_used_pct=device.driver_used_pct,
                    mem_driver_bytes=state.nvml_memory.get((cid, grant.gpu)),
                    held_pct=t.held_pct,
                    pressure_level=None if device.pressure is None else int(device.pressure),
                    mem_spilled_bytes=device.usage.mem_spilled_bytes,
                    mem_migrated_in_bytes=device.usage.mem_migrated_in_bytes,
                    mem_migrated_out_bytes=device.usage.mem_migrated_out_bytes,
                    pod=t.pod,
                    namespace=t.namespace,
                    container=t.container,
                )
            )
    return metrics.Snapshot(
        tuple(samples),
        {gpu: share.contention_pct for gpu, share in state.shares.items()},
        state.ticks,
        state.tick_ns_total / 1e9,
        {uuid: (d.backend == "mps", d.restarts, d.faults) for uuid, d in state.backends.items()},
    )
