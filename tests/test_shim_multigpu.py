"""Several GPUs in one tenant, on the simulated driver: each device has its own share and
bucket, and slot entries follow device UUIDs whatever order CUDA enumerates them in."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fcsp_hook.slot import abi
from fcsp_hook.slot.files import DeviceLimits, SlotSpec, write_slot
from tests.shim.harness import PROG_DIR, Env, build, sim_uuid, usage

KERNEL_US = 200
SECONDS = "1.5"


def two_gpu_slot(
    directory: Path, shares: tuple[int, int], uuids: tuple[str, str] = ("", "")
) -> Path:
    devices = tuple(
        DeviceLimits(host_index=i, uuid=uuids[i], sm_requested_centi=shares[i]) for i in range(2)
    )
    spec = SlotSpec(
        container_id=directory.name, isolation_mode=abi.IsolationMode.STRICT, devices=devices
    )
    write_slot(directory, spec, {})
    return directory


def launch_loops(env: Env, ordinals: tuple[int, ...]) -> dict[int, float]:
    """One process per CUDA ordinal, all at once, each launching 200 us kernels; returns
    each one's fraction of its device's time."""
    build()
    procs = {
        ordinal: subprocess.Popen(
            [
                str(PROG_DIR / "drv_procaddr"),
                "init",
                "device",
                str(ordinal),
                "func",
                f"k_{KERNEL_US}us",
                "run",
                "kernel",
                "0",
                SECONDS,
            ],
            env=env.environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ordinal in ordinals
    }
    fractions = {}
    for ordinal, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        run = next(line.split() for line in out.splitlines() if line.startswith("run "))
        assert run[1] == "0", (out, err)
        launched, wall_ns = int(run[3]), int(run[5])
        fractions[ordinal] = launched * KERNEL_US * 1000 / wall_ns
    return fractions


def test_a_tenant_throttled_on_one_gpu_is_not_slowed_on_another(tmp_path: Path) -> None:
    """Shares of 10 % on GPU 0 and 100 % on GPU 1, both busy at once: GPU 0's work is held
    near 10 % (accepted up to 25 %: the machine is noisy) while GPU 1's runs nearly
    unthrottled (at least 70 %), and only GPU 0 reports throttled time."""
    slot = two_gpu_slot(tmp_path / "slot", (1000, 10000))
    fractions = launch_loops(Env(state=tmp_path / "sim", slot=slot, devices=2), (0, 1))
    assert fractions[0] <= 0.25, fractions
    assert fractions[1] >= 0.7, fractions
    dev = usage(slot).device
    assert dev[0].throttled_ns > 0
    assert dev[1].throttled_ns == 0
    assert dev[0].launches > 0 and dev[1].launches > 0


def test_shares_follow_uuids_not_ordinals(tmp_path: Path) -> None:
    """Slot entry 0 names the GPU that CUDA calls 1 (by UUID) and asks 10 %; entry 1 names
    CUDA's 0 and asks 100 %: the limit lands on CUDA ordinal 1, and its launches are
    counted in entry 0."""
    slot = two_gpu_slot(tmp_path / "slot", (1000, 10000), (sim_uuid(1), sim_uuid(0)))
    fractions = launch_loops(Env(state=tmp_path / "sim", slot=slot, devices=2), (0, 1))
    assert fractions[1] <= 0.25, fractions
    assert fractions[0] >= 0.7, fractions
    dev = usage(slot).device
    assert dev[0].throttled_ns > 0
    assert dev[1].throttled_ns == 0
