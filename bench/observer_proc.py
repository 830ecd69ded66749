"""fcsp-observer as the benches run it: from this checkout, on a config of their own."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pythonpath() -> str:
    """The checkout first, then whatever the caller set (wheels carried to the GPU machine)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def bench_config(run_dir: Path, state_dir: Path, clock_normalise: str, max_speedup_pct: str) -> str:
    """The observer's config over a bench's slots: no metrics port; the normaliser given
    (and its cap, if any)."""
    return (
        f'[paths]\nrun_dir = "{run_dir}"\nstate_dir = "{state_dir}"\n'
        f'[observer]\nmetrics_port = 0\nclock_normalise = "{clock_normalise}"\n'
        + (f"clock_max_speedup_pct = {int(max_speedup_pct)}\n" if max_speedup_pct else "")
    )


def start(config: Path, text: str, log: Path) -> subprocess.Popen[bytes]:
    """Write `text` to `config` and start the observer on it, stdout and stderr to `log`.
    Run from the checkout: `python -m` puts the working directory first on the path, so a
    bench of another checkout run from this one would start this one's observer."""
    config.write_text(text)
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fcsp_hook.observer", "--config", str(config)],
            env={**os.environ, "PYTHONPATH": pythonpath()},
            stdout=out,
            stderr=out,
            cwd=REPO,
        )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM (the observer gives tenants their requests back), and wait for it."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
