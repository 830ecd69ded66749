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


class SlotVersionError(SlotError):
    """A slot file of another FCSP slot version: its container started under another
    install of FCSP."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version


class HookError(FcspError):
    """The OCI state or bundle is not what the hook needs."""


def one_line(message: str, limit: int = 1000) -> str:
    """message as one printable line: control characters (a newline inside a value that
    came from outside) escaped, never printed raw; bounded in length."""
    if message.isprintable() and len(message) <= limit:
        return message
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in message)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
