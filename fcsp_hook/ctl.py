"""fcspctl: look at and check an FCSP host.

fcspctl status [--json]     tenants, their GPUs, shares and memory (from /run/fcsp)
fcspctl top                 the same, refreshed live
fcspctl set CONTAINER ...   resize a running tenant (--sm, --mem, --mode, --priority)
fcspctl check-config [PATH] validate config.toml
fcspctl doctor              is this host set up right?
fcspctl install --engine E  configure docker|podman|containerd|crio for FCSP (--dry-run)
fcspctl uninstall --engine E
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fcsp_hook import abi, config, mps, slot, slotio
from fcsp_hook import annotations as ann
from fcsp_hook.errors import FcspError, SlotError

HOOKS_DIRS = (Path("/usr/share/containers/oci/hooks.d"), Path("/etc/containers/oci/hooks.d"))


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


def _quota(dev: abi.LimitsDevice) -> str:
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


def read_tenant(directory: Path) -> TenantRow:
    """One tenant from its slot; a slot that cannot be read is reported, not fatal."""
    try:
        limits = slot.read_limits(directory / abi.LIMITS_FILE)
        usage = slot.read_usage(directory / abi.USAGE_FILE)
    except (FcspError, OSError) as exc:
        return TenantRow(directory.name, "", "?", "?", "?", 0, [], problem=str(exc))
    count = min(limits.device_count, abi.MAX_DEVICES)
    devices = [
        DeviceRow(
            index=i,
            gpu=limits.device[i].uuid.decode(errors="replace") or f"{limits.device[i].host_index}",
            sm_requested_pct=_percent(limits.device[i].sm_requested_centi),
            sm_effective_pct=_percent(limits.device[i].sm_effective_centi),
            mem_used_bytes=usage.device[i].mem_used_bytes,
            mem_quota=_quota(limits.device[i]),
            backend=mps.backend_name(limits.device[i].backend),
            turn_ms=_turn_ms(int(limits.device[i].turn)),
        )
        for i in range(count)
    ]
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
    base = slot.tenants_dir(run_dir)
    if not base.is_dir():
        return
    state = observer_state(run_dir)
    for entry in sorted(base.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            yield _with_observer_view(read_tenant(entry), state)


# ---- what the observer says ----------------------------------------------------------------

OBSERVER_STATE_FILE = "observer.json"
# Past this, the shims stop trusting the observer and run on their requests.
HEARTBEAT_STALE_NS = 1_000_000_000


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
    base = slot.tenants_dir(run_dir)
    newest = 0
    try:
        entries = list(base.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            newest = max(newest, slot.read_limits(entry / abi.LIMITS_FILE).observer_heartbeat_ns)
        except (FcspError, OSError):
            continue
    return slotio.monotonic_ns() - newest if newest else None


def observer_state(run_dir: Path) -> ObserverView:
    """Is fcsp-observer running, and what did it last publish (run_dir/observer.json)?"""
    try:
        doc = json.loads((run_dir / OBSERVER_STATE_FILE).read_text())
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
    stale = age is not None and age > HEARTBEAT_STALE_NS
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
            lines.append(f"{gpu}: mps, daemon pid {_int(info.get('pid'))}, {counts}")
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


def _with_observer_view(row: TenantRow, state: ObserverView) -> TenantRow:
    info = state.tenants.get(row.container_id)
    if not state.running or not isinstance(info, dict):
        return row
    active = _list(info.get("active"))
    throttled = _list(info.get("throttled_pct"))
    devices = [
        DeviceRow(
            **{
                **asdict(dev),
                "active": bool(active[i]) if i < len(active) else None,
                "throttled_pct": _int(throttled[i]) if i < len(throttled) else None,
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
        "PROCS",
        "STATE",
        "THROTTLED",
        "UNSHIMMED",
    )
    lines = [header]
    for row in rows:
        if row.problem:
            lines.append(
                (row.container_id[:12], "?", "?", "?", "?", "?", "?", row.problem) + ("?",) * 4
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
                    f"{format_bytes(dev.mem_used_bytes)} / {dev.mem_quota}",
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
    return text


def status_text(run_dir: Path) -> str:
    rows = list(tenants(run_dir))
    state = observer_state(run_dir)
    head = "\n".join([state.summary, *backend_lines(state), *clock_lines(state)])
    if not rows:
        return f"no FCSP tenants (no slots under {slot.tenants_dir(run_dir)})\n{head}"
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


def resolve_container(run_dir: Path, name: str) -> Path:
    """A slot by container id, unique id prefix, or tenant name (fcsp.tenant)."""
    base = slot.tenants_dir(run_dir)
    try:
        exact = slot.slot_path(run_dir, name)
    except SlotError:
        exact = None
    if exact is not None and exact.is_dir() and not exact.is_symlink():
        return exact
    try:
        entries = sorted(e for e in base.iterdir() if e.is_dir() and not e.is_symlink())
    except OSError:
        entries = []
    matches = [e for e in entries if e.name.startswith(name)]
    if not matches:
        matches = [e for e in entries if read_tenant(e).tenant == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise SlotError(f"{name!r} matches {len(matches)} tenants; give more of the id")
    raise SlotError(f"no tenant {name!r} under {base}")


def cmd_set(cfg: config.Config, args: argparse.Namespace) -> int:
    """Change a running tenant's limits in place, under the slot's seqlock."""
    directory = resolve_container(cfg.paths.run_dir, args.container)
    limits = slotio.LimitsMap(directory / abi.LIMITS_FILE)
    try:
        count = min(int(limits.view.device_count), abi.MAX_DEVICES)
        wanted = {
            k: v
            for k, v in (
                ("fcsp.sm", args.sm),
                ("fcsp.mem", args.mem),
                ("fcsp.mode", args.mode),
                ("fcsp.priority", args.priority),
            )
            if v is not None
        }
        if not wanted:
            raise SlotError("nothing to set: give --sm, --mem, --mode or --priority")
        # The same parser as the annotations: the same forms, the same one-line errors.
        request = ann.parse(wanted, count)
        targets = range(count) if args.device is None else [args.device]
        if args.device is not None and not 0 <= args.device < count:
            raise SlotError(f"--device {args.device}: the tenant sees GPUs 0 to {count - 1}")
        observer_alive = (
            limits.heartbeat_ns and slotio.monotonic_ns() - limits.heartbeat_ns < HEARTBEAT_STALE_NS
        )
        with limits.update() as view:
            _apply(view, request, wanted, targets, bool(observer_alive))
        generation = limits.generation
        on_mps = any(limits.view.device[i].backend == abi.Backend.MPS for i in targets)
    finally:
        limits.close()
    print(
        f"{directory.name}: {', '.join(f'{k}={v}' for k, v in wanted.items())} "
        f"(generation {generation})"
    )
    if on_mps and {"fcsp.sm", "fcsp.mode", "fcsp.priority"} & wanted.keys():
        # MPS reads a client's thread percentage once, when it connects.
        print(
            "note: this tenant is on MPS: its SM cap (strict, latency) changes for processes "
            "started from now on; running ones keep theirs"
        )
    return 0


def _apply(
    view: abi.Limits,
    request: ann.TenantRequest,
    wanted: dict[str, str],
    targets: range | list[int],
    observer_alive: bool,
) -> None:
    if "fcsp.mode" in wanted:
        view.isolation_mode = request.mode
    if "fcsp.priority" in wanted:
        view.priority = request.priority
    for i in targets:
        dev = view.device[i]
        if "fcsp.sm" in wanted:
            dev.sm_requested_centi = request.devices[i].sm_centi
            if not observer_alive:
                # No observer to recompute it: the new request is the share in force.
                dev.sm_effective_centi = request.devices[i].sm_centi
        if "fcsp.mem" in wanted:
            dev.mem_limit_bytes = request.devices[i].mem.bytes
            dev.mem_limit_basis_points = request.devices[i].mem.basis_points


def cmd_check_config(cfg: config.Config, args: argparse.Namespace) -> int:
    if not args.config.is_file():
        print(f"fcspctl: {args.config} does not exist (the defaults apply)", file=sys.stderr)
        return 1
    print(f"{args.config}: ok")
    return 0


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    detail: str


def _check_library(cfg: config.Config) -> Check:
    lib = cfg.hook.library
    if not lib.is_file():
        return Check(False, "library", f"{lib} is missing (make install)")
    with lib.open("rb") as f:
        is_elf = f.read(4) == b"\x7fELF"
    return Check(is_elf, "library", f"{lib}" if is_elf else f"{lib} is not an ELF library")


def _check_hooks() -> Check:
    for directory in HOOKS_DIRS:
        entry = directory / "fcsp.json"
        if entry.is_file():
            try:
                args = json.loads(entry.read_text())["hook"]["args"]
                python = str(args[0])
            except (ValueError, KeyError, TypeError, IndexError):
                return Check(False, "hooks.d", f"{entry} is not a valid hooks.d entry")
            from fcsp_hook import hooksd  # noqa: PLC0415  # only doctor needs it

            probe = subprocess.run(
                hooksd.import_probe([str(a) for a in args]), capture_output=True, check=False
            )
            if probe.returncode != 0:
                return Check(False, "hooks.d", f"{entry}: {python} cannot import fcsp_hook")
            return Check(True, "hooks.d", f"{entry} (podman, CRI-O)")
    return Check(False, "hooks.d", f"no fcsp.json in {' or '.join(map(str, HOOKS_DIRS))}")


def _check_run_dir(cfg: config.Config) -> Check:
    run_dir = cfg.paths.run_dir
    try:
        slot.ensure_tenants_dir(run_dir)
    except FcspError as exc:
        return Check(False, "slots", str(exc))
    return Check(True, "slots", f"{slot.tenants_dir(run_dir)}")


def _check_gpus(cfg: config.Config) -> Check:
    from fcsp_hook.gpus import host_gpu_indices  # noqa: PLC0415  # only doctor needs it

    found = host_gpu_indices(cfg.paths.dev_dir)
    return Check(
        bool(found), "GPUs", f"/dev/nvidia{found}" if found else "no /dev/nvidia<N> on this host"
    )


def _check_mps(cfg: config.Config) -> Check:
    """Every GPU config.toml puts on MPS has a daemon serving tenants."""
    from fcsp_hook.gpus import host_gpu_uuids  # noqa: PLC0415  # only doctor needs it

    if not cfg.backend.any_mps:
        return Check(True, "MPS", "no GPU uses the mps backend")
    wanted = [
        uuid
        for index, uuid in sorted(host_gpu_uuids(cfg.paths.driver_dir).items())
        if cfg.backend.for_gpu(uuid, index) == abi.Backend.MPS
    ]
    if not wanted:
        return Check(True, "MPS", "configured, but no such GPU on this host")
    down = [u for u in wanted if not mps.ready(cfg.paths.run_dir, u)]
    if down:
        why = str(mps.read_state(cfg.paths.run_dir, down[0]).get("error") or "no daemon")
        return Check(False, "MPS", f"{len(down)} of {len(wanted)} MPS GPUs time-sliced: {why}")
    return Check(True, "MPS", f"a daemon serves each of {len(wanted)} MPS GPUs")


def _check_observer(cfg: config.Config) -> Check:
    state = observer_state(cfg.paths.run_dir)
    return Check(state.running, "observer", state.summary)


def _check_nvml() -> Check:
    from fcsp_hook import nvml  # noqa: PLC0415  # only doctor needs NVML

    probe = nvml.Nvml()
    try:
        gpus = probe.inventory()
    finally:
        probe.close()
    if not probe.available:
        return Check(False, "NVML", probe.reason)
    return Check(True, "NVML", f"{len(gpus)} GPU(s): " + ", ".join(g.uuid for g in gpus))


def _check_engines() -> Check:
    engines = [e for e in ("podman", "docker", "containerd", "crio") if shutil.which(e)]
    return Check(bool(engines), "engines", ", ".join(engines) or "no container engine found")


def cmd_doctor(cfg: config.Config, args: argparse.Namespace) -> int:
    checks = [
        Check(True, "config", str(args.config)),
        _check_library(cfg),
        _check_hooks(),
        _check_run_dir(cfg),
        _check_observer(cfg),
        _check_mps(cfg),
        _check_gpus(cfg),
        _check_nvml(),
        _check_engines(),
    ]
    for check in checks:
        print(f"[{'ok' if check.ok else '!!'}] {check.what:8} {check.detail}")
    # A GPU-less host (CI) is not a broken one: GPUs, NVML and engines only inform.
    return 0 if all(c.ok for c in checks if c.what not in {"GPUs", "NVML", "engines"}) else 1


def _engine_change(args: argparse.Namespace, action: str) -> int:
    from fcsp_hook import engines  # noqa: PLC0415  # only install/uninstall need it

    settings = engines.Settings(
        root=args.root,
        runtime_path=args.runtime_path,
        config_path=args.config,
        default_runtime=getattr(args, "default_runtime", False),
        file=args.file,
        containerd_version=getattr(args, "containerd_version", None),
    )
    change = engines.plan(args.engine, action, settings)
    if not change.changed:
        print(f"{change.path}: already {'configured' if action == 'install' else 'clean'}")
    elif args.dry_run:
        sys.stdout.write(engines.diff(change))
        print(f"(dry run: {change.path} not written)")
    else:
        backup = engines.apply(change)
        verb = "removed" if change.new is None else "wrote"
        print(f"{verb} {change.path}" + (f" (backup: {backup})" if backup else ""))
    if change.changed and not args.dry_run:
        for note in change.notes:
            print(f"note: {note}")
    return 0


def cmd_install(cfg: config.Config, args: argparse.Namespace) -> int:
    return _engine_change(args, "install")


def cmd_uninstall(cfg: config.Config, args: argparse.Namespace) -> int:
    return _engine_change(args, "uninstall")


COMMANDS: dict[str, Callable[[config.Config, argparse.Namespace], int]] = {
    "status": cmd_status,
    "top": cmd_top,
    "set": cmd_set,
    "check-config": cmd_check_config,
    "doctor": cmd_doctor,
    "install": cmd_install,
    "uninstall": cmd_uninstall,
}


def _engine_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    parser.add_argument(
        "--engine", required=True, choices=("docker", "podman", "containerd", "crio")
    )
    parser.add_argument("--dry-run", action="store_true", help="print the change as a diff")
    parser.add_argument("--root", type=Path, default=Path("/"), help="prefix of every file")
    parser.add_argument("--file", type=Path, help="the engine's file, if not the usual one")
    parser.add_argument(
        "--runtime-path", default="/usr/local/bin/fcsp-runtime", help="fcsp-runtime's path"
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcspctl", description="Look at and check an FCSP host.")
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH, help="config.toml path")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="tenants, GPUs, shares and memory")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    top = sub.add_parser("top", help="status, refreshed live")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    top.add_argument("--count", type=int, default=None, help="stop after this many frames")
    resize = sub.add_parser("set", help="resize a running tenant (takes effect within a tick)")
    resize.add_argument("container", help="container id, unique id prefix, or tenant name")
    resize.add_argument("--sm", help=f"compute share: {ann.SM_FORM}")
    resize.add_argument("--mem", help=f"memory quota: {ann.MEM_FORM}")
    resize.add_argument("--mode", help=f"isolation mode: {ann.MODE_FORM}")
    resize.add_argument("--priority", help=f"priority: {ann.PRIORITY_FORM}")
    resize.add_argument("--device", type=int, help="only the i-th GPU the container sees")
    check = sub.add_parser("check-config", help="validate config.toml")
    check.add_argument("path", nargs="?", type=Path, help="file to check (default: --config)")
    sub.add_parser("doctor", help="is this host set up right?")
    install = _engine_parser(sub, "install", "configure a container engine for FCSP")
    install.add_argument(
        "--default-runtime", action="store_true", help="docker: make fcsp the default runtime"
    )
    install.add_argument(
        "--containerd-version",
        type=int,
        choices=(2, 3),
        help="config version for a new containerd file (default: from `containerd --version`)",
    )
    _engine_parser(sub, "uninstall", "undo `fcspctl install` for an engine")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "path", None):
        args.config = args.path
    try:
        cfg = config.load(args.config)
        return COMMANDS[args.command](cfg, args)
    except FcspError as exc:
        print(f"fcspctl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
