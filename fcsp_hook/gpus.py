"""Which GPUs a container sees: NVIDIA_VISIBLE_DEVICES and linux.devices.  Pure, but for
listing the host's /dev/nvidia<N> when the container asks for all of them.

Neither CUDA nor NVML is touched: the hook must stay fast and work on hosts whose
driver is wedged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fcsp_hook.errors import HookError
from fcsp_hook.oci import Device
from fcsp_hook.slot import abi

NVIDIA_MAJOR = 195
_DEV_NODE = re.compile(r"^/dev/nvidia([0-9]{1,3})$")
_INDEX = re.compile(r"^[0-9]{1,3}$")
_UUID = re.compile(r"^(GPU|MIG)-[A-Za-z0-9/-]{1,80}$")
NO_GPU_VALUES = {"", "none", "void"}


@dataclass(frozen=True)
class Gpu:
    """One GPU the container sees: a host index, a UUID, or both."""

    host_index: int = -1
    uuid: str = ""

    def describe(self) -> str:
        return self.uuid or f"GPU {self.host_index}"


def host_gpu_indices(dev_dir: Path) -> list[int]:
    """The host's GPUs, from its /dev/nvidia<N> nodes (no driver call)."""
    indices = []
    for node in dev_dir.glob("nvidia[0-9]*"):
        match = _DEV_NODE.match(f"/dev/{node.name}")
        if match:
            indices.append(int(match.group(1)))
    return sorted(indices)


def parse_driver_information(text: str) -> tuple[int, str] | None:
    """(minor, UUID) from a /proc/driver/nvidia/gpus/<bus>/information file."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    minor, uuid = fields.get("Device Minor", ""), fields.get("GPU UUID", "")
    if not minor.isdigit() or not _UUID.match(uuid):
        return None
    return int(minor), uuid


def host_gpu_uuids(driver_dir: Path) -> dict[int, str]:
    """Minor number -> UUID of the host's GPUs, from the driver's procfs files."""
    uuids = {}
    for info in sorted(driver_dir.glob("gpus/*/information")):
        try:
            parsed = parse_driver_information(info.read_text(errors="replace")[:4096])
        except OSError:
            continue
        if parsed:
            uuids[parsed[0]] = parsed[1]
    return uuids


def with_uuids(gpus: list[Gpu], uuids: dict[int, str]) -> list[Gpu]:
    """Name each GPU selected by index by its UUID too, where the driver says it."""
    return [
        Gpu(g.host_index, uuids.get(g.host_index, "")) if not g.uuid and g.host_index >= 0 else g
        for g in gpus
    ]


def parse_visible_devices(value: str, host_indices: Iterable[int]) -> list[Gpu]:
    """NVIDIA_VISIBLE_DEVICES: all, none/void/empty, or a comma list of indices and UUIDs."""
    value = value.strip()
    if value.lower() in NO_GPU_VALUES:
        return []
    if value.lower() == "all":
        return [Gpu(host_index=i) for i in host_indices]
    gpus: list[Gpu] = []
    for item in (part.strip() for part in value.split(",")):
        if _INDEX.match(item):
            gpu = Gpu(host_index=int(item))
        elif _UUID.match(item):
            gpu = Gpu(uuid=item)
        else:
            raise HookError(
                f"NVIDIA_VISIBLE_DEVICES={value!r} is invalid: expected all, none, or a comma "
                "list of GPU indices and GPU-/MIG- UUIDs"
            )
        if gpu not in gpus:
            gpus.append(gpu)
    return gpus


def from_devices(devices: Iterable[Device]) -> list[Gpu]:
    """GPUs passed as device nodes (podman --device /dev/nvidia0, CDI)."""
    gpus = []
    for dev in devices:
        match = _DEV_NODE.match(dev.path)
        if match and dev.major in (None, NVIDIA_MAJOR):
            gpus.append(Gpu(host_index=int(match.group(1))))
    return gpus


def visible_gpus(
    visible_devices: str | None, devices: Iterable[Device], dev_dir: Path
) -> list[Gpu]:
    """The environment's list first, in its order, then device nodes it did not name."""
    gpus: list[Gpu] = []
    if visible_devices is not None:
        needs_host = visible_devices.strip().lower() == "all"
        gpus = parse_visible_devices(
            visible_devices, host_gpu_indices(dev_dir) if needs_host else ()
        )
    named = {g.host_index for g in gpus}
    gpus += [g for g in from_devices(devices) if g.host_index not in named]
    if len(gpus) > abi.MAX_DEVICES:
        raise HookError(
            f"the container sees {len(gpus)} GPUs; FCSP supports at most {abi.MAX_DEVICES}"
        )
    return gpus
