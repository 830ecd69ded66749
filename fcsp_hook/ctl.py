"""fcspctl: look at and check an FCSP host.

fcspctl status [--json]     tenants, their GPUs, shares and memory (from /run/fcsp)
fcspctl check-config [PATH] validate config.toml
fcspctl doctor              is this host set up right?
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fcsp_hook import abi, config, slot
from fcsp_hook.errors import FcspError

HOOKS_DIRS = (Path("/usr/share/containers/oci/hooks.d"), Path("/etc/containers/oci/hooks.d"))


@dataclass(frozen=True)
class DeviceRow:
    index: int
    gpu: str
    sm_requested_pct: float
    sm_effective_pct: float
    mem_used_bytes: int
    mem_quota: str


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
    for entry in sorted(base.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            yield read_tenant(entry)


def render_status(rows: list[TenantRow]) -> str:
    header = (
        "CONTAINER",
        "TENANT",
        "MODE",
        "GPU",
        "SM REQ",
        "SM EFF",
        "MEMORY USED / QUOTA",
        "PROCS",
    )
    lines = [header]
    for row in rows:
        if row.problem:
            lines.append((row.container_id[:12], "?", "?", "?", "?", "?", row.problem, "?"))
            continue
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
                    str(row.processes),
                )
            )
        for dev in row.devices:
            lines.append(
                (
                    row.container_id[:12],
                    row.tenant or "-",
                    row.mode,
                    dev.gpu,
                    f"{dev.sm_requested_pct:g}%",
                    f"{dev.sm_effective_pct:g}%",
                    f"{format_bytes(dev.mem_used_bytes)} / {dev.mem_quota}",
                    str(row.processes),
                )
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def cmd_status(cfg: config.Config, args: argparse.Namespace) -> int:
    rows = list(tenants(cfg.paths.run_dir))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    elif rows:
        print(render_status(rows))
    else:
        print(f"no FCSP tenants (no slots under {slot.tenants_dir(cfg.paths.run_dir)})")
    return 0


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
                python = json.loads(entry.read_text())["hook"]["path"]
            except (ValueError, KeyError, TypeError):
                return Check(False, "hooks.d", f"{entry} is not a valid hooks.d entry")
            probe = subprocess.run(
                [python, "-I", "-c", "import fcsp_hook.hook"], capture_output=True, check=False
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


def _check_engines() -> Check:
    engines = [e for e in ("podman", "docker", "containerd", "crio") if shutil.which(e)]
    return Check(bool(engines), "engines", ", ".join(engines) or "no container engine found")


def cmd_doctor(cfg: config.Config, args: argparse.Namespace) -> int:
    checks = [
        Check(True, "config", str(args.config)),
        _check_library(cfg),
        _check_hooks(),
        _check_run_dir(cfg),
        _check_gpus(cfg),
        _check_engines(),
    ]
    for check in checks:
        print(f"[{'ok' if check.ok else '!!'}] {check.what:8} {check.detail}")
    return 0 if all(c.ok for c in checks if c.what not in {"GPUs", "engines"}) else 1


COMMANDS: dict[str, Callable[[config.Config, argparse.Namespace], int]] = {
    "status": cmd_status,
    "check-config": cmd_check_config,
    "doctor": cmd_doctor,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcspctl", description="Look at and check an FCSP host.")
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH, help="config.toml path")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="tenants, GPUs, shares and memory")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    check = sub.add_parser("check-config", help="validate config.toml")
    check.add_argument("path", nargs="?", type=Path, help="file to check (default: --config)")
    sub.add_parser("doctor", help="is this host set up right?")
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
