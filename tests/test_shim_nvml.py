"""NVML inside the tenant: nvmlDeviceGetMemoryInfo(_v2) show the quota and the tenant's
charge, read from the slot even by a process that never touched CUDA (nvidia-smi)."""

from __future__ import annotations

from pathlib import Path

from fcsp_hook.slot import abi
from tests.shim.harness import Env, GiB, MiB, make_slot, read_until_ready, run, sim_uuid, start


def _nvml(r_lines: list[str]) -> dict[str, list[int]]:
    return {f"{p[0]}:{p[1]}": [int(x) for x in p[2:]] for p in (line.split() for line in r_lines)}


def test_nvml_shows_quota_and_tenant_usage(tmp_path: Path) -> None:
    """With 256 MiB held by another process of the tenant, NVML reports total = 1 GiB,
    used = 256 MiB, free = 768 MiB, in both structure versions, and no reserved memory."""
    env = Env(state=tmp_path / "sim-state", slot=make_slot(tmp_path / "slot", [GiB]))
    holder = start(env, "init", "alloc", "mem", "256M", "wait")
    try:
        read_until_ready(holder)
        r = run(env, prog="nvmlq")
        assert r.rc == 0, r.stderr
        got = _nvml(r.lines)
        assert got["nvml:0"] == [GiB, 768 * MiB, 256 * MiB]
        assert got["nvml2:0"] == [GiB, 768 * MiB, 256 * MiB, 0]
    finally:
        holder.communicate("go\n", timeout=10)


def test_nvml_free_never_underflows(tmp_path: Path) -> None:
    """Past a soft quota, free is 0 and used is capped at the total, never a wrapped value."""
    env = Env(
        state=tmp_path / "sim-state",
        slot=make_slot(tmp_path / "slot", [64 * MiB], mode=abi.MemMode.SOFT),
    )
    holder = start(env, "init", "alloc", "mem", "100M", "wait")
    try:
        read_until_ready(holder)
        got = _nvml(run(env, prog="nvmlq").lines)
        assert got["nvml:0"] == [64 * MiB, 0, 64 * MiB]
        assert got["nvml2:0"] == [64 * MiB, 0, 64 * MiB, 0]
    finally:
        holder.communicate("go\n", timeout=10)


def test_nvml_maps_devices_by_uuid(tmp_path: Path) -> None:
    """Slot entries carrying UUIDs apply to the NVML device with that UUID."""
    env = Env(
        state=tmp_path / "sim-state",
        devices=2,
        slot=make_slot(tmp_path / "slot", [100 * MiB, 200 * MiB], uuids=[sim_uuid(1), sim_uuid(0)]),
    )
    got = _nvml(run(env, prog="nvmlq").lines)
    assert got["nvml:0"][0] == 200 * MiB
    assert got["nvml:1"][0] == 100 * MiB


def test_nvml_pass_through_without_slot(tmp_path: Path) -> None:
    """Without a slot or BUD_* NVML answers are the driver's own."""
    env = Env(state=tmp_path / "sim-state", mem_bytes=4 * GiB)
    got = _nvml(run(env, prog="nvmlq").lines)
    assert got["nvml:0"] == [4 * GiB, 4 * GiB, 0]
    assert got["nvml2:0"][0] == 4 * GiB and got["nvml2:0"][3] > 0  # the sim's reserve shows
