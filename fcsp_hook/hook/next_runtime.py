"""Which runtime fcsp-runtime hands a container to: config.toml's [runtime] next, checked
and resolved.  A leaf module: config.py validates the setting with it, and fcsp-runtime's
pass-through path, which never imports config.py, resolves it."""

from __future__ import annotations

import os

from fcsp_hook.errors import ConfigError

NEXT_AUTO = "auto"
NVIDIA_RUNTIME = "nvidia-container-runtime"
RUNC = "runc"


def parse_next(value: object) -> str:
    """[runtime] next: "auto" or an absolute path (config.py validates with this too)."""
    if isinstance(value, str) and (value == NEXT_AUTO or value.startswith("/")):
        return value
    raise ConfigError(
        f"[runtime] next = {value!r} is invalid: expected {NEXT_AUTO!r} or an absolute path"
    )


def _which(name: str, search_path: str) -> str | None:
    for directory in search_path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def resolve_next(setting: str, search_path: str) -> str:
    """The next runtime's path: the setting itself, or what "auto" finds on PATH."""
    if setting != NEXT_AUTO:
        return setting
    for name in (NVIDIA_RUNTIME, RUNC):
        found = _which(name, search_path)
        if found:
            return found
    raise ConfigError(
        f"[runtime] next = {NEXT_AUTO!r} found neither {NVIDIA_RUNTIME} nor {RUNC} on PATH "
        f"({search_path}); install one or set an absolute path"
    )
