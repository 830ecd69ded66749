"""prestart: give a container its slot and the shim.

Steps, each a small function: read the bundle -> find GPUs -> parse annotations ->
create the slot -> mount into the container.  Everything is validated before
anything is created.  Nothing here touches CUDA or NVML.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fcsp_hook import annotations as fcsp_annotations
from fcsp_hook import cgroups, config, gpus, inventory, linux, mps, oci, procfs
from fcsp_hook.errors import HookError
from fcsp_hook.hook import admission, mounts
from fcsp_hook.log import HookLogger
from fcsp_hook.slot import abi, files, kubernetes, rules, uvm


@dataclass(frozen=True)
class Setup:
    """What prestart decided for one container."""

    request: fcsp_annotations.TenantRequest
    gpus: tuple[gpus.Gpu, ...]
    pid: int
    rootfs: Path
    # Per GPU: what the tenant gets (mps only for a single-GPU tenant whose daemon runs).
    backends: tuple[abi.Backend, ...] = ()
    # MPS: the share latency tenants already on the GPU keep free for themselves.
    mps_reserved_centi: int = 0

    @property
    def mps_gpu(self) -> str:
        """The UUID whose MPS daemon the tenant is a client of, or ''."""
        if self.backends == (abi.Backend.MPS,):
            return self.gpus[0].uuid
        return ""


def choose_backends(
    found: tuple[gpus.Gpu, ...], cfg: config.Config, log: HookLogger
) -> tuple[abi.Backend, ...]:
    """mps where config.toml asks for it and it can work, else timeslice (logged)."""
    wanted = [cfg.backend.for_gpu(g.uuid, g.host_index) for g in found]
    timeslice = tuple(abi.Backend.TIMESLICE for _ in found)
    if abi.Backend.MPS not in wanted:
        return timeslice
    if len(found) != 1:
        log.warning(
            "MPS serves single-GPU containers only (one process reaches one daemon); "
            "this container is time-sliced",
            gpus=[g.describe() for g in found],
        )
        return timeslice
    if not mps.ready(cfg.paths.run_dir, found[0].uuid):
        try:
            client = str(mps.client_dir(cfg.paths.run_dir, found[0].uuid))
        except ValueError:
            client = "none: the GPU's UUID is unknown (no driver procfs file names it)"
        log.warning(
            "GPU is configured for MPS but no daemon serves it (no control socket in a "
            "directory at client_dir; is fcsp-observer up?); this container is time-sliced",
            gpu=found[0].describe(),
            client_dir=client,
            state=mps.read_state(cfg.paths.run_dir, found[0].uuid),
        )
        return timeslice
    return (abi.Backend.MPS,)


def slot_spec(container_id: str, setup: Setup, init_start_time: int = 0) -> files.SlotSpec:
    request = setup.request
    spill = request.mem_spill if request.mem_mode == abi.MemMode.SPILL else None
    devices = tuple(
        files.DeviceLimits(
            host_index=gpu.host_index,
            uuid=gpu.uuid,
            mem_limit_bytes=dev.mem.bytes,
            mem_limit_basis_points=dev.mem.basis_points,
            sm_requested_centi=dev.sm_centi,
            backend=backend,
            mps_threads_centi=mps.threads_centi(
                dev.sm_centi, request.mode, request.priority, setup.mps_reserved_centi
            )
            if backend == abi.Backend.MPS
            else 0,
            mem_spill_bytes=spill.bytes if spill else 0,
            mem_spill_centi=spill.centi if spill else 0,
        )
        for gpu, dev, backend in zip(
            setup.gpus,
            request.devices,
            setup.backends or [abi.Backend.TIMESLICE] * len(setup.gpus),
            strict=True,
        )
    )
    return files.SlotSpec(
        container_id=container_id,
        tenant=request.tenant,
        isolation_mode=request.mode,
        mem_mode=request.mem_mode,
        priority=request.priority,
        devices=devices,
        uvm=uvm.PROFILES[request.uvm_profile],
        init_host_pid=setup.pid,
        init_start_time=init_start_time,
    )


def plan_setup(state: oci.State, cfg: config.Config, log: HookLogger) -> Setup | None:
    """Validate everything before anything is created.  None: not ours to touch."""
    bundle = oci.read_bundle_config(state.bundle)
    if bundle.malformed:
        # The runtime read it; we cannot, so we cannot tell which GPUs the container gets.
        raise HookError(bundle.problem)
    if not bundle.readable:
        log.warning("bundle config unreadable; using the OCI state alone", problem=bundle.problem)
    # Not ours: a pod's sandbox or a container without a GPU gets the pod's annotations
    # too (containerd, CRI-O); it is left alone before any fcsp.* value is checked.
    sandbox = fcsp_annotations.sandbox_mark(state.annotations)
    if sandbox:
        log.info("pod sandbox container; left untouched", sandbox=sandbox)
        return None
    visible = oci.env_value(bundle.env, gpus.VISIBLE_DEVICES)
    discovery = gpus.discover(
        visible,
        bundle.devices,
        bundle.mounts,
        cfg.paths.dev_dir,
        gpus.host_gpu_uuids(cfg.paths.driver_dir),
    )
    found = discovery.gpus
    if not found:
        log.info("no GPU requested; container left untouched", nvidia_visible_devices=visible)
        return None
    if discovery.disagreement:
        log.warning(discovery.disagreement, gpus=[g.describe() for g in found])
    request = fcsp_annotations.parse(
        state.annotations, len(found), cfg.defaults.mode, cfg.defaults.mem_mode
    )
    if request.mem_mode == abi.MemMode.SPILL:
        check_spill_fits_host(request, found, cfg.paths.run_dir)
    if state.pid is None:
        raise HookError("the OCI state has no pid; prestart needs the container's init process")
    rootfs = bundle.root or _init_cwd(state.pid)
    if not cfg.hook.library.is_file():
        raise HookError(f"{cfg.hook.library} is missing; run `make install` or set [hook] library")
    backends = choose_backends(found, cfg, log)
    reserved = 0
    if backends == (abi.Backend.MPS,):
        tenants = files.tenants_dir(cfg.paths.run_dir)
        reserved = mps.latency_reserve(tenants, found[0].uuid, exclude=state.id)
    return Setup(
        request=request,
        gpus=found,
        pid=state.pid,
        rootfs=rootfs,
        backends=backends,
        mps_reserved_centi=reserved,
    )


def hold_mps_threads(cfg: config.Config, uuid: str, spec: files.SlotSpec, log: HookLogger) -> bool:
    """Under the slots lock, before any of the tenant's code runs: let the GPU's MPS daemon
    give each client at most the largest grant of the GPU's tenants, this one's included
    (mps.py says why).  False when this tenant's grant is above what the daemon allows now
    and the daemon would not take more: it would get less than its share under MPS."""
    dev = spec.devices[0]
    mine = mps.client_threads_centi(
        spec.isolation_mode, spec.priority, dev.sm_requested_centi, dev.mps_threads_centi
    )
    was = mps.recorded_ceiling(cfg.paths.run_dir, uuid)
    try:
        mps.hold_ceiling(cfg.paths.run_dir, uuid, cfg.backend.mps_control, mine)
    except (mps.MpsError, OSError) as exc:
        below = bool(was) and was * abi.CENTI_PER_PERCENT < mine
        then = "this container is time-sliced" if below else "a shimless client sets its own"
        log.warning(f"MPS daemon refused the thread ceiling: {then}", gpu=uuid, error=str(exc))
        return not below
    return True


def check_spill_fits_host(
    request: fcsp_annotations.TenantRequest,
    found: Sequence[gpus.Gpu],
    run_dir: Path,
    meminfo: Path = Path("/proc/meminfo"),
) -> None:
    """A spill bound is host memory the tenant may come to hold: all of its GPUs' bounds
    together may not pass the host's memory (HookError naming fcsp.mem-spill).  A quota in
    percent of a GPU whose total the observer has not published counts as unknown."""
    totals, minors = inventory.read(run_dir)
    spill = request.mem_spill
    bound = 0
    for gpu, dev in zip(found, request.devices, strict=True):
        total = totals.get(inventory.gpu_key(gpu.uuid, gpu.host_index, minors), 0)
        quota = rules.memory_quota(dev.mem.bytes, dev.mem.basis_points, total)
        bound += rules.memory_spill(spill.bytes, spill.centi, quota)
    host = procfs.memory_total(meminfo)
    if host and bound > host:
        raise HookError(
            f"annotation fcsp.mem-spill asks for up to {bound >> 20} MiB of host memory past "
            f"the quota on {len(found)} GPU(s), more than the host's {host >> 20} MiB: expected "
            "a smaller fcsp.mem-spill or fcsp.mem"
        )


def _cgroup_record(pid: int, log: HookLogger) -> dict[str, tuple[bytes, int]]:
    """The container's cgroup, read now, before any of the tenant's code runs: the host
    counts every process in it as the tenant's (fcsp_hook.cgroups)."""
    try:
        record = cgroups.of_process(pid).to_text()
    except cgroups.CgroupError as exc:
        log.warning("container cgroup not recorded; its processes are found by pid namespace",
                    error=str(exc))  # fmt: skip
        return {}
    return {cgroups.CGROUP_FILE: (record.encode(), 0o644)}


def _init_cwd(pid: int) -> Path:
    """The container's rootfs as its init process sees it, when config.json does not say."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError as exc:
        raise HookError(
            f"cannot find the container's rootfs: config.json names no root.path and "
            f"/proc/{pid}/cwd is unreadable: {exc.strerror}"
        ) from exc


def prestart(state: oci.State, cfg: config.Config, log: HookLogger) -> None:
    started = time.monotonic()
    if not fcsp_annotations.has_fcsp_annotations(state.annotations):
        return
    setup = plan_setup(state, cfg, log)
    if setup is None:
        return
    files.ensure_tenants_dir(cfg.paths.run_dir)
    slot_dir = files.slot_path(cfg.paths.run_dir, state.id)
    placeholders = {mounts.LIBRARY_NAME: (b"", 0o644), mounts.PRELOAD_NAME: (b"", 0o644)}
    placeholders |= _cgroup_record(setup.pid, log)
    placeholders |= kubernetes.record(state.annotations)  # pod labels for metrics
    init = procfs.proc_stat(setup.pid)
    spec = slot_spec(state.id, setup, init[1] if init else 0)
    mps_client = mps.client_dir(cfg.paths.run_dir, setup.mps_gpu) if setup.mps_gpu else None
    # may_mount first: under a seccomp filter, even asking for open_tree could be fatal.
    bounded = linux.may_mount() and linux.has_open_tree()
    if not bounded:
        log.warning(
            "no open_tree here (Linux 5.2+, and mount calls allowed): "
            "the usage file is not size-bounded"
        )
    try:
        # Guarantees that add up: checked, and the slot written, under the slots lock (a
        # removal of an earlier run of this id sees this one's init alive).
        with files.slots_locked(cfg.paths.run_dir):
            admission.admit(
                cfg.admission.policy,
                cfg.paths.run_dir,
                state.id,
                setup.request,
                setup.gpus,
                log=log,
            )
            if setup.mps_gpu and not hold_mps_threads(cfg, setup.mps_gpu, spec, log):
                setup = replace(setup, backends=(abi.Backend.TIMESLICE,))
                spec, mps_client = slot_spec(state.id, setup, init[1] if init else 0), None
            files.write_slot(
                slot_dir,
                spec,
                placeholders,
                with_mps_dir=mps_client is not None,
                bounded_usage=bounded,
            )
        mounts.install(
            mounts.MountPlan(
                setup.pid, setup.rootfs, slot_dir, cfg.hook.library, mps_client, bounded
            )
        )
    except BaseException:
        files.remove_slot(cfg.paths.run_dir, state.id)  # never raises: the reason stays ours
        raise
    log.info(
        "tenant slot ready",
        slot=str(slot_dir),
        gpus=[g.describe() for g in setup.gpus],
        sm_percent=[d.sm_centi / abi.CENTI_PER_PERCENT for d in setup.request.devices],
        mem_bytes=[d.mem.bytes for d in setup.request.devices],
        mode=setup.request.mode.name.lower(),
        backend=[b.name.lower() for b in setup.backends],
        mps_threads_pct=[d.mps_threads_centi / abi.CENTI_PER_PERCENT for d in spec.devices]
        if setup.mps_gpu
        else None,
        duration_ms=round((time.monotonic() - started) * 1000, 2),
    )
