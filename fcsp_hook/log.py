"""JSON-lines logging for the hook.

The hook runs on every container start, so it writes structlog's JSON shape
(event, level, timestamp, plus bound keys such as container_id) without importing
structlog, whose import alone costs ~60 ms there.  The long-running observer and
fcspctl use structlog itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


@dataclass
class HookLogger:
    """Appends one JSON object per event to a file; errors are also printed to stderr."""

    path: Path | None
    bound: dict[str, object] = field(default_factory=dict)
    stderr: TextIO = sys.stderr

    def bind(self, **values: object) -> None:
        self.bound.update(values)

    def _write(self, level: str, event: str, values: dict[str, object]) -> None:
        if self.path is None:
            return
        record: dict[str, object] = {
            "event": event,
            "level": level,
            "timestamp": _timestamp(),
            "logger": "fcsp-hook",
        }
        record.update(self.bound)
        record.update(values)
        line = json.dumps(record, default=str, ensure_ascii=True) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            print(f"fcsp-hook: cannot write log {self.path}: {exc.strerror}", file=self.stderr)

    def info(self, event: str, **values: object) -> None:
        self._write("info", event, values)

    def warning(self, event: str, **values: object) -> None:
        self._write("warning", event, values)

    def error(self, event: str, **values: object) -> None:
        """Logged and printed: the engine (podman run, docker run) shows the hook's stderr."""
        self._write("error", event, values)
        print(f"fcsp-hook: {event}", file=self.stderr)
