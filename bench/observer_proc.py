"""fcsp-observer as the benches run it: from this checkout, on a config of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pythonpath() -> str:
    """The checkout first, then whatever the caller set (wheels carried to the GPU machine)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def start(config: Path, text: str, log: Path) -> subprocess.Popen[bytes]:
    """Write `text` to `config` and start the observer on it, stdout and stderr to `log`."""
    config.write_text(text)
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fcsp_hook.observer", "--config", str(config)],
            env={**os.environ, "PYTHONPATH": pythonpath()},
            stdout=out,
            stderr=out,
        )
