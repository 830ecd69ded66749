"""The observer's NVML cross-check against the simulated NVML (tests/sim): a process on a
tenant's GPU that runs without the shim is flagged, and over the tenant's memory quota the
configured action (kill) stops it, while the shimmed process is left alone.

The simulator has no pid namespaces of its own, so the tenant's "container" here is the
host's pid namespace (its init is this test process): every host process on the GPU is the
tenant's, and only those holding a LIVE record in its slot count as shimmed."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcsp_hook import procfs
from fcsp_hook.ctl import status as ctl_status
from fcsp_hook.slot import abi, live
from tests.shim.harness import PROG_DIR, SIM_DIR, Env, build, read_until_ready
from tests.test_observer import Host, wait_for

GiB = 1 << 30


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    yield h
    h.stop_all()


def clock_env(tmp_path: Path, clock: Path) -> dict[str, str]:
    """The observer's environment for one simulated GPU whose NVML clock is read from clock."""
    return {
        "LD_LIBRARY_PATH": str(SIM_DIR),
        "FCSP_SIM_STATE": str(tmp_path / "sim"),
        "FCSP_SIM_DEVICES": "1",
        "FCSP_SIM_CLOCK_FILE": str(clock),
    }


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


def test_clock_normalisation_learns_the_full_load_clock(host: Host, tmp_path: Path) -> None:
    """clock_normalise = "full-load": while the (simulated) GPU is busy at 1500 MHz and at
    its power limit the observer learns that clock; when a throttled GPU then runs at 1980
    MHz it tells the tenant's shim to charge kernels for the speed-up: the clock ratio
    1.32, capped at clock_max_speedup_pct (here 125; 120 by default).  When the work
    running would not reach the power limit even flat out (200 W at 40 % busy of a 700 W
    GPU) there is no speed-up to charge.  Off again (SIGHUP), it writes 0."""
    clock = tmp_path / "clock"
    clock.write_text("1500 100 690 700\n")
    host.write_config('clock_normalise = "full-load"\nclock_max_speedup_pct = 125\n')
    host.add("t1")
    proc = host.start(env=clock_env(tmp_path, clock))
    limits = live.LimitsMap(host.run_dir / "tenants" / "t1" / abi.LIMITS_FILE)
    try:
        wait_for("full-load clock learned", lambda: limits.clock_scale(0) == 10000)
        clock.write_text("1980 40 600 700\n")  # throttled: partly idle, clocked up
        wait_for("scale published", lambda: limits.clock_scale(0) == 12500)
        published = {
            "full_load_mhz": 1500,
            "sm_mhz": 1980,
            "scale_centi": 12500,
            "util_pct": 40,
            "power_w": 600.0,
        }

        def clocks() -> list[object]:
            value = host.state().get("clocks", {})
            return list(value.values()) if isinstance(value, dict) else []

        wait_for("clocks in the state file", lambda: clocks() == [published])
        assert (
            "SM 1980 MHz, full load 1500 MHz: kernels charged x1.25 of their time"
            " (busy 40 %, 600 W)" in ctl_status.status_text(host.run_dir)
        )
        clock.write_text("1980 40 200 700\n")  # small kernels, far from the power limit
        wait_for("no speed-up charged", lambda: limits.clock_scale(0) == 10000)
        host.write_config('clock_normalise = "off"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for("scaling turned off", lambda: limits.clock_scale(0) == 0)
    finally:
        limits.close()
