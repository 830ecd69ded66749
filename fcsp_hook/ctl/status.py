"""fcspctl status and top: tenants, their GPUs, shares and memory, from the slots under
/run/fcsp and what fcsp-observer last published."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fcsp_hook import config, inventory, mps
from fcsp_hook.errors import FcspError
from fcsp_hook.observer import STATE_FILE
from fcsp_hook.slot import abi, files, live, rules


@dataclass(frozen=True)
class DeviceRow:
    index: int
    gpu: str
    sm_requested_pct: float
    sm_effective_pct: float
    mem_used_bytes: int
    mem_quota: str
    backend: str = "timeslice"
    # Its window of the observer's turn cycle, in ms: (start, length, cycle); None: no turns.
    turn_ms: tuple[float, float, float] | None = None
    # From the observer's state file; None while no observer runs.
    active: bool | None = None
    throttled_pct: int | None = None
    # Memory against the quota (slot.rules.pressure_level): ok, warning, high, critical;
    # None without a quota.  The observer's when it runs, else computed from the slot.
    pressure: str | None = None
    # Spill mode: bytes served past the quota from host memory, their peak, and unified
    # memory moved to the GPU and to the host (the tenant's report, bounded).
    mem_spilled_bytes: int = 0
    mem_spill_peak_bytes: int = 0
    mem_migrated_in_bytes: int = 0
    mem_migrated_out_bytes: int = 0


@dataclass(frozen=True)
class TenantRow:
    container_id: str
    tenant: str
    mode: str
    mem_mode: str
    priority: str
    processes: int
    devices: list[DeviceRow]
    problem: str = ""
    unshimmed_host_pids: list[int] = field(default_factory=list)
    dead_processes: list[int] = field(default_factory=list)
    mps_faults: int = 0
    outside_mps_host_pids: list[int] = field(default_factory=list)
    mps_client_host_pids: list[int] = field(default_factory=list)
    # Of the time the observer keeps it frozen for using more than its share by the
    # driver's count (the host's backstop); 0: never.
    held_pct: int = 0


def _quota(dev: abi.LimitsDevice) -> str:
    """As the tenant asked for it: the slot keeps both forms (slot.rules.memory_quota)."""
    if dev.mem_limit_bytes:
        return format_bytes(dev.mem_limit_bytes)
    if dev.mem_limit_basis_points:
        return f"{dev.mem_limit_basis_points / abi.CENTI_PER_PERCENT:g}%"
    return "-"


def format_bytes(value: int) -> str:
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f}{unit}i"
    return f"{value}B"


def _percent(centi: int) -> float:
    # The usage file is the tenant's: clamp rather than trust.
    return min(max(centi, 0), abi.WHOLE_GPU_CENTI) / abi.CENTI_PER_PERCENT


@dataclass(frozen=True)
class Inventory:
    """The host's GPUs as fcsp-observer last read them from NVML (<run_dir>/gpus.json):
    memory total per UUID, UUID per minor; empty when it never ran."""

    totals: dict[str, int] = field(default_factory=dict)
    minors: dict[int, str] = field(default_factory=dict)

    def memory_total(self, dev: abi.LimitsDevice) -> int:
        uuid = dev.uuid.decode(errors="replace")
        return self.totals.get(inventory.gpu_key(uuid, int(dev.host_index), self.minors), 0)


def _pressure(used: int, dev: abi.LimitsDevice, pressure_pct: int, gpus: Inventory) -> str | None:
    """The observer's rule on the slot: the level of the memory held against the quota
    (None without one, or a percentage of a GPU whose total is unknown)."""
    quota = rules.device_memory_quota(dev, gpus.memory_total(dev))
    return rules.pressure_level(used, quota, pressure_pct).name.lower() if quota else None


def read_tenant(directory: Path, gpus: Inventory | None = None) -> TenantRow:
    """One tenant from its slot; a slot that cannot be read is reported, not fatal."""
    try:
        limits = files.read_limits(directory / abi.LIMITS_FILE)
        usage = files.read_usage(directory / abi.USAGE_FILE)
    except (FcspError, OSError) as exc:
        return TenantRow(directory.name, "", "?", "?", "?", 0, [], problem=str(exc))
    gpus = gpus if gpus is not None else Inventory()
    count = min(limits.device_count, abi.MAX_DEVICES)
    devices = []
    for i in range(count):
        dev = limits.device[i]
        used = live.device_usage(usage.device[i])  # the tenant's report: bounded
        devices.append(
            DeviceRow(
                index=i,
                gpu=dev.uuid.decode(errors="replace") or f"{dev.host_index}",
                sm_requested_pct=_percent(dev.sm_requested_centi),
                sm_effective_pct=_percent(dev.sm_effective_centi),
                mem_used_bytes=used.mem_used_bytes,
                mem_quota=_quota(dev),
                backend=mps.backend_name(dev.backend),
                turn_ms=_turn_ms(int(dev.turn)),
                pressure=_pressure(used.mem_used_bytes, dev, int(limits.pressure_pct), gpus),
                mem_spilled_bytes=used.mem_spilled_bytes,
                mem_spill_peak_bytes=used.mem_spill_peak_bytes,
                mem_migrated_in_bytes=used.mem_migrated_in_bytes,
                mem_migrated_out_bytes=used.mem_migrated_out_bytes,
            )
        )
    return TenantRow(
        container_id=limits.container_id.decode(errors="replace"),
        tenant=limits.tenant.decode(errors="replace"),
        mode=_enum_name(abi.IsolationMode, limits.isolation_mode),
        mem_mode=_enum_name(abi.MemMode, limits.mem_mode),
        priority=_enum_name(abi.Priority, limits.priority).replace("_", "-"),
        processes=sum(1 for p in usage.proc if p.state == abi.ProcState.LIVE),
        devices=devices,
    )


def _enum_name(
    enum: type[abi.IsolationMode] | type[abi.MemMode] | type[abi.Priority], value: int
) -> str:
    try:
        return enum(value).name.lower()
    except ValueError:
        return f"?{value}"


def tenants(run_dir: Path) -> Iterator[TenantRow]:
    base = files.tenants_dir(run_dir)
    if not base.is_dir():
        return
    state = observer_state(run_dir)
    gpus = Inventory(*inventory.read(run_dir))
    for entry in sorted(base.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            yield _with_observer_view(read_tenant(entry, gpus), state)


# ---- what the observer says ----------------------------------------------------------------


@dataclass(frozen=True)
class ObserverView:
    running: bool
    summary: str
    heartbeat_age_ms: float | None = None
    # Parsed JSON from the observer: read defensively where used.
    gpus: dict[str, Any] = field(default_factory=dict)
    tenants: dict[str, Any] = field(default_factory=dict)
    nvml: str = ""
    backends: dict[str, Any] = field(default_factory=dict)
    clocks: dict[str, Any] = field(default_factory=dict)


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _heartbeat_age_ns(run_dir: Path) -> int | None:
    """Age of the newest observer heartbeat in any slot; None if no slot has one."""
    base = files.tenants_dir(run_dir)
    newest = 0
    try:
        entries = list(base.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            newest = max(newest, files.read_limits(entry / abi.LIMITS_FILE).observer_heartbeat_ns)
        except (FcspError, OSError):
            continue
    return live.monotonic_ns() - newest if newest else None


def observer_state(run_dir: Path) -> ObserverView:
    """Is fcsp-observer running, and what did it last publish (run_dir/observer.json)?"""
    try:
        doc = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        doc = None
    age = _heartbeat_age_ns(run_dir)
    age_ms = None if age is None else age / 1e6
    if not isinstance(doc, dict) or not _pid_alive(doc.get("pid")):
        return ObserverView(False, "fcsp-observer is not running", age_ms)
    gpus: dict[str, Any] = doc["gpus"] if isinstance(doc.get("gpus"), dict) else {}
    tenants_doc: dict[str, Any] = doc["tenants"] if isinstance(doc.get("tenants"), dict) else {}
    worst = max(
        (_int(g.get("contention_pct")) for g in gpus.values() if isinstance(g, dict)), default=0
    )
    beat = "no tenants" if age_ms is None else f"heartbeat {age_ms:.0f} ms ago"
    stale = age is not None and age > rules.OBSERVER_STALE_NS
    return ObserverView(
        running=not stale,
        summary=(
            f"fcsp-observer pid {doc['pid']}: {beat}"
            f"{' (STALE: shims run on their requests)' if stale else ''}, "
            f"contention {worst / 100:.2f}, "
            + ("NVML ok" if doc.get("nvml") == "ok" else str(doc.get("nvml", "NVML ?")))
        ),
        heartbeat_age_ms=age_ms,
        gpus=gpus,
        tenants=tenants_doc,
        nvml=str(doc.get("nvml", "")),
        backends=doc["backends"] if isinstance(doc.get("backends"), dict) else {},
        clocks=doc["clocks"] if isinstance(doc.get("clocks"), dict) else {},
    )


def backend_lines(state: ObserverView) -> list[str]:
    """One line per GPU the observer runs an MPS daemon for (other GPUs are time-sliced)."""
    lines = []
    for gpu, info in sorted(state.backends.items()):
        if not isinstance(info, dict):
            continue
        counts = f"restarts {_int(info.get('restarts'))}, faults {_int(info.get('faults'))}"
        if info.get("backend") == "mps":
            threads = _int(info.get("threads_pct"))
            most = f"any client at most {threads} % of the SMs, " if 0 < threads < 100 else ""
            lines.append(f"{gpu}: mps, daemon pid {_int(info.get('pid'))}, {most}{counts}")
        else:
            error = str(info.get("error", ""))[:200]
            lines.append(f"{gpu}: mps FAILED, tenants time-sliced: {error} ({counts})")
    return lines


def clock_lines(state: ObserverView) -> list[str]:
    """One line per GPU under clock_normalise = "full-load": what kernels are charged."""
    lines = []
    for gpu, info in sorted(state.clocks.items()):
        if not isinstance(info, dict):
            continue
        full_load, now = _int(info.get("full_load_mhz")), _int(info.get("sm_mhz"))
        scale = _int(info.get("scale_centi"))
        if full_load <= 0 or scale <= 0:
            lines.append(
                f"{gpu}: SM {now} MHz, full-load clock not learned yet "
                "(never busy at its power limit)"
            )
        else:
            power = info.get("power_w")
            drawn = f", {power:.0f} W" if isinstance(power, int | float) else ""
            lines.append(
                f"{gpu}: SM {now} MHz, full load {full_load} MHz: kernels charged "
                f"x{scale / 10000:.2f} of their time (busy {_int(info.get('util_pct'))} %{drawn})"
            )
    return lines


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


PRESSURE_NAMES = frozenset(p.name.lower() for p in rules.Pressure)


def _published_level(value: object, dev: DeviceRow) -> str | None:
    """The observer's level of a device (it knows each GPU's total from NVML; None: no
    quota) where it published one, else the one status computed from the slot."""
    if value is None or value in PRESSURE_NAMES:
        return value
    return dev.pressure


def _with_observer_view(row: TenantRow, state: ObserverView) -> TenantRow:
    info = state.tenants.get(row.container_id)
    if not state.running or not isinstance(info, dict):
        return row
    active = _list(info.get("active"))
    throttled = _list(info.get("throttled_pct"))
    pressure = _list(info.get("pressure"))
    devices = [
        DeviceRow(
            **{
                **asdict(dev),
                "active": bool(active[i]) if i < len(active) else None,
                "throttled_pct": _int(throttled[i]) if i < len(throttled) else None,
                "pressure": _published_level(pressure[i] if i < len(pressure) else "", dev),
            }
        )
        for i, dev in enumerate(row.devices)
    ]
    return TenantRow(
        **{
            **asdict(row),
            "devices": devices,
            "unshimmed_host_pids": [_int(p) for p in _list(info.get("unshimmed_host_pids"))],
            "dead_processes": [_int(p) for p in _list(info.get("dead_processes"))],
            "mps_faults": _int(info.get("mps_faults")),
            "outside_mps_host_pids": [_int(p) for p in _list(info.get("outside_mps_host_pids"))],
            "mps_client_host_pids": [_int(p) for p in _list(info.get("mps_client_host_pids"))],
            "held_pct": _int(info.get("held_pct")),
        }
    )


def render_status(rows: list[TenantRow]) -> str:
    header = (
        "CONTAINER",
        "TENANT",
        "MODE",
        "GPU",
        "BACKEND",
        "SM REQ",
        "SM EFF",
        "MEMORY USED / QUOTA",
        "PRESSURE",
        "PROCS",
        "STATE",
        "THROTTLED",
        "UNSHIMMED",
    )
    lines = [header]
    for row in rows:
        if row.problem:
            lines.append(
                (row.container_id[:12], "?", "?", "?", "?", "?", "?", row.problem) + ("?",) * 5
            )
            continue
        unshimmed = str(len(row.unshimmed_host_pids)) if row.unshimmed_host_pids else "-"
        if not row.devices:
            lines.append(
                (
                    row.container_id[:12],
                    row.tenant or "-",
                    row.mode,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    str(row.processes),
                    "-",
                    "-",
                    unshimmed,
                )
            )
        for dev in row.devices:
            lines.append(
                (
                    row.container_id[:12],
                    row.tenant or "-",
                    row.mode,
                    dev.gpu,
                    dev.backend,
                    f"{dev.sm_requested_pct:g}%",
                    f"{dev.sm_effective_pct:g}%",
                    _memory(dev, row),
                    dev.pressure or "-",
                    str(row.processes),
                    _state(dev, row),
                    "-" if dev.throttled_pct is None else f"{dev.throttled_pct}%",
                    unshimmed,
                )
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _memory(dev: DeviceRow, row: TenantRow) -> str:
    """Used / quota; a spill tenant's bytes in host memory after them."""
    text = f"{format_bytes(dev.mem_used_bytes)} / {dev.mem_quota}"
    if row.mem_mode == abi.MemMode.SPILL.name.lower():
        text += f" +{format_bytes(dev.mem_spilled_bytes)} spilled"
    return text


def _turn_ms(word: int) -> tuple[float, float, float] | None:
    cycle, start, length = abi.unpack_turn(word)
    return (start / 1000, length / 1000, cycle / 1000) if cycle else None


def _state(dev: DeviceRow, row: TenantRow) -> str:
    text = "-" if dev.active is None else ("active" if dev.active else "idle")
    if dev.turn_ms is not None:
        start, length, cycle = dev.turn_ms
        text += f", turn {start:g}-{start + length:g} of {cycle:g} ms"
    if dev.backend == "mps" and row.mps_faults:
        text += f", {row.mps_faults} MPS fault{'s' if row.mps_faults > 1 else ''}"
    if dev.backend == "mps" and row.outside_mps_host_pids:
        text += f", {len(row.outside_mps_host_pids)} outside MPS"
    if dev.backend == "mps" and len(row.mps_client_host_pids) > 1:
        text += f", {len(row.mps_client_host_pids)} MPS processes"
    if row.held_pct:
        text += f", HELD {row.held_pct}% by the host"
    return text


def status_text(run_dir: Path) -> str:
    rows = list(tenants(run_dir))
    state = observer_state(run_dir)
    head = "\n".join([state.summary, *backend_lines(state), *clock_lines(state)])
    if not rows:
        return f"no FCSP tenants (no slots under {files.tenants_dir(run_dir)})\n{head}"
    # The table first (scripts and eyes look there), the observer's line under it.
    return f"{render_status(rows)}\n\n{head}"


def cmd_status(cfg: config.Config, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([asdict(r) for r in tenants(cfg.paths.run_dir)], indent=2))
    else:
        print(status_text(cfg.paths.run_dir))
    return 0


def cmd_top(cfg: config.Config, args: argparse.Namespace) -> int:
    """status, redrawn every --interval seconds until Ctrl-C (or --count frames)."""
    frames = 0
    try:
        while args.count is None or frames < args.count:
            if frames and args.interval > 0:
                time.sleep(args.interval)
            clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
            stamp = time.strftime("%H:%M:%S")
            print(f"{clear}fcspctl top  {stamp}\n{status_text(cfg.paths.run_dir)}", flush=True)
            frames += 1
    except KeyboardInterrupt:
        pass
    return 0
