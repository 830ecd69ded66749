"""Parsing the fcsp.* container annotations: the user's interface.  Pure code, no I/O.

Every malformed value raises AnnotationError with one line that names the key, the
value and the accepted form.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar

from fcsp_hook.errors import AnnotationError
from fcsp_hook.slot import abi, uvm

PREFIX = "fcsp."

SM_FORM = "a percentage of the GPU from 1 to 100, at most 2 decimals (e.g. 40 or 12.5)"
MEM_FORM = (
    "bytes with a binary suffix K, M, G or T (e.g. 512M, 8G, 1.5G; Ki/Mi/Gi/Ti also accepted), "
    "from 1M to 1024T, or a percentage of the GPU's memory (e.g. 50%)"
)
MEM_MODE_FORM = "hard, soft or spill"
MEM_SPILL_FORM = (
    "bytes as for fcsp.mem (e.g. 8G) or a multiple of the quota from 0.01x to 100x (e.g. 1.5x)"
)
MODE_FORM = "none, balanced, strict or adaptive"
PRIORITY_FORM = "latency or best-effort"
TENANT_FORM = (
    "1 to 63 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
)

_DECIMAL = r"(?:0|[1-9][0-9]{0,2})(?:\.[0-9]{1,2})?"
# Every pattern is used with fullmatch: `$` alone also matches before a trailing newline,
# which would let "40\n" through.
_SM_RE = re.compile(_DECIMAL)
_MEM_PERCENT_RE = re.compile(rf"({_DECIMAL})%")
_MEM_BYTES_RE = re.compile(r"([0-9]{1,7})(?:\.([0-9]{1,3}))?([KMGT])(?:i|iB)?")
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_DEVICE_KEY_RE = re.compile(r"(sm|mem)\.(0|[1-9][0-9]?)")
_RATIO_RE = re.compile(r"((?:0|[1-9][0-9]?|100)(?:\.[0-9]{1,2})?)x")

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_MEM_BYTES = 1 << 20
MAX_MEM_BYTES = 1024 << 40

_MODES = {
    "none": abi.IsolationMode.NONE,
    "balanced": abi.IsolationMode.BALANCED,
    "strict": abi.IsolationMode.STRICT,
    "adaptive": abi.IsolationMode.ADAPTIVE,
}
_MEM_MODES = {"hard": abi.MemMode.HARD, "soft": abi.MemMode.SOFT, "spill": abi.MemMode.SPILL}
_PRIORITIES = {"latency": abi.Priority.LATENCY, "best-effort": abi.Priority.BEST_EFFORT}
_PROFILES = {name: name for name in uvm.PROFILES}
# Keys whose value names one of a few choices: (choices, the accepted form).
_ENUM_KEYS: dict[str, tuple[Mapping[str, int], str]] = {
    "mem-mode": (_MEM_MODES, MEM_MODE_FORM),
    "mode": (_MODES, MODE_FORM),
    "priority": (_PRIORITIES, PRIORITY_FORM),
}
_T = TypeVar("_T")

KNOWN_KEYS = ("sm", "mem", "mem-mode", "mem-spill", "uvm-profile", "mode", "priority", "tenant")


@dataclass(frozen=True)
class MemQuota:
    """A memory quota: absolute bytes, or basis points (1/100 %) of the GPU's real total."""

    bytes: int = 0
    basis_points: int = 0

    @property
    def unlimited(self) -> bool:
        return self.bytes == 0 and self.basis_points == 0


UNLIMITED = MemQuota()


@dataclass(frozen=True)
class MemSpill:
    """How far past its quota a spill-mode tenant may go: bytes, or 1/100 of the quota."""

    bytes: int = 0
    centi: int = abi.WHOLE_GPU_CENTI  # 1x the quota unless told


DEFAULT_SPILL = MemSpill()


@dataclass(frozen=True)
class DeviceRequest:
    """What the tenant asks for on one GPU it sees."""

    sm_centi: int = abi.WHOLE_GPU_CENTI
    mem: MemQuota = UNLIMITED


@dataclass(frozen=True)
class TenantRequest:
    """The parsed annotations of one container."""

    devices: tuple[DeviceRequest, ...]
    mode: abi.IsolationMode
    mem_mode: abi.MemMode
    priority: abi.Priority
    tenant: str
    mem_spill: MemSpill = DEFAULT_SPILL
    uvm_profile: str = "default"


def _show(value: str) -> str:
    """The value as it goes into a one-line message: escaped, quoted and bounded."""
    shown = ascii(value)[1:-1]
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f'"{shown}"'


def _fail(key: str, value: str, form: str) -> AnnotationError:
    return AnnotationError(f"annotation {key}={_show(value)} is invalid: expected {form}")


def _centi(number: str) -> int:
    return int(Decimal(number) * abi.CENTI_PER_PERCENT)


def parse_sm(key: str, value: str) -> int:
    """A compute share, in 1/100 % of the GPU."""
    if not _SM_RE.fullmatch(value):
        raise _fail(key, value, SM_FORM)
    centi = _centi(value)
    if not abi.CENTI_PER_PERCENT <= centi <= abi.WHOLE_GPU_CENTI:
        raise _fail(key, value, SM_FORM)
    return centi


def parse_mem(key: str, value: str) -> MemQuota:
    percent = _MEM_PERCENT_RE.fullmatch(value)
    if percent:
        basis_points = _centi(percent.group(1))
        if not 1 <= basis_points <= abi.WHOLE_GPU_CENTI:
            raise _fail(key, value, MEM_FORM)
        return MemQuota(basis_points=basis_points)
    match = _MEM_BYTES_RE.fullmatch(value)
    if not match:
        raise _fail(key, value, MEM_FORM)
    whole, fraction, unit = match.groups()
    size = int(Decimal(f"{whole}.{fraction or '0'}") * _UNITS[unit])
    if not MIN_MEM_BYTES <= size <= MAX_MEM_BYTES:
        raise _fail(key, value, MEM_FORM)
    return MemQuota(bytes=size)


def parse_tenant(key: str, value: str) -> str:
    if not _TENANT_RE.fullmatch(value):
        raise _fail(key, value, TENANT_FORM)
    return value


def parse_spill(key: str, value: str) -> MemSpill:
    ratio = _RATIO_RE.fullmatch(value)
    if ratio:
        centi = int(Decimal(ratio.group(1)) * abi.WHOLE_GPU_CENTI)
        if not abi.CENTI_PER_PERCENT <= centi <= 100 * abi.WHOLE_GPU_CENTI:
            raise _fail(key, value, MEM_SPILL_FORM)
        return MemSpill(centi=centi)
    if _MEM_PERCENT_RE.fullmatch(value):
        raise _fail(key, value, MEM_SPILL_FORM)
    try:
        return MemSpill(bytes=parse_mem(key, value).bytes, centi=0)
    except AnnotationError:
        raise _fail(key, value, MEM_SPILL_FORM) from None


def _choice(key: str, value: str, choices: Mapping[str, _T], form: str) -> _T:
    try:
        return choices[value]
    except KeyError:
        raise _fail(key, value, form) from None


def _device_index(key: str, value: str, index: int, device_count: int) -> int:
    visible = min(device_count, abi.MAX_DEVICES)
    if index < visible:
        return index
    seen = f"0 to {visible - 1}" if visible else "none: the container sees no GPU"
    raise AnnotationError(
        f"annotation {key}={_show(value)} is invalid: GPU index {index} is out of range, "
        f"expected an index of a GPU the container sees ({seen})"
    )


def parse(
    annotations: Mapping[str, str],
    device_count: int,
    default_mode: abi.IsolationMode = abi.IsolationMode.BALANCED,
    default_mem_mode: abi.MemMode = abi.MemMode.HARD,
) -> TenantRequest:
    """Parse every fcsp.* annotation; keys outside fcsp. are not ours and are ignored."""
    sm_all = abi.WHOLE_GPU_CENTI
    mem_all = UNLIMITED
    sm_dev: dict[int, int] = {}
    mem_dev: dict[int, MemQuota] = {}
    chosen: dict[str, int] = {}
    tenant = ""
    spill: MemSpill | None = None
    profile = "default"

    for key in sorted(annotations):
        if not key.startswith(PREFIX):
            continue
        value = annotations[key]
        name = key[len(PREFIX) :]
        per_device = _DEVICE_KEY_RE.fullmatch(name)
        if name == "sm":
            sm_all = parse_sm(key, value)
        elif name == "mem":
            mem_all = parse_mem(key, value)
        elif per_device and per_device.group(1) == "sm":
            index = _device_index(key, value, int(per_device.group(2)), device_count)
            sm_dev[index] = parse_sm(key, value)
        elif per_device:
            index = _device_index(key, value, int(per_device.group(2)), device_count)
            mem_dev[index] = parse_mem(key, value)
        elif name in _ENUM_KEYS:
            chosen[name] = _choice(key, value, *_ENUM_KEYS[name])
        elif name == "mem-spill":
            spill = parse_spill(key, value)
        elif name == "uvm-profile":
            profile = _choice(key, value, _PROFILES, uvm.PROFILE_FORM)
        elif name == "tenant":
            tenant = parse_tenant(key, value)
        else:
            known = ", ".join(f"{PREFIX}{k}" for k in KNOWN_KEYS)
            raise AnnotationError(
                f"annotation {_show(key)[1:-1]} is unknown: expected one of {known}, "
                f"{PREFIX}sm.<i> or {PREFIX}mem.<i>"
            )

    mem_mode = abi.MemMode(chosen.get("mem-mode", default_mem_mode))
    if spill is not None and mem_mode != abi.MemMode.SPILL:
        raise AnnotationError(
            f"annotation {PREFIX}mem-spill needs {PREFIX}mem-mode=spill: expected both or neither"
        )
    devices = tuple(
        DeviceRequest(sm_centi=sm_dev.get(i, sm_all), mem=mem_dev.get(i, mem_all))
        for i in range(min(device_count, abi.MAX_DEVICES))
    )
    return TenantRequest(
        devices,
        abi.IsolationMode(chosen.get("mode", default_mode)),
        mem_mode,
        abi.Priority(chosen.get("priority", abi.Priority.BEST_EFFORT)),
        tenant,
        spill or DEFAULT_SPILL,
        profile,
    )


def has_fcsp_annotations(annotations: Mapping[str, str]) -> bool:
    return any(key.startswith(PREFIX) for key in annotations)


# How each CRI runtime marks a pod's sandbox (pause) container, which gets the pod's
# annotations too but never a GPU: containerd, CRI-O, and dockershim/cri-dockerd.
SANDBOX_MARKS = (
    ("io.kubernetes.cri.container-type", "sandbox"),
    ("io.kubernetes.cri-o.ContainerType", "sandbox"),
    ("io.kubernetes.docker.type", "podsandbox"),
)


def sandbox_mark(annotations: Mapping[str, str]) -> str:
    """`key=value` when the spec is a pod's sandbox container, else ''."""
    for key, value in SANDBOX_MARKS:
        if annotations.get(key) == value:
            return f"{key}={value}"
    return ""
