"""Expected failures.  Each is caught once at an entry point and printed as one line."""

from __future__ import annotations


class FcspError(Exception):
    """A failure we expected and can explain in one line."""


class AnnotationError(FcspError):
    """An fcsp.* annotation is unknown or malformed."""


class ConfigError(FcspError):
    """config.toml is unreadable or holds a bad value."""


class UnsafePathError(FcspError):
    """A path inside the container rootfs would lead outside it, or is a link where none may be."""


class SlotError(FcspError):
    """A tenant slot cannot be created, read or removed."""


class HookError(FcspError):
    """The OCI state or bundle is not what the hook needs."""
