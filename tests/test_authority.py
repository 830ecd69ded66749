"""The host is the authority: a tenant that attacks is held by what it cannot write.

Each test runs the real fcsp-observer against the simulated driver and NVML (tests/sim),
with the tenant's "container" a real cgroup the test makes, recorded in its slot as the
hook records it.  Its processes run the driver-API client (tests/shim/drv.c), with or
without the shim.  The simulated driver gives every context 300 MiB that NVML counts and
the shim does not, and counts up to 600 us of the time each kernel waits behind another
process's work as its own (FCSP_SIM_WAIT_COUNTS_US): on an H100 a shimmed tenant at 10 %
read 25-61 % beside one that took the whole GPU, and so does a simulated one.  Like the
H100's driver, the simulated NVML keeps no per-process sample of a process frozen when
the sample ends, and gives the whole GPU's samples (bench/results/frozen-samples.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcsp_hook import cgroups, mps, procfs
from fcsp_hook.ctl import status as ctl_status
from fcsp_hook.slot import abi, files, live
from tests.cgroup import fresh_cgroup
from tests.observer.scene import UsageWriter
from tests.shim.harness import PROG_DIR, SHIM, SIM_DIR, build, read_until_ready, sim_uuid
from tests.test_mps import SIM_CONTROL
from tests.test_observer import Host, wait_for

MiB, GiB = 1 << 20, 1 << 30
CONTEXT = 300 * MiB
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def group() -> Iterator[cgroups.Cgroup]:
    with fresh_cgroup() as g:
        yield g


# FCSP's library is the shim the tests' processes preload: the observer checks which of
# them map it.
OBSERVER_CONFIG = (
    f'nvml_interval_ms = 1000\nprocess_allowance_mib = 64\n[hook]\nlibrary = "{SHIM}"\n'
)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    build()
    h = Host(tmp_path)
    h.write_config(OBSERVER_CONFIG)
    yield h
    h.stop_all()


@pytest.fixture
def mps_host() -> Iterator[Host]:
    """A host whose GPU is an MPS GPU, under /tmp: the daemon's socket paths must be short."""
    build()
    root = Path(tempfile.mkdtemp(prefix="fcsp-auth-", dir="/tmp"))
    host = Host(root)
    host.write_config(OBSERVER_CONFIG)
    with host.config.open("a") as config:
        config.write(f'[backend]\ngpus = {{ "0" = "mps" }}\nmps_control = "{SIM_CONTROL}"\n')
    try:
        yield host
    finally:
        host.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def sim_env(host: Host) -> dict[str, str]:
    return {
        "LD_LIBRARY_PATH": str(SIM_DIR),
        "FCSP_SIM_STATE": str(host.root / "sim"),
        "FCSP_SIM_DEVICES": "1",
        "FCSP_SIM_MEM_BYTES": str(16 * GiB),
        "FCSP_SIM_CONTEXT_BYTES": str(CONTEXT),
        "FCSP_SIM_WAIT_COUNTS_US": "600",
    }


class Tenant:
    """A slot, and a cgroup as its container, whose init is a sleeping process."""

    def __init__(self, host: Host, cid: str, group: cgroups.Cgroup, **slot: object) -> None:
        self.host, self.cid, self.group = host, cid, group
        self.procs: list[subprocess.Popen[str]] = []
        self.slot = host.add(cid, **slot)  # type: ignore[arg-type]
        (self.slot / cgroups.CGROUP_FILE).write_text(group.to_text())
        init = self.start(["sleep", "600"], wait=False)
        stat = procfs.proc_stat(init.pid)
        assert stat is not None
        host.set_init(cid, init.pid, stat[1])

    def start(
        self, argv: list[str], *, shim: bool = False, wait: bool = True, **sim: str
    ) -> subprocess.Popen[str]:
        """A process in the tenant's cgroup from its first instruction on; sim: the
        simulator's settings for it that differ from sim_env's."""
        env = {"PATH": "/usr/bin:/bin", **sim_env(self.host), **sim}
        if shim:
            env |= {"LD_PRELOAD": str(SHIM), "FCSP_SLOT_DIR": str(self.slot)}
        procs = self.group.directory / "cgroup.procs"
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: procs.write_text("0\n"),  # noqa: PLW1509  # this process
        )
        self.procs.append(proc)
        if wait:
            read_until_ready(proc)
        return proc

    def client(self, *commands: str, shim: bool = False, **sim: str) -> subprocess.Popen[str]:
        return self.start([str(PROG_DIR / "drv_procaddr"), *commands], shim=shim, **sim)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def tenants(host: Host, group: cgroups.Cgroup) -> Iterator[list[Tenant]]:
    made: list[Tenant] = []
    yield made
    group.set_frozen(False)
    for t in made:
        t.stop()


def _tenant_state(host: Host, cid: str) -> dict[str, object]:
    value = host.state().get("tenants", {})
    assert isinstance(value, dict)
    info = value.get(cid, {})
    return info if isinstance(info, dict) else {}


def _counted(host: Host, cid: str) -> bool:
    """The NVML check has counted the tenant's memory."""
    counted = _tenant_state(host, cid).get("driver_memory_bytes")
    return isinstance(counted, list) and bool(counted) and counted[0] is not None


def _ticks(host: Host) -> int:
    value = host.state().get("ticks", 0)
    return value if isinstance(value, int) else 0


def test_an_honest_tenant_at_its_quota_is_never_touched(
    host: Host, group: cgroups.Cgroup, tenants: list[Tenant]
) -> None:
    """1 GiB, three shimmed processes holding all of it: NVML counts each one's context on
    top, the host allows it, nobody is stopped."""
    tenant = Tenant(host, "honest", group, mem=GiB)
    tenants.append(tenant)
    third = str(GiB // 3)
    procs = [tenant.client("init", "alloc", "mem", third, "wait", shim=True) for _ in range(3)]
    host.start(env=sim_env(host))
    wait_for("the NVML check to count the tenant", lambda: _counted(host, "honest"))
    ticks = _ticks(host)
    wait_for(
        "three more checks (one a second, twenty ticks each)", lambda: _ticks(host) > ticks + 70
    )
    assert all(p.poll() is None for p in procs)
    assert "over memory quota" not in host.log_text()


@pytest.mark.parametrize("disguise", ["forged record", "renamed", "own pid namespace"])
def test_memory_past_the_quota_is_stopped_however_the_tenant_hides(
    host: Host, group: cgroups.Cgroup, tenants: list[Tenant], tmp_path: Path, disguise: str
) -> None:
    """A process without the shim takes 2 GiB under a 1 GiB quota, and hides: a LIVE record
    forged in the usage file for it, a binary named like the MPS server, or a pid namespace
    of its own.  Its cgroup gives it away: it is stopped; the honest process is not."""
    tenant = Tenant(host, "t", group, mem=GiB)
    tenants.append(tenant)
    honest = tenant.client("init", "alloc", "mem", "256M", "wait", shim=True)
    program = PROG_DIR / "drv_procaddr"
    argv = [str(program), "init", "alloc", "mem", "2G", "wait"]
    if disguise == "renamed":
        program = tmp_path / "nvidia-cuda-mps-server"
        shutil.copy(PROG_DIR / "drv_procaddr", program)
        argv[0] = str(program)
    if disguise == "own pid namespace":
        argv = ["unshare", "--pid", "--fork", *argv]
    bypass = tenant.start(argv)
    if disguise == "forged record":
        record = abi.UsageProc(state=abi.ProcState.LIVE, pid=bypass.pid, heartbeat_ns=1)
        with (tenant.slot / abi.USAGE_FILE).open("r+b") as usage:
            usage.seek(abi.Usage.proc.offset + 5 * len(bytes(record)))
            usage.write(bytes(record))
    host.start(env=sim_env(host))
    wait_for("the bypassing process stopped", lambda: bypass.poll() is not None)
    assert honest.poll() is None
    assert "over memory quota: processes killed" in host.log_text()


def _driver_share(host: Host, pids: list[int], seconds: int) -> subprocess.Popen[str]:
    """A probe that prints the percent of the GPU's time the processes ran over the next
    seconds, by NVML's count: the mean of their 200 ms samples, as the driver gives them,
    those of the samples that end while they are frozen included (the driver keeps none)."""
    probe = (
        "import sys, time, pynvml\n"
        "pynvml.nvmlInit()\n"
        "h = pynvml.nvmlDeviceGetHandleByIndex(0)\n"
        "n, seen, got = int(sys.argv[1]), 0, []\n"
        "pids = {int(p) for p in sys.argv[2:]}\n"
        "while len(got) < n:\n"
        "    try:\n"
        "        s = pynvml.nvmlDeviceGetProcessUtilization(h, seen)\n"
        "    except pynvml.NVMLError:\n"
        "        s = []\n"
        "    if s and max(x.timeStamp for x in s) > seen:\n"
        "        seen = max(x.timeStamp for x in s)\n"
        "        got.append(sum(x.smUtil for x in s if x.pid in pids))\n"
        "    time.sleep(0.05)\n"
        "print(sum(got) / n)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", probe, str(seconds * 5), *map(str, pids)],
        env={**sim_env(host), "PATH": "/usr/bin:/bin", "FCSP_SIM_NVML_SEES_FROZEN": "1"},
        stdout=subprocess.PIPE,
        text=True,
    )


# As on an H100 at 40 %: the shimmed tenant, whose few kernels wait behind the other's time
# slices, reads more than the one that bypasses its shim, whose deep queue they barely delay
# (79 % for 42 % of its solo throughput).
AS_AT_40 = {"greedy": "0", "honest": "5000"}


@pytest.mark.parametrize(
    ("share", "waits_us", "forged"),
    [
        (10, {}, False),
        (40, AS_AT_40, False),
        # Its process recorded as the shim's in its usage file: the host sees that the
        # process maps no FCSP library, and suspects it first all the same.
        (40, AS_AT_40, True),
    ],
)
def test_a_tenant_that_escapes_its_shim_is_held_to_its_share(
    host: Host,
    group: cgroups.Cgroup,
    tenants: list[Tenant],
    *,
    share: int,
    waits_us: dict[str, str],
    forged: bool,
) -> None:
    """Strict at share %, kernels launched without the shim as fast as the GPU runs them: by
    NVML's count it is frozen part of the time and held within 5 points of its share over
    5 s.  An honest tenant beside it, strict at the same share and as busy, under its shim,
    is never frozen, though NVML counts the time its kernels wait behind the other's as its
    own, and keeps no sample of the held one's while it is frozen at the sample's end."""
    tenant = Tenant(host, "greedy", group, sm=share * 100, mode=abi.IsolationMode.STRICT)
    tenants.append(tenant)
    with fresh_cgroup() as other:
        honest_tenant = Tenant(host, "honest", other, sm=share * 100, mode=abi.IsolationMode.STRICT)
        tenants.append(honest_tenant)
        run = ("init", "func", "k_200us", "wait", "run", "kernel", "0", "60")
        waits = {cid: {"FCSP_SIM_WAIT_COUNTS_US": us} for cid, us in waits_us.items()}
        greedy = tenant.client(*run, **waits.get("greedy", {}))
        honest = honest_tenant.client(*run, shim=True, **waits.get("honest", {}))
        if forged:
            usage = UsageWriter(tenant.slot)
            usage.process(0, greedy.pid)
            usage.close()
        host.start(env=sim_env(host))
        for proc in (greedy, honest):
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
        wait_for("held by the host", lambda: _held(host, "greedy") > 0 == _held(host, "honest"))
        time.sleep(6)  # a window held: what it is held to, not the first guess
        probe = _driver_share(host, [greedy.pid], 5)
        honest_held = []
        while probe.poll() is None:  # a whole window held
            honest_held.append(_held(host, "honest"))
            time.sleep(0.2)
        assert float(probe.communicate()[0]) <= share + 5.0
        assert max(honest_held) == 0
        assert honest.poll() is None
        holds = [
            e["container_id"]
            for e in _events(
                host, "tenant above its share by the driver's count: frozen part of the time"
            )
        ]
        assert "greedy" in holds and "honest" not in holds
        lines = ctl_status.status_text(host.run_dir).splitlines()
        rows = {line.split()[0]: line for line in lines if line.strip()}
        assert "HELD" in rows["greedy"] and "HELD" not in rows["honest"]
        assert isinstance(_tenant_state(host, "greedy").get("held_reading_pct"), int)
        assert _tenant_state(host, "honest").get("held_reading_pct") is None
        other.set_frozen(False)
        honest_tenant.stop()


def test_an_mps_tenant_that_runs_outside_mps_is_held_by_time(
    group: cgroups.Cgroup, tenants: list[Tenant], mps_host: Host
) -> None:
    """Strict 10 % on an MPS GPU, kernels launched as fast as the GPU runs them by a process
    that skips both the shim and MPS (a context of its own, time-sliced beside the MPS
    server, outside every thread percentage): held by time, within 5 points of its share
    over 5 s.  A tenant whose MPS client is as busy under its shim is never frozen: the
    driver's per-process utilisation does not tell MPS clients apart, and the daemon caps
    their SMs."""
    host = mps_host
    on_mps = {"sm": 1000, "mode": abi.IsolationMode.STRICT, "backend": abi.Backend.MPS}
    greedy_tenant = Tenant(host, "greedy", group, uuid=sim_uuid(0), **on_mps)
    tenants.append(greedy_tenant)
    with fresh_cgroup() as other:
        honest_tenant = Tenant(host, "honest", other, uuid=sim_uuid(0), **on_mps)
        tenants.append(honest_tenant)
        host.start(env=sim_env(host))
        wait_for("the GPU's MPS daemon", lambda: mps.ready(host.run_dir, sim_uuid(0)))
        (honest_tenant.slot / abi.MPS_DIR).symlink_to(mps.client_dir(host.run_dir, sim_uuid(0)))
        run = ("init", "func", "k_200us", "wait", "run", "kernel", "0", "60")
        greedy = greedy_tenant.client(*run)
        honest = honest_tenant.client(*run, shim=True)
        for proc in (greedy, honest):
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()

        def named(cid: str, key: str) -> list[object]:
            value = _tenant_state(host, cid).get(key, [])
            return value if isinstance(value, list) else []

        wait_for("held by the host", lambda: _held(host, "greedy") > 0)
        assert named("greedy", "outside_mps_host_pids") == [greedy.pid]
        assert named("honest", "mps_client_host_pids") == [honest.pid]
        time.sleep(6)  # a window held: what it is held to, not the first guess
        probe = _driver_share(host, [greedy.pid], 5)
        honest_held = []
        while probe.poll() is None:
            honest_held.append(_held(host, "honest"))
            time.sleep(0.2)
        assert float(probe.communicate()[0]) <= 10 + 5.0
        assert max(honest_held) == 0 and honest.poll() is None
        other.set_frozen(False)
        honest_tenant.stop()


def test_several_mps_processes_of_a_tenant_are_held_to_its_share_together(
    group: cgroups.Cgroup, tenants: list[Tenant], mps_host: Host
) -> None:
    """Strict 30 % on an MPS GPU: MPS caps each process's SMs, not the tenant's, so three
    busy processes would run 30 % each.  The observer publishes how many MPS processes the
    tenant has, and their shims hold the three to 30 % together, within 5 points over 5 s
    by the driver's count; one process alone runs its 30 %, not slowed by the shim."""
    host = mps_host
    tenant = Tenant(
        host,
        "three",
        group,
        uuid=sim_uuid(0),
        sm=3000,
        mode=abi.IsolationMode.STRICT,
        backend=abi.Backend.MPS,
    )
    tenants.append(tenant)
    host.start(env=sim_env(host))
    wait_for("the GPU's MPS daemon", lambda: mps.ready(host.run_dir, sim_uuid(0)))
    (tenant.slot / abi.MPS_DIR).symlink_to(mps.client_dir(host.run_dir, sim_uuid(0)))
    limits = live.LimitsMap(tenant.slot / abi.LIMITS_FILE)

    def run() -> subprocess.Popen[str]:
        proc = tenant.client(
            "init", "func", "k_200us", "wait", "run", "kernel", "0", "60", shim=True
        )
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        return proc

    first = run()
    wait_for("one MPS process seen", lambda: limits.mps_processes(0) == 1)
    alone = float(_driver_share(host, [first.pid], 3).communicate()[0])
    procs = [first, run(), run()]
    wait_for("three MPS processes seen", lambda: limits.mps_processes(0) == 3)
    time.sleep(1)
    together = float(_driver_share(host, [p.pid for p in procs], 5).communicate()[0])
    limits.close()
    assert alone >= 30 - 5
    assert 30 - 5 <= together <= 30 + 5
    assert all(p.poll() is None for p in procs)


def _events(host: Host, event: str) -> list[dict[str, object]]:
    """The observer's log entries of this event."""
    entries = (json.loads(line) for line in host.log_text().splitlines() if line.startswith("{"))
    return [e for e in entries if e.get("event") == event]


def _held(host: Host, cid: str) -> int:
    value = _tenant_state(host, cid).get("held_pct", 0)
    return value if isinstance(value, int) else 0


def test_out_of_descriptors_the_observer_deletes_no_live_slot(host: Host) -> None:
    """The observer limited to 64 descriptors, 40 tenants of running containers (3
    descriptors each): it cannot open them all, nor read /proc at times, yet it deletes
    no slot and keeps running."""
    own = procfs.proc_stat(os.getpid())
    assert own is not None
    names = [f"c{i}" for i in range(40)]
    for name in names:
        host.add(name)
        host.set_init(name, os.getpid(), own[1])
    proc = host.start()
    prlimit = subprocess.run(
        ["prlimit", f"--pid={proc.pid}", "--nofile=64:64"], capture_output=True, check=False
    )
    assert prlimit.returncode == 0, prlimit.stderr
    ticks = _ticks(host) if host.state() else 0
    wait_for("twenty reaps", lambda: _ticks(host) > ticks + 40)
    assert proc.poll() is None
    assert all(files.slot_path(host.run_dir, n).exists() for n in names)
    assert "container gone, slot reaped" not in host.log_text()
    assert "tenant not watched" in host.log_text()  # said, not silent
