"""Which runtime fcsp-runtime hands a container to: config.toml's [runtime] next, checked
and resolved.  A leaf module: config.py validates the setting with it, and fcsp-runtime's
pass-through path, which never imports config.py, resolves it."""

from __future__ import annotations

import os

from fcsp_hook.errors import ConfigError

NEXT_AUTO = "auto"
NVIDIA_RUNTIME = "nvidia-container-runtime"
RUNC = "runc"
# Where the NVIDIA runtime is when it is not on the engine's PATH: the GPU Operator installs
# it in its toolkit directory (never on PATH), the toolkit packages in /usr/bin (which a
# containerd or k3s unit's PATH need not hold).  Looked at in this order, after PATH.
NVIDIA_LOCATIONS = (
    "/usr/local/nvidia/toolkit/" + NVIDIA_RUNTIME,
    "/usr/bin/" + NVIDIA_RUNTIME,
)


def parse_next(value: object) -> str:
    """[runtime] next: "auto" or an absolute path (config.py validates with this too)."""
    if isinstance(value, str) and (value == NEXT_AUTO or value.startswith("/")):
        return value
    raise ConfigError(
        f"[runtime] next = {value!r} is invalid: expected {NEXT_AUTO!r} or an absolute path"
    )


def auto_candidates(
    search_path: str, nvidia_locations: tuple[str, ...] = NVIDIA_LOCATIONS
) -> list[str]:
    """What "auto" tries, in order: nvidia-container-runtime on PATH, then where the GPU
    Operator and the packages put it, then runc on PATH."""
    dirs = [d or "." for d in search_path.split(os.pathsep)]
    return [
        *(os.path.join(d, NVIDIA_RUNTIME) for d in dirs),
        *nvidia_locations,
        *(os.path.join(d, RUNC) for d in dirs),
    ]


def is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def resolve_next(
    setting: str, search_path: str, nvidia_locations: tuple[str, ...] = NVIDIA_LOCATIONS
) -> str:
    """The next runtime's path: the setting itself, or the first of auto_candidates that
    is an executable file."""
    if setting != NEXT_AUTO:
        return setting
    for candidate in auto_candidates(search_path, nvidia_locations):
        if is_executable(candidate):
            return candidate
    raise ConfigError(
        f"[runtime] next = {NEXT_AUTO!r} found neither {NVIDIA_RUNTIME} nor {RUNC} on PATH "
        f"({search_path}), nor {NVIDIA_RUNTIME} at {' or '.join(nvidia_locations)}; "
        "install one or set an absolute path"
    )
