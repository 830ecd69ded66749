"""fcsp-hook: the OCI hook.  `prestart` gives a container its slot and the shim;
`poststop` removes the slot; `oci` picks one of the two from the state's status (so
one hooks.d entry serves both stages).

Steps of prestart, each a small function: read state -> read bundle -> find GPUs ->
parse annotations -> create slot -> mount into the container.  Nothing here touches
CUDA or NVML.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from fcsp_hook import abi, config, gpus, mounts, oci, slot
from fcsp_hook import annotations as fcsp_annotations
from fcsp_hook.errors import FcspError, HookError
from fcsp_hook.log import HookLogger

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

PRESTART_STATUSES = {"creating", "created"}
POSTSTOP_STATUSES = {"stopped"}


@dataclass(frozen=True)
class Setup:
    """What prestart decided for one container."""

    request: fcsp_annotations.TenantRequest
    gpus: tuple[gpus.Gpu, ...]
    pid: int
    rootfs: Path


def slot_spec(container_id: str, setup: Setup) -> slot.SlotSpec:
    request = setup.request
    devices = tuple(
        slot.DeviceLimits(
            host_index=gpu.host_index,
            uuid=gpu.uuid,
            mem_limit_bytes=dev.mem.bytes,
            mem_limit_basis_points=dev.mem.basis_points,
            sm_requested_centi=dev.sm_centi,
        )
        for gpu, dev in zip(setup.gpus, request.devices, strict=True)
    )
    return slot.SlotSpec(
        container_id=container_id,
        tenant=request.tenant,
        isolation_mode=request.mode,
        mem_mode=request.mem_mode,
        priority=request.priority,
        devices=devices,
    )


def plan_setup(state: oci.State, cfg: config.Config, log: HookLogger) -> Setup | None:
    """Validate everything before anything is created.  None: not ours to touch."""
    bundle = oci.read_bundle_config(state.bundle)
    if not bundle.readable:
        log.warning("bundle config unreadable; using the OCI state alone", problem=bundle.problem)
    visible = oci.env_value(bundle.env, "NVIDIA_VISIBLE_DEVICES")
    found = tuple(gpus.visible_gpus(visible, bundle.devices, cfg.paths.dev_dir))
    request = fcsp_annotations.parse(
        state.annotations, len(found), cfg.defaults.mode, cfg.defaults.mem_mode
    )
    if not found:
        log.info("no GPU requested; container left untouched", nvidia_visible_devices=visible)
        return None
    if state.pid is None:
        raise HookError("the OCI state has no pid; prestart needs the container's init process")
    rootfs = bundle.root or Path(os.readlink(f"/proc/{state.pid}/cwd"))
    if not cfg.hook.library.is_file():
        raise HookError(f"{cfg.hook.library} is missing; run `make install` or set [hook] library")
    return Setup(request=request, gpus=found, pid=state.pid, rootfs=rootfs)


def prestart(state: oci.State, cfg: config.Config, log: HookLogger) -> None:
    started = time.monotonic()
    if not fcsp_annotations.has_fcsp_annotations(state.annotations):
        return
    setup = plan_setup(state, cfg, log)
    if setup is None:
        return
    slot.ensure_tenants_dir(cfg.paths.run_dir)
    slot_dir = slot.slot_path(cfg.paths.run_dir, state.id)
    placeholders = {mounts.LIBRARY_NAME: (b"", 0o644), mounts.PRELOAD_NAME: (b"", 0o644)}
    slot.write_slot(slot_dir, slot_spec(state.id, setup), placeholders)
    try:
        mounts.install(mounts.MountPlan(setup.pid, setup.rootfs, slot_dir, cfg.hook.library))
    except BaseException:
        slot.remove_slot(cfg.paths.run_dir, state.id)
        raise
    log.info(
        "tenant slot ready",
        slot=str(slot_dir),
        gpus=[g.describe() for g in setup.gpus],
        sm_percent=[d.sm_centi / abi.CENTI_PER_PERCENT for d in setup.request.devices],
        mem_bytes=[d.mem.bytes for d in setup.request.devices],
        mode=setup.request.mode.name.lower(),
        duration_ms=round((time.monotonic() - started) * 1000, 2),
    )


def poststop(state: oci.State, cfg: config.Config, log: HookLogger) -> None:
    removed = slot.remove_slot(cfg.paths.run_dir, state.id)
    log.info("tenant slot removed" if removed else "no tenant slot to remove")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fcsp-hook", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH, help="config.toml path")
    parser.add_argument("stage", choices=("prestart", "poststop", "oci"), help="hook stage")
    return parser.parse_args(argv)


def _stage_for(requested: str, status: str) -> str:
    if requested != "oci":
        return requested
    if status in PRESTART_STATUSES:
        return "prestart"
    if status in POSTSTOP_STATUSES:
        return "poststop"
    raise HookError(f"OCI state status {status!r} is neither creating/created nor stopped")


def run(stage: str, raw_state: bytes, cfg: config.Config, log: HookLogger) -> int:
    state = oci.parse_state(raw_state)
    log.bind(container_id=state.id)
    stage = _stage_for(stage, state.status)
    log.bind(stage=stage)
    if stage == "poststop":
        try:
            poststop(state, cfg, log)
        except (FcspError, OSError) as exc:
            log.warning(
                "poststop could not remove the slot; the observer will reap it", error=str(exc)
            )
        return EXIT_OK  # poststop must never fail a container's removal
    prestart(state, cfg, log)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    log = HookLogger(path=None)
    fail_open = False
    try:
        cfg = config.load(args.config)
        log = HookLogger(path=cfg.hook.log_file)
        fail_open = cfg.hook.failure_policy == config.FAIL_OPEN
        return run(args.stage, sys.stdin.buffer.read(oci.MAX_STATE_BYTES + 1), cfg, log)
    except FcspError as exc:
        log.error(str(exc), failure_policy="fail-open" if fail_open else "fail-closed")
    except Exception as exc:  # a bug: say so in one line, keep the traceback in the log
        log.error(f"internal error: {type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    # poststop must never fail a container's removal; the observer reaps what it missed.
    return EXIT_OK if fail_open or args.stage == "poststop" else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
