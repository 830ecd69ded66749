"""Admission: the guarantees on a GPU add up, or the container does not start.

Two requests are guarantees: a strict share (fcsp.mode=strict: the tenant keeps its
fcsp.sm whether its neighbours are busy or not) and a hard memory quota (fcsp.mem with
fcsp.mem-mode=hard: memory the tenant can always allocate).  At prestart the hook adds a
container's guarantees on each of its GPUs to what the live containers there already hold,
and with [admission] policy = "refuse" a container that would take a GPU past 100 % of its
SMs, or past its memory, does not start: one line names the GPU, what it asked and what
is already promised.  "warn" logs that line and starts it; "off" checks nothing.

What is promised comes from the live slots under <run_dir>/tenants (a slot whose container
init process is gone, or whose pid was reused, promises nothing), never from the tenants'
usage files.  A GPU's memory total comes from <run_dir>/gpus.json, the inventory
fcsp-observer reads from NVML (the hook itself never initialises NVML, and the driver's
procfs does not say); before the observer has written it, percentages are added up
among themselves and only what they decide is refused.

The check and the creation of the slot run under one lock, the slots lock
(files.slots_locked, <run_dir>/locks/.slots), so two containers racing for the last
guarantee cannot both pass: the second sees the first's slot.  The locks directory is the
host's alone (never mounted into a container), so no tenant can hold the lock.  A
container that asks for no guarantee reads nothing.

Imports stay light: this runs on every container start.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fcsp_hook import inventory, procfs
from fcsp_hook.errors import HookError, SlotError
from fcsp_hook.slot import abi, files

# Not typing.TYPE_CHECKING: nothing on the hook's path need import typing for this.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from fcsp_hook.annotations import TenantRequest
    from fcsp_hook.gpus import Gpu
    from fcsp_hook.log import HookLogger

POLICY_REFUSE = "refuse"
POLICY_WARN = "warn"
POLICY_OFF = "off"

WHOLE = abi.WHOLE_GPU_CENTI  # 100 % in centi-percent; basis points use the same scale
GiB = 1 << 30


class AdmissionError(HookError):
    """A container's guarantees do not fit on one of its GPUs."""


@dataclass(frozen=True)
class Ask:
    """What a container would be guaranteed on one GPU."""

    gpu: str  # the host GPU: its UUID, else nvidia<minor>
    label: str  # the GPU as a message names it
    sm_centi: int = 0  # strict share; 0: none
    mem_bytes: int = 0  # hard quota in bytes; 0: none
    mem_basis_points: int = 0  # hard quota as a share of the GPU's memory; 0: none
    mem_mode: str = "hard"  # or "spill": its quota is on the GPU all the same

    @property
    def any(self) -> bool:
        return bool(self.sm_centi or self.mem_bytes or self.mem_basis_points)


@dataclass
class Promised:
    """What the live containers on one GPU are already guaranteed."""

    sm_centi: int = 0
    sm_holders: int = 0
    mem_bytes: int = 0
    mem_basis_points: int = 0
    mem_holders: int = 0


# Quotas that promise device memory: a spill tenant's quota is on the GPU, its excess not.
GUARANTEED_MEMORY = (abi.MemMode.HARD, abi.MemMode.SPILL)


def asks(
    request: TenantRequest, gpus: Iterable[Gpu], minors: Mapping[int, str] | None = None
) -> list[Ask]:
    """The guarantees a request makes on each of its GPUs (none: an empty list)."""
    strict = request.mode == abi.IsolationMode.STRICT
    hard = request.mem_mode in GUARANTEED_MEMORY
    out = []
    for gpu, dev in zip(gpus, request.devices, strict=True):
        if gpu.mig >= 0 and not gpu.uuid:
            continue  # a MIG instance by index alone: slots cannot tell it from its GPU
        key = inventory.gpu_key(gpu.uuid, gpu.host_index, minors or {})
        if not key:
            continue
        label = gpu.uuid if gpu.host_index < 0 else f"GPU {gpu.host_index}"
        if key.startswith(("GPU-", "MIG-")) and gpu.host_index >= 0:
            label += f" ({key})"
        ask = Ask(
            gpu=key,
            label=label,
            sm_centi=dev.sm_centi if strict else 0,
            mem_bytes=dev.mem.bytes if hard else 0,
            mem_basis_points=dev.mem.basis_points if hard else 0,
            mem_mode=request.mem_mode.name.lower(),
        )
        if ask.any:
            out.append(ask)
    return out


def promised(
    run_dir: Path,
    exclude: str = "",
    minors: Mapping[int, str] | None = None,
    proc: Path = Path("/proc"),
) -> dict[str, Promised]:
    """Per GPU, the guarantees of the live slots (but exclude's, the container asking:
    a restart reuses its id)."""
    base = files.tenants_dir(run_dir)
    out: dict[str, Promised] = {}
    try:
        with os.scandir(base) as entries:
            names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return out
    for name in names:
        if name == exclude:
            continue
        try:
            files.validate_container_id(name)
            limits = files.read_limits(base / name / abi.LIMITS_FILE)
        except (SlotError, OSError):
            continue  # not a slot, or one being written by a container that asks nothing
        alive = procfs.process_alive(int(limits.init_host_pid), int(limits.init_start_time), proc)
        if alive is False:
            continue  # its container is gone; a slot naming no pid still counts
        strict = int(limits.isolation_mode) == abi.IsolationMode.STRICT
        hard = int(limits.mem_mode) in GUARANTEED_MEMORY
        for i in range(min(int(limits.device_count), abi.MAX_DEVICES)):
            dev = limits.device[i]
            key = inventory.gpu_key(
                dev.uuid.decode(errors="replace"), int(dev.host_index), minors or {}
            )
            if not key:
                continue
            entry = out.setdefault(key, Promised())
            sm = min(int(dev.sm_requested_centi), WHOLE) if strict else 0
            if sm:
                entry.sm_centi += sm
                entry.sm_holders += 1
            if hard and (dev.mem_limit_bytes or dev.mem_limit_basis_points):
                entry.mem_bytes += int(dev.mem_limit_bytes)
                entry.mem_basis_points += int(dev.mem_limit_basis_points)
                entry.mem_holders += 1
    return out


def _pct(centi: int) -> str:
    return f"{centi / 100:g}%"


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n >> 20} MiB"


def _mem(n_bytes: int, basis_points: int, total: int = 0) -> str:
    if total:
        return _size(n_bytes + basis_points * total // WHOLE)
    parts = ([_pct(basis_points)] if basis_points else []) + ([_size(n_bytes)] if n_bytes else [])
    return " + ".join(parts) or "nothing"


def _holders(n: int) -> str:
    return f"{n} container{'s' if n != 1 else ''}"


def problems(
    wanted: Iterable[Ask], held: Mapping[str, Promised], totals: Mapping[str, int]
) -> list[str]:
    """One line per guarantee that does not fit (pure)."""
    out = []
    for ask in wanted:
        p = held.get(ask.gpu, Promised())
        if ask.sm_centi and p.sm_centi + ask.sm_centi > WHOLE:
            out.append(
                f"{ask.label} cannot guarantee fcsp.sm={_pct(ask.sm_centi)} (strict): "
                f"{_pct(p.sm_centi)} of its SMs is already promised to "
                f"{_holders(p.sm_holders)}, {_pct(p.sm_centi + ask.sm_centi)} > 100%"
            )
        if not (ask.mem_bytes or ask.mem_basis_points):
            continue
        total = totals.get(ask.gpu, 0)
        asked = _mem(ask.mem_bytes, ask.mem_basis_points)
        if total:
            used = p.mem_bytes + p.mem_basis_points * total // WHOLE
            want = ask.mem_bytes + ask.mem_basis_points * total // WHOLE
            over = used + want > total
            shown = f"{_mem(p.mem_bytes, p.mem_basis_points, total)} of its {_size(total)}"
            limit = f"{_size(used + want)} > {_size(total)}"
        else:
            # The total is unknown: only percentages decide (past 100 %, or all of it and
            # some bytes more).
            points = p.mem_basis_points + ask.mem_basis_points
            over = points > WHOLE or (points == WHOLE and bool(p.mem_bytes or ask.mem_bytes))
            shown = f"{_mem(p.mem_bytes, p.mem_basis_points)} of its memory"
            limit = f"{_pct(points)}{' and more' if points == WHOLE else ''} > 100%"
        if over:
            out.append(
                f"{ask.label} cannot guarantee fcsp.mem={asked} ({ask.mem_mode}): {shown} is "
                f"already promised to {_holders(p.mem_holders)}, {limit}"
            )
    return out


def admit(
    policy: str,
    run_dir: Path,
    container_id: str,
    request: TenantRequest,
    gpus: Iterable[Gpu],
    *,
    log: HookLogger,
    proc: Path = Path("/proc"),
) -> None:
    """Admit a container: AdmissionError when policy is refuse and a guarantee does not
    fit; with warn, logs the same line.  Call it under files.slots_locked, and write the
    slot before letting go, so that racing containers see each other."""
    gpu_list = list(gpus)
    if policy == POLICY_OFF or not asks(request, gpu_list):
        return
    totals, minors = inventory.read(run_dir)
    wanted = asks(request, gpu_list, minors)
    held = promised(run_dir, container_id, minors, proc)
    lines = problems(wanted, held, totals)
    if lines:
        line = "admission: " + "; ".join(lines)
        if policy == POLICY_REFUSE:
            raise AdmissionError(line)
        log.warning(line, admission=POLICY_WARN)
