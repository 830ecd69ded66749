"""The generated /etc/ld.so.preload: the shim first, then the image's own entries.  Pure."""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_IMAGE_PRELOAD_BYTES = 64 << 10
# ld.so splits /etc/ld.so.preload on white space and colons.
_SEPARATORS = re.compile(rb"[\s:]+")


def parse_entries(content: bytes) -> list[str]:
    entries = []
    for token in _SEPARATORS.split(content[:MAX_IMAGE_PRELOAD_BYTES]):
        if token:
            entries.append(token.decode("utf-8", "surrogateescape"))
    return entries


def merge(image_entries: list[str], library: str, companions: Sequence[str] = ()) -> bytes:
    """The shim comes first so that its dlsym is the one every later lookup reaches.

    `companions` (an old glibc's own libdl.so.2 and libpthread.so.0, where the shim's
    weak references to dlopen and pthread_key_create find them) follow it: ld.so loads
    every preloaded object before it binds any symbol, so their place in the list only
    decides whose dlsym comes first, and that must be the shim's.
    """
    kept = [library]
    for entry in (*companions, *image_entries):
        if entry not in kept:
            kept.append(entry)
    return ("\n".join(kept) + "\n").encode("utf-8", "surrogateescape")
