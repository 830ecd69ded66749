"""The generated /etc/ld.so.preload: the shim first, then the image's own entries.  Pure."""

from __future__ import annotations

import re

MAX_IMAGE_PRELOAD_BYTES = 64 << 10
# ld.so splits /etc/ld.so.preload on white space and colons.
_SEPARATORS = re.compile(rb"[\s:]+")


def parse_entries(content: bytes) -> list[str]:
    entries = []
    for token in _SEPARATORS.split(content[:MAX_IMAGE_PRELOAD_BYTES]):
        if token:
            entries.append(token.decode("utf-8", "surrogateescape"))
    return entries


def merge(image_entries: list[str], library: str) -> bytes:
    """The shim comes first so that its dlsym is the one every later lookup reaches."""
    kept = [library]
    for entry in image_entries:
        if entry not in kept:
            kept.append(entry)
    return ("\n".join(kept) + "\n").encode("utf-8", "surrogateescape")
