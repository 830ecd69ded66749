"""observer.backends: an MPS control daemon (the simulated one, tests/sim) for each GPU that
config.toml puts on mps and for no other; stopped when the config drops it; a client's fault
charged to every MPS tenant of that GPU."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fcsp_hook import config, mps
from fcsp_hook.observer import mpsd
from fcsp_hook.observer.backends import Backends
from fcsp_hook.observer.tenants import Tenants
from fcsp_hook.slot import abi, files
from tests.observer.scene import Scene
from tests.shim.harness import SIM_DIR, build

SIM_CONTROL = SIM_DIR / "bin" / "nvidia-cuda-mps-control"
GPU0 = "GPU-00000000-0000-0000-0000-0000000000b0"
GPU1 = "GPU-00000000-0000-0000-0000-0000000000b1"
FAULT_LINE = (
    "[2026-11-29 13:17:21.118 Server  1094] Client {PID: 1263, Context: 1} "
    "encountered a fatal GPU error.\n"
)


def _driver_dir(base: Path) -> Path:
    """The driver's procfs files for two GPUs, minors 0 and 1."""
    for minor, gpu in ((0, GPU0), (1, GPU1)):
        info = base / "gpus" / f"0000:{minor:02x}:00.0" / "information"
        info.parent.mkdir(parents=True)
        info.write_text(f"GPU UUID: \t {gpu}\nDevice Minor: \t {minor}\n")
    return base


@pytest.fixture
def mps_scene() -> Iterator[Scene]:
    """GPU 1 on mps.  Under /tmp: a socket path must fit in 108 bytes."""
    build()
    root = Path(tempfile.mkdtemp(prefix="fcsp-duty-", dir="/tmp"))
    scene = Scene.create(
        root,
        driver_dir=_driver_dir(root / "driver"),
        backend={"gpus": {"1": "mps"}, "mps_control": str(SIM_CONTROL)},
    )
    yield scene
    for daemon in scene.state.backends.values():
        if daemon.pid:
            with contextlib.suppress(OSError):
                os.kill(daemon.pid, signal.SIGKILL)
    scene.close()
    shutil.rmtree(root, ignore_errors=True)


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while mpsd.is_mps_process(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not mpsd.is_mps_process(pid)


def test_a_daemon_runs_for_the_mps_gpu_only_and_stops_with_the_config(mps_scene: Scene) -> None:
    duty = Backends()
    duty.run(mps_scene.state, 0)
    assert sorted(mps_scene.state.backends) == [GPU1]
    daemon = mps_scene.state.backends[GPU1]
    assert daemon.backend == "mps" and mpsd.is_mps_process(daemon.pid)
    assert mps.ready(mps_scene.run_dir, GPU1) and not mps.ready(mps_scene.run_dir, GPU0)
    pid = daemon.pid
    mps_scene.state.cfg = replace(mps_scene.state.cfg, backend=config.BackendConfig())
    duty.run(mps_scene.state, 0)
    assert mps_scene.state.backends == {}
    assert _gone(pid) and not mps.ready(mps_scene.run_dir, GPU1)
    assert mps_scene.events("MPS backend no longer configured; stopping its daemon")


def test_a_fault_is_charged_to_the_gpus_mps_tenants(mps_scene: Scene) -> None:
    """The server's fatal-error line: the MPS tenant on that GPU is charged (its clients
    were torn down), the time-sliced tenant on the other GPU is not; the daemon restarts."""
    for cid, index, gpu, backend in (
        ("on-mps", 1, GPU1, abi.Backend.MPS),
        ("on-timeslice", 0, GPU0, abi.Backend.TIMESLICE),
    ):
        mps_scene.add(cid, files.DeviceLimits(host_index=index, uuid=gpu, backend=backend))
    mps_scene.run(Tenants())
    duty = Backends()
    duty.run(mps_scene.state, 0)
    first = mps_scene.state.backends[GPU1].pid
    with (mps.gpu_dir(mps_scene.run_dir, GPU1) / "log" / mpsd.SERVER_LOG).open("a") as f:
        f.write(FAULT_LINE)
    duty.run(mps_scene.state, 0)
    assert mps_scene.tenant("on-mps").mps_faults == 1
    assert mps_scene.tenant("on-timeslice").mps_faults == 0
    assert mps_scene.state.backends[GPU1].faults == 1
    duty.run(mps_scene.state, 0)
    assert mps_scene.state.backends[GPU1].pid not in (0, first)
    assert mps_scene.events("tenant hit by an MPS fault on its GPU")
