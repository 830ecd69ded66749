"""The observer's NVML cross-check against the simulated NVML (tests/sim): a process on a
tenant's GPU that runs without the shim is flagged, and over the tenant's memory quota the
configured action (kill) stops it, while the shimmed process is left alone.

The simulator has no pid namespaces of its own, so the tenant's "container" here is the
host's pid namespace (its init is this test process): every host process on the GPU is the
tenant's, and only those holding a LIVE record in its slot count as shimmed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcsp_hook import procfs
from tests.shim.harness import PROG_DIR, SIM_DIR, Env, build, read_until_ready
from tests.test_observer import Host, wait_for

GiB = 1 << 30


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    yield h
    h.stop_all()


def _client(env: Env, *, shim: bool, commands: list[str]) -> subprocess.Popen[str]:
    build()
    proc = subprocess.Popen(
        [str(PROG_DIR / "drv_procaddr"), *commands],
        env=env.environ(preload=shim),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    read_until_ready(proc)
    return proc


def test_unshimmed_process_is_flagged_and_killed_over_quota(host: Host, tmp_path: Path) -> None:
    """NVML (simulated) lists both processes; the observer names the one without the
    shim in its state, and once the tenant's memory passes its 1 GiB quota it kills that
    one (over_quota_action = kill), not the shimmed one."""
    host.write_config('nvml_interval_ms = 1000\nover_quota_action = "kill"\n')
    slot_dir = host.add("t1", mem=GiB)
    own = procfs.proc_stat(os.getpid())
    assert own is not None
    host.set_init("t1", os.getpid(), own[1])
    env = Env(state=tmp_path / "sim", slot=slot_dir)
    shimmed = _client(env, shim=True, commands=["init", "alloc", "mem", "256M", "wait"])
    bypass = _client(
        env,
        shim=False,
        commands=["init", "alloc", "mem", "512M", "wait", "alloc", "mem", "1G", "wait"],
    )
    try:
        host.start(
            env={
                "LD_LIBRARY_PATH": str(SIM_DIR),
                "FCSP_SIM_STATE": str(env.state),
                "FCSP_SIM_DEVICES": "1",
                "FCSP_SIM_MEM_BYTES": str(env.mem_bytes),
            }
        )

        def unshimmed() -> list[int]:
            tenant = host.state().get("tenants", {}).get("t1", {})  # type: ignore[union-attr]
            return list(tenant.get("unshimmed_host_pids", []))  # type: ignore[union-attr]

        wait_for("the process without the shim is flagged", lambda: bypass.pid in unshimmed())
        assert shimmed.pid not in unshimmed()
        assert host.state()["nvml"] == "ok"
        assert bypass.poll() is None  # 768 MiB in all: under the quota, only flagged

        assert bypass.stdin is not None
        bypass.stdin.write("\n")  # now take 1 GiB more: 1.75 GiB against a 1 GiB quota
        bypass.stdin.flush()
        wait_for("the bypassing process is killed", lambda: bypass.poll() is not None)
        assert bypass.returncode == -9
        assert shimmed.poll() is None
        assert "over memory quota" in host.log_text()
    finally:
        for proc in (shimmed, bypass):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
