"""fcspctl doctor: is this host set up right?"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fcsp_hook import config, linux, mps
from fcsp_hook.ctl.status import observer_state
from fcsp_hook.errors import FcspError
from fcsp_hook.slot import abi, files

HOOKS_DIRS = (Path("/usr/share/containers/oci/hooks.d"), Path("/etc/containers/oci/hooks.d"))


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
            from fcsp_hook.hook import hooksd  # noqa: PLC0415  # only doctor needs it

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
        files.ensure_tenants_dir(run_dir)
    except FcspError as exc:
        return Check(False, "slots", str(exc))
    return Check(True, "slots", f"{files.tenants_dir(run_dir)}")


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


def _check_kernel() -> Check:
    """open_tree/move_mount (Linux 5.2+): the hook bounds each tenant's usage file with them."""
    if linux.has_open_tree():
        return Check(True, "kernel", "open_tree: each tenant's usage file is size-bounded")
    return Check(False, "kernel", "no open_tree (Linux 5.2+): tenants' usage files are unbounded")


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
        _check_kernel(),
        _check_observer(cfg),
        _check_mps(cfg),
        _check_gpus(cfg),
        _check_nvml(),
        _check_engines(),
    ]
    for check in checks:
        print(f"[{'ok' if check.ok else '!!'}] {check.what:8} {check.detail}")
    # A GPU-less host (CI) is not a broken one: GPUs, NVML and engines only inform; so does
    # an old kernel, on which FCSP works with unbounded usage files.
    informative = {"GPUs", "NVML", "engines", "kernel"}
    return 0 if all(c.ok for c in checks if c.what not in informative) else 1
