"""fcspctl set: resize a running tenant in place, under its slot's seqlock."""

from __future__ import annotations

import argparse
from pathlib import Path

from fcsp_hook import annotations as ann
from fcsp_hook import config
from fcsp_hook.ctl.status import read_tenant
from fcsp_hook.errors import SlotError
from fcsp_hook.slot import abi, files, live, rules


def resolve_container(run_dir: Path, name: str) -> Path:
    """A slot by container id, unique id prefix, or tenant name (fcsp.tenant)."""
    base = files.tenants_dir(run_dir)
    try:
        exact = files.slot_path(run_dir, name)
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
    limits = live.LimitsMap(directory / abi.LIMITS_FILE)
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
        observer_alive = rules.observer_alive(limits.heartbeat_ns, live.monotonic_ns())
        with limits.update() as view:
            _apply(view, request, wanted, targets, observer_alive)
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
            rules.request_share(dev, request.devices[i].sm_centi, observer_alive)
        if "fcsp.mem" in wanted:
            dev.mem_limit_bytes = request.devices[i].mem.bytes
            dev.mem_limit_basis_points = request.devices[i].mem.basis_points
