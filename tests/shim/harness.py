"""Running the driver-API test clients through libvgpu.so on the simulated driver.

Used by tests/test_shim_*.py.  Every run gets a private environment: the simulated
driver (tests/build/sim) on LD_LIBRARY_PATH, a simulator state file shared by the
processes of one test, and the slot directory (if any) in FCSP_SLOT_DIR.  BUD_* and
FCSP_* variables of the calling environment never leak in.
"""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fcsp_hook.slot import abi, uvm
from fcsp_hook.slot.files import DeviceLimits, SlotSpec, read_usage, write_slot

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "shim" / "libvgpu.so"
SIM_DIR = REPO / "tests" / "build" / "sim"
PROG_DIR = REPO / "tests" / "build" / "shim"
MiB = 1 << 20
GiB = 1 << 30
OOM = 2  # CUDA_ERROR_OUT_OF_MEMORY


@functools.cache
def build() -> None:
    """Build the shim, the simulator and the clients once per session (make is incremental)."""
    subprocess.run(["make", "-s", "-C", str(REPO), "all"], check=True, capture_output=True)


def sim_uuid(index: int) -> str:
    """The UUID the simulator gives device `index` by default."""
    raw = bytes([0x5E, 0x1F] + [0] * 13 + [index])
    h = raw.hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def make_slot(
    directory: Path,
    limits: list[int] | None = None,
    *,
    basis_points: list[int] | None = None,
    mode: abi.MemMode = abi.MemMode.HARD,
    uuids: list[str] | None = None,
    spill_bytes: int = 0,
    spill_centi: int = 0,
    uvm_profile: str = "default",
) -> Path:
    """A slot directory with one entry per device: byte limits and/or percentages; spill
    mode's bound past the quota (bytes, or 1/100 of the quota) and profile for every one."""
    count = max(len(limits or []), len(basis_points or []), len(uuids or []), 1)
    devices = tuple(
        DeviceLimits(
            host_index=i,
            uuid=(uuids or [""] * count)[i],
            mem_limit_bytes=(limits or [0] * count)[i],
            mem_limit_basis_points=(basis_points or [0] * count)[i],
            mem_spill_bytes=spill_bytes,
            mem_spill_centi=spill_centi,
        )
        for i in range(count)
    )
    spec = SlotSpec(
        container_id=directory.name, mem_mode=mode, devices=devices, uvm=uvm.PROFILES[uvm_profile]
    )
    write_slot(directory, spec, {})
    return directory


def steps(text: str) -> list[str]:
    """A test program's command line, written as one line."""
    return text.split()


def usage(slot: Path) -> abi.Usage:
    return read_usage(slot / abi.USAGE_FILE)


def live_records(slot: Path) -> dict[int, list[int]]:
    """pid -> per-device charge of every LIVE process record."""
    u = usage(slot)
    return {p.pid: list(p.mem_used_bytes) for p in u.proc if p.state == abi.ProcState.LIVE}


@dataclass
class Env:
    """What one test's processes share: simulator state, devices, slot, extra variables."""

    state: Path
    slot: Path | None = None
    devices: int = 1
    mem_bytes: int = 16 * GiB
    extra: dict[str, str] | None = None

    def environ(self, *, preload: bool = True) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("BUD_", "FCSP_", "LD_PRELOAD", "LD_LIBRARY_PATH"))
        }
        env |= {
            "LD_LIBRARY_PATH": str(SIM_DIR),
            "FCSP_SIM_STATE": str(self.state),
            "FCSP_SIM_DEVICES": str(self.devices),
            "FCSP_SIM_MEM_BYTES": str(self.mem_bytes),
        }
        if preload:
            env["LD_PRELOAD"] = str(SHIM)
        if self.slot is not None:
            env["FCSP_SLOT_DIR"] = str(self.slot)
        env |= self.extra or {}
        return env


@dataclass
class Result:
    rc: int
    lines: list[str]
    stderr: str

    def field(self, word: str) -> list[str]:
        """The words of the first line starting with `word`."""
        for line in self.lines:
            parts = line.split()
            if parts and parts[0] == word:
                return parts
        raise AssertionError(f"no {word!r} line in {self.lines}")

    def outcomes(self) -> list[str]:
        """'ok' or 'err N' for every allocation, in order."""
        return [line for line in self.lines if line.startswith(("ok ", "err "))]


def run(
    env: Env,
    *args: str,
    prog: str = "drv_procaddr",
    preload: bool = True,
    timeout: float = 30,
) -> Result:
    build()
    proc = subprocess.run(
        [str(PROG_DIR / prog), *args],
        env=env.environ(preload=preload),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Result(proc.returncode, proc.stdout.splitlines(), proc.stderr)


def start(env: Env, *args: str, prog: str = "drv_procaddr") -> subprocess.Popen[str]:
    """Start a client that will block at its first `wait` (after printing 'ready')."""
    build()
    return subprocess.Popen(
        [str(PROG_DIR / prog), *args],
        env=env.environ(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until_ready(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    for raw in proc.stdout:
        line = raw.strip()
        if line == "ready":
            return lines
        lines.append(line)
    stderr = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"client exited before 'ready': {lines} {stderr}")
