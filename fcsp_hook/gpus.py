"""Which GPUs a container sees, from its spec: NVIDIA_VISIBLE_DEVICES, the device nodes in
linux.devices and the device plugin's volume mounts.  Pure, but for listing the host's
/dev/nvidia<N> when the container asks for all of them and reading the driver's procfs
files that name each GPU's UUID.

Every form the NVIDIA stack produces is read (see discover()); the answer is the GPUs the
container can open, each once, in the order CUDA numbers them (PCI order, which the
device minors follow), so that `fcsp.sm.<i>` and slot entry i mean CUDA device i.

Neither CUDA nor NVML is touched: the hook must stay fast and work on hosts whose
driver is wedged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from fcsp_hook.errors import HookError
from fcsp_hook.oci import Device
from fcsp_hook.slot import abi

NVIDIA_MAJOR = 195
VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
# The device plugin's volume-mounts strategy: the variable holds this path and each device
# is a mount (of /dev/null) at <this path>/<index or UUID>.
VOLUME_MOUNTS_ROOT = "/var/run/nvidia-container-devices"
_DEV_NODE = re.compile(r"^/dev/nvidia([0-9]{1,3})$")
_INDEX = re.compile(r"[0-9]{1,3}")
_UUID = re.compile(r"(GPU|MIG)-[A-Za-z0-9/-]{1,80}")
_MIG_INDEX = re.compile(r"([0-9]{1,3}):([0-9]{1,3})")
# A CDI device name as the NVIDIA runtime's CDI mode takes it from the variable:
# nvidia.com/gpu=0, k8s.device-plugin.nvidia.com/gpu=GPU-..., management.nvidia.com/gpu=all.
_CDI_NAME = re.compile(r"((?:[a-z0-9-]+\.)*nvidia\.com)/(gpu|mig)=(.+)")
NO_GPU_VALUES = {"", "none", "void"}
ALL = "all"
FORMS = (
    "all, none, void, or a comma list of GPU indices, GPU-/MIG- UUIDs, <gpu>:<mig> "
    "indices and CDI names (nvidia.com/gpu=0)"
)


@dataclass(frozen=True)
class Gpu:
    """One GPU (or MIG device) the container sees: a host index (the device minor), a
    UUID, or both; mig >= 0 for the `<gpu>:<mig>` form, whose host_index is its GPU's."""

    host_index: int = -1
    uuid: str = ""
    mig: int = -1

    def describe(self) -> str:
        if self.uuid:
            return self.uuid
        if self.mig >= 0:
            return f"MIG {self.host_index}:{self.mig}"
        return f"GPU {self.host_index}"

    @property
    def is_mig(self) -> bool:
        return self.mig >= 0 or self.uuid.startswith("MIG-")


@dataclass(frozen=True)
class Discovery:
    """The container's GPUs and where they were read from.

    source: "env", "volume mounts", "device nodes" or "none".  disagreement: one line when
    the environment names other GPUs than the device nodes the container can open (the
    nodes win), for the hook to log; "" otherwise.
    """

    gpus: tuple[Gpu, ...]
    source: str
    disagreement: str = ""


@dataclass(frozen=True)
class _Asked:
    """What the environment (or the volume mounts it points at) asks for."""

    listed: tuple[Gpu, ...] = ()
    all_gpus: bool = False
    source: str = "env"
    explicit: bool = False  # a list of GPUs, not all/none/void/unset


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
    if not minor.isdigit() or not _UUID.fullmatch(uuid):
        return None
    return int(minor), uuid


def host_gpu_uuids(driver_dir: Path) -> dict[int, str]:
    """Minor number -> UUID of the host's GPUs, from the driver's procfs files."""
    uuids: dict[int, str] = {}
    try:
        buses = sorted(os.listdir(driver_dir / "gpus"))  # no glob: it compiles a pattern
    except OSError:
        return uuids
    for bus in buses:
        try:
            text = (driver_dir / "gpus" / bus / "information").read_text(errors="replace")
            parsed = parse_driver_information(text[:4096])
        except OSError:
            continue
        if parsed:
            uuids[parsed[0]] = parsed[1]
    return uuids


def with_uuids(gpus: Iterable[Gpu], uuids: Mapping[int, str]) -> list[Gpu]:
    """Each GPU named both ways where the driver says how: an index gets its UUID, a GPU-
    UUID its index.  A MIG device keeps what it has (its GPU's UUID is not its own)."""
    by_uuid = {u: i for i, u in uuids.items()}
    named = []
    for gpu in gpus:
        if gpu.mig < 0 and gpu.host_index >= 0 and not gpu.uuid:
            named.append(replace(gpu, uuid=uuids.get(gpu.host_index, "")))
        elif gpu.host_index < 0 and gpu.uuid in by_uuid:
            named.append(replace(gpu, host_index=by_uuid[gpu.uuid]))
        else:
            named.append(gpu)
    return named


def _shown(value: str) -> str:
    """A value as it goes into a one-line message: escaped, quoted and bounded."""
    shown = ascii(value)
    return shown if len(shown) <= 80 else shown[:76] + "...'"


def _parse_item(item: str, invalid: str) -> Gpu | None:
    """One entry of the list: a Gpu, or None for `all`; invalid: the error's subject and
    what was expected, for a one-line error."""
    cdi = _CDI_NAME.fullmatch(item)
    if cdi:
        item = cdi.group(3)
    if item == ALL:
        return None
    if _INDEX.fullmatch(item):
        return Gpu(host_index=int(item))
    mig = _MIG_INDEX.fullmatch(item)
    if mig:
        return Gpu(host_index=int(mig.group(1)), mig=int(mig.group(2)))
    if _UUID.fullmatch(item):
        return Gpu(uuid=item)
    raise HookError(invalid)


def _key(gpu: Gpu) -> tuple[int, int, str]:
    """The same device, however it was named (once both names are known)."""
    return (gpu.host_index, gpu.mig, "") if gpu.host_index >= 0 else (-1, -1, gpu.uuid)


def _unique(gpus: Iterable[Gpu]) -> list[Gpu]:
    seen: set[tuple[int, int, str]] = set()
    kept = []
    for gpu in gpus:
        if _key(gpu) not in seen:
            seen.add(_key(gpu))
            kept.append(gpu)
    return kept


def _asked_by_list(items: Iterable[tuple[str, str]], source: str) -> _Asked:
    """items: (entry, the one-line error should it be malformed)."""
    listed: list[Gpu] = []
    all_gpus = False
    for item, invalid in items:
        gpu = _parse_item(item, invalid)
        if gpu is None:
            all_gpus = True
        else:
            listed.append(gpu)
    return _Asked(tuple(listed), all_gpus, source, explicit=not all_gpus)


def _asked(visible: str | None, mounts: Iterable[str]) -> _Asked:
    """What NVIDIA_VISIBLE_DEVICES asks for (unset: nothing)."""
    if visible is None:
        return _Asked()
    value = visible.strip()
    if value.lower() in NO_GPU_VALUES:
        return _Asked()
    if value.lower() == ALL:
        return _Asked(all_gpus=True)
    if value.rstrip("/") == VOLUME_MOUNTS_ROOT:
        prefix = VOLUME_MOUNTS_ROOT + "/"
        names = (
            (
                m[len(prefix) :].strip("/"),
                f"{VISIBLE_DEVICES} volume mount {_shown(m)} is invalid: expected one mount "
                f"per device under {VOLUME_MOUNTS_ROOT}, named by its index or UUID",
            )
            for m in mounts
            if m.startswith(prefix)
        )
        return _asked_by_list(names, "volume mounts")
    invalid = f"{VISIBLE_DEVICES}={_shown(value)} is invalid: expected {FORMS}"
    return _asked_by_list(((part.strip(), invalid) for part in value.split(",")), "env")


def from_devices(devices: Iterable[Device]) -> list[Gpu]:
    """GPUs passed as device nodes (podman --device, the device plugin's device specs, CDI)."""
    gpus = []
    for dev in devices:
        match = _DEV_NODE.match(dev.path)
        if match and dev.major in (None, NVIDIA_MAJOR):
            gpus.append(Gpu(host_index=int(match.group(1))))
    return _unique(gpus)


def cuda_order(gpus: Iterable[Gpu]) -> list[Gpu]:
    """The order CUDA numbers the devices in: by GPU (the minors follow PCI order), a MIG
    device after its GPU's others by index; devices of unknown GPU last, as listed."""

    def key(position: int, gpu: Gpu) -> tuple[int, int, int, int]:
        return (0, gpu.host_index, gpu.mig, 0) if gpu.host_index >= 0 else (1, 0, 0, position)

    return [g for _, g in sorted(enumerate(gpus), key=lambda p: key(*p))]


def _disagreement(
    asked: _Asked, listed: list[Gpu], nodes: list[Gpu], dropped: list[Gpu], value: str
) -> str:
    """One line when the environment's list and the device nodes name other GPUs."""
    if not asked.explicit:
        return ""
    node_set = {g.host_index for g in nodes}
    named = {g.host_index for g in listed if g.host_index >= 0 and not g.is_mig}
    unknown = [g for g in listed if g.host_index < 0]
    problems = []
    if dropped:
        problems.append(
            "it names " + ", ".join(g.describe() for g in dropped) + ", which no node opens"
        )
    if not any(g.is_mig for g in listed):
        extra = sorted(node_set - named)
        if extra and not unknown:
            problems.append(
                "nodes open " + ", ".join(f"GPU {i}" for i in extra) + ", which it does not name"
            )
        elif unknown and len(listed) != len(nodes):
            problems.append(f"it names {len(listed)} GPUs, the nodes open {len(nodes)}")
    if not problems:
        return ""
    where = _shown(value) if asked.source == "env" else f"{VOLUME_MOUNTS_ROOT} (volume mounts)"
    return (
        f"{VISIBLE_DEVICES}={where} and the spec's device nodes disagree: "
        + "; ".join(problems)
        + "; using the device nodes"
    )


def discover(
    visible: str | None,
    devices: Iterable[Device],
    mounts: Iterable[str],
    dev_dir: Path,
    uuids: Mapping[int, str],
) -> Discovery:
    """The GPUs a container can open, from every form the NVIDIA stack passes them in.

    visible: NVIDIA_VISIBLE_DEVICES (None: unset); devices: linux.devices; mounts: the
    spec's mount destinations; uuids: minor -> UUID from the driver (may be empty).

    - Device nodes /dev/nvidia<N> in the spec (the device plugin's PASS_DEVICE_SPECS, CDI,
      --device) are what the container can open: they win over the variable, whose
      indices, UUIDs, `all` (every CUDA image sets it) or `void` (CDI) then only name the
      same GPUs.  A disagreement is reported, not fatal.  With MIG devices in the variable
      the nodes are their parent GPUs: the MIG devices stand.
    - Without nodes, the variable: indices, GPU-/MIG- UUIDs, `<gpu>:<mig>`, CDI names
      (`nvidia.com/gpu=0`), `all` (the host's nodes), `none`/`void`/empty, or the
      volume-mounts path with one mount per device under it.
    """
    asked = _asked(visible, mounts)
    nodes = with_uuids(from_devices(devices), uuids)
    listed = _unique(with_uuids(asked.listed, uuids))
    dropped: list[Gpu] = []
    if nodes:
        node_set = {g.host_index for g in nodes}
        if any(g.is_mig for g in listed):
            found = [g for g in listed if g.host_index < 0 or g.host_index in node_set]
            dropped = [g for g in listed if g not in found]
        else:
            found = nodes
            dropped = [g for g in listed if g.host_index >= 0 and g.host_index not in node_set]
        source = "device nodes"
        disagreement = _disagreement(asked, listed, nodes, dropped, (visible or "").strip())
    else:
        found = listed
        if asked.all_gpus:
            everything = with_uuids((Gpu(host_index=i) for i in host_gpu_indices(dev_dir)), uuids)
            found = _unique([*found, *everything])
        source = asked.source if found else "none"
        disagreement = ""
    ordered = tuple(cuda_order(found))
    if len(ordered) > abi.MAX_DEVICES:
        raise HookError(
            f"the container sees {len(ordered)} GPUs; FCSP supports at most {abi.MAX_DEVICES}"
        )
    return Discovery(ordered, source, disagreement)
