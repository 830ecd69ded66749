"""A slot's record of its container's Kubernetes identity: pod, namespace, container.

The hook writes it at prestart from the annotations the CRI runtime sets (containerd's CRI
plugin, CRI-O, the kubelet's labels); fcsp-observer reads it to label the tenant's metrics.
The slot directory is the host's (never mounted into a container), but outside Kubernetes
the annotations are whoever started the container's to set: every value is checked to be a
plain Kubernetes name when written and again when read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# <slot>/kubernetes: "pod=...\nnamespace=...\ncontainer=...\n", each line optional.
RECORD_FILE = "kubernetes"
# Where containerd's CRI plugin, then CRI-O (and the kubelet's labels), name them.
ANNOTATION_KEYS = {
    "pod": ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"),
    "namespace": ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"),
    "container": ("io.kubernetes.cri.container-name", "io.kubernetes.container.name"),
}
# A DNS subdomain's length; names are DNS labels or subdomains.
MAX_NAME = 253
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def valid_name(value: str) -> str:
    """value if it can be a Kubernetes name, else '' (annotations are the tenant's to set
    outside Kubernetes: whatever reaches a metric label is bounded and plain)."""
    ok = 0 < len(value) <= MAX_NAME and value[0].isalnum() and set(value) <= _NAME_CHARS
    return value if ok and value.isascii() else ""


def record(annotations: Mapping[str, str]) -> dict[str, tuple[bytes, int]]:
    """The slot's extra file naming the container's pod, namespace and container (for
    write_slot's extra_files); {} for a container that names none."""
    lines = []
    for field, keys in ANNOTATION_KEYS.items():
        value = next((annotations[k] for k in keys if k in annotations), "")
        name = valid_name(value)
        if name:
            lines.append(f"{field}={name}\n")
    if not lines:
        return {}
    return {RECORD_FILE: ("".join(lines).encode(), 0o644)}


def read_record(directory: Path) -> dict[str, str]:
    """pod, namespace and container from a slot's record ('' for each it lacks): read
    with a bound, never following a link, each value checked again."""
    out = dict.fromkeys(ANNOTATION_KEYS, "")
    try:
        fd = os.open(
            directory / RECORD_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        )
    except OSError:
        return out
    try:
        raw = os.read(fd, 4 * (MAX_NAME + 16))
    except OSError:
        return out
    finally:
        os.close(fd)
    for line in raw.decode("ascii", errors="replace").splitlines():
        field, _, value = line.partition("=")
        if field in out:
            out[field] = valid_name(value)
    return out
