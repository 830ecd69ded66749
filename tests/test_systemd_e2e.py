"""systemd/fcsp-observer.service under a real systemd (PID 1 of a podman container): the
unit file as shipped, with all its hardening in force, checked through systemctl.

tests/systemd_container.py builds the container (the host's /usr, a venv of this
checkout at /opt/fcsp/venv, the simulated NVML) and says which capabilities podman adds
and why.  The one drop-in only puts the simulated libnvidia-ml on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator

import pytest

from fcsp_hook import observer as observer_module
from tests import systemd_container
from tests.systemd_container import UNIT, BootError, SystemdContainer

pytestmark = pytest.mark.e2e

TIMEOUT = 20.0
STATE = f"/run/fcsp/{observer_module.STATE_FILE}"
CONFIG = "[observer]\ninterval_ms = {interval}\nmetrics_port = 9401\nnvml_interval_ms = 1000\n"
# The unit's CapabilityBoundingSet=, as bits (linux/capability.h).
CAP_BITS = {
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_KILL": 5,
    "CAP_SYS_PTRACE": 19,
}
ADD_TENANT = """
import sys
from pathlib import Path
from fcsp_hook import procfs
from fcsp_hook.slot import files
run = Path("/run/fcsp")
init = procfs.proc_stat(1)  # this container's systemd stands for the tenant's init
devices = (files.DeviceLimits(host_index=0, sm_requested_centi=2500),)
spec = files.SlotSpec(sys.argv[1], "team-e2e", devices=devices, init_host_pid=1,
                     init_start_time=init[1])
files.ensure_tenants_dir(run)
files.write_slot(files.slot_path(run, sys.argv[1]), spec, {})
"""
METRICS = (
    "import urllib.request; print(urllib.request.urlopen("
    "'http://127.0.0.1:9401/metrics', timeout=5).read().decode())"
)


def wait_for(what: str, predicate: Callable[[], object], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {what}")


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the systemd end-to-end test cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, e2e_ready: None) -> Iterator[SystemdContainer]:
    reason = systemd_container.usable()
    if reason is not None:
        _skip_or_fail(reason)
    base = tmp_path_factory.mktemp("systemd")
    root = systemd_container.build_rootfs(base / "rootfs")
    (base / "hooks.d").mkdir()
    try:
        container = SystemdContainer.boot(root, base / "hooks.d")
    except BootError as exc:
        _skip_or_fail(f"systemd cannot boot in a podman container here: {exc}")
        raise  # not reached: pytest.skip and pytest.fail raise
    yield container
    container.remove()


def _state(box: SystemdContainer) -> dict[str, object]:
    text = box.read(STATE)
    try:
        doc = json.loads(text) if text else {}
    except ValueError:  # caught between write and rename: never, but be patient
        return {}
    return doc if isinstance(doc, dict) else {}


def _running(box: SystemdContainer) -> dict[str, str]:
    return box.show("MainPID", "ActiveState", "SubState", "NRestarts", "Result")


@pytest.fixture
def observer(box: SystemdContainer) -> int:
    """A freshly started unit with no tenants and the default tick: its MainPID.

    `systemctl start` of a Type=notify unit returns only once READY=1 arrived."""
    box.systemctl("stop", UNIT)
    box.exec("rm", "-rf", "/run/fcsp/tenants")
    box.config.write_text(CONFIG.format(interval=50))
    started = box.systemctl("start", UNIT)
    assert started.returncode == 0, f"{started.stderr}\n{box.journal()}"
    props = _running(box)
    assert props["ActiveState"] == "active", props
    assert props["SubState"] == "running", props
    assert props["NRestarts"] == "0", props
    return int(props["MainPID"])


def test_start_reaches_ready_under_the_units_sandbox(box: SystemdContainer, observer: int) -> None:
    """Type=notify: active only after the observer's READY=1; and it runs with the unit's
    hardening really applied (systemd would skip the namespacing directives silently
    if it could not set them up)."""
    props = box.show("Type", "NotifyAccess", "Result")
    assert props["Type"] == "notify"
    assert props["NotifyAccess"] == "main"
    assert props["Result"] == "success"
    wait_for("the observer's log in the journal", lambda: "observer ready" in box.journal())

    bounding = next(
        line.split("=", 1)[1].split()
        for line in systemd_container.UNIT_FILE.read_text().splitlines()
        if line.startswith("CapabilityBoundingSet=")
    )
    assert sorted(bounding) == sorted(CAP_BITS), "CAP_BITS no longer mirrors the unit"
    status = box.read(f"/proc/{observer}/status")
    assert status is not None
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # SystemCallFilter= is a seccomp filter
    assert int(fields["CapBnd"], 16) == sum(1 << bit for bit in CAP_BITS.values())
    assert int(fields["CapEff"], 16) == sum(1 << bit for bit in CAP_BITS.values())

    ns = box.exec("readlink", "/proc/1/ns/mnt", f"/proc/{observer}/ns/mnt").stdout.split()
    assert len(ns) == 2
    assert ns[0] != ns[1], "the service has no mount namespace: its Protect*= were skipped"
    mounts = box.read(f"/proc/{observer}/mountinfo")
    assert mounts is not None
    options = {line.split()[4]: line.split()[5].split(",") for line in mounts.splitlines()}
    assert "ro" in options["/"]  # ProtectSystem=strict
    assert "rw" in options["/run/fcsp"]  # ReadWritePaths=/run/fcsp
    assert "ro" in options["/root"]  # ProtectHome=yes
    private_tmp = [line.split()[3] for line in mounts.splitlines() if line.split()[4] == "/tmp"][-1]
    assert "/systemd-private-" in private_tmp  # PrivateTmp=yes
    assert "ro" in options["/proc/sys"]  # ProtectKernelTunables=yes


def test_status_text_is_the_observers_status_line(box: SystemdContainer, observer: int) -> None:
    """STATUS= from the observer shows in `systemctl show -p StatusText` and follows its
    tenants; NVML (simulated) and the metrics endpoint work inside the sandbox."""
    assert box.show("StatusText")["StatusText"] == "0 tenants on 0 GPUs, contention 0.00"

    added = box.exec(str(systemd_container.VENV / "bin" / "python3"), "-c", ADD_TENANT, "e2e-1")
    assert added.returncode == 0, added.stderr
    wait_for(
        "StatusText to count the new tenant",
        lambda: re.fullmatch(
            r"1 tenant on 1 GPU, contention \d+\.\d\d", box.show("StatusText")["StatusText"]
        ),
    )
    wait_for("the state file to show the tenant", lambda: "e2e-1" in _state(box).get("tenants", {}))  # type: ignore[operator]
    state = _state(box)
    assert state["nvml"] == "ok", state
    assert state["pid"] == observer
    tenant = state["tenants"]["e2e-1"]  # type: ignore[index]
    assert not tenant["problem"], tenant  # reads its init's /proc under the sandbox

    metrics = box.exec(str(systemd_container.VENV / "bin" / "python3"), "-c", METRICS)
    assert metrics.returncode == 0, metrics.stderr
    requested = [
        line for line in metrics.stdout.splitlines() if line.startswith("fcsp_sm_requested_ratio{")
    ]
    assert len(requested) == 1 and 'container_id="e2e-1"' in requested[0], metrics.stdout


def test_watchdog_pings_reach_systemd(box: SystemdContainer, observer: int) -> None:
    """WatchdogSec=10s: the observer pings every 5 s; each WATCHDOG=1 moves systemd's
    watchdog timestamp."""
    props = box.show("WatchdogUSec", "WatchdogTimestampMonotonic")
    assert props["WatchdogUSec"] == "10s"
    first = int(props["WatchdogTimestampMonotonic"])
    wait_for(
        "a WATCHDOG=1 ping",
        lambda: int(box.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]) > first,
        timeout=9,
    )
    assert box.show("MainPID")["MainPID"] == str(observer)


def test_reload_and_sighup_keep_it_running_with_the_new_config(
    box: SystemdContainer, observer: int
) -> None:
    """`systemctl reload` (ExecReload= kill -HUP) and a plain SIGHUP reread config.toml in
    the same process."""
    wait_for("the first state file", lambda: _state(box).get("interval_ms") == 50)

    box.config.write_text(CONFIG.format(interval=100))
    reloaded = box.systemctl("reload", UNIT)
    assert reloaded.returncode == 0, reloaded.stderr
    wait_for("the reloaded tick", lambda: _state(box).get("interval_ms") == 100)
    props = _running(box)
    assert props["MainPID"] == str(observer)
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")

    box.config.write_text(CONFIG.format(interval=75))
    hup = box.systemctl("kill", "--kill-whom=main", "--signal=SIGHUP", UNIT)
    assert hup.returncode == 0, hup.stderr
    wait_for("the tick after SIGHUP", lambda: _state(box).get("interval_ms") == 75)
    props = _running(box)
    assert props["MainPID"] == str(observer)
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    wait_for(
        "both reloads in the journal",
        lambda: box.journal(pid=observer).count("config reloaded") == 2,
    )


def test_sigkill_is_restarted_on_failure(box: SystemdContainer, observer: int) -> None:
    """Restart=on-failure, RestartSec=1s: a killed observer comes back as a new process
    that reaches READY again."""
    killed = box.systemctl("kill", "--signal=SIGKILL", UNIT)
    assert killed.returncode == 0, killed.stderr

    def back() -> bool:
        props = _running(box)
        return (
            props["ActiveState"] == "active"
            and props["SubState"] == "running"
            and props["MainPID"] not in {"0", str(observer)}
        )

    wait_for("the restarted observer", back)
    props = _running(box)
    assert props["NRestarts"] == "1"
    wait_for(
        "systemd's note of the kill",
        lambda: "Main process exited, code=killed, status=9/KILL" in box.journal(),
    )
    wait_for(
        "the new process's state file", lambda: _state(box).get("pid") == int(props["MainPID"])
    )


def test_stop_ends_it_cleanly(box: SystemdContainer, observer: int) -> None:
    """SIGTERM: the observer hands tenants back, removes its state file and exits 0,
    well within TimeoutStopSec=10s; /run/fcsp stays (RuntimeDirectoryPreserve=yes)."""
    wait_for("the state file", lambda: _state(box).get("pid") == observer)
    stopped = box.systemctl("stop", UNIT)
    assert stopped.returncode == 0, stopped.stderr
    props = box.show("ActiveState", "SubState", "Result", "ExecMainStatus", "MainPID")
    assert props == {
        "ActiveState": "inactive",
        "SubState": "dead",
        "Result": "success",
        "ExecMainStatus": "0",
        "MainPID": "0",
    }
    assert box.read(STATE) is None
    assert box.exec("test", "-d", "/run/fcsp/tenants").returncode == 0
    wait_for("the observer's last word", lambda: "stopping" in box.journal(pid=observer))
