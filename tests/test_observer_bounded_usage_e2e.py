"""fcsp-observer under its systemd sandbox (the unit as shipped) with slots as the hook makes
them: the usage file is a mount of its own (fcsp_hook.slot.files.bound_usage).

The container's / is made shared before the unit starts, as systemd makes a machine's at
boot: the service's namespace then receives mounts the host makes later, as it does on a
host, so the observer reads the mounted usage file and sees its mount.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator

import pytest

from tests import systemd_container
from tests.systemd_container import UNIT, BootError, SystemdContainer

pytestmark = pytest.mark.e2e

PYTHON = str(systemd_container.VENV / "bin" / "python3")
# What the hook does at prestart for a container whose init process is a `sleep` here;
# then the usage file is overwritten with garbage, which only the mounted file holds.
ADD_TENANT = """
import subprocess, sys
from pathlib import Path
from fcsp_hook import procfs
from fcsp_hook.slot import abi, files
init = subprocess.Popen(["sleep", "1000"], start_new_session=True)
run = Path("/run/fcsp")
spec = files.SlotSpec(sys.argv[1], devices=(files.DeviceLimits(host_index=0),),
                      init_host_pid=init.pid, init_start_time=procfs.proc_stat(init.pid)[1])
files.ensure_tenants_dir(run)
slot = files.slot_path(run, sys.argv[1])
files.write_slot(slot, spec, {}, bounded_usage=True)
with open(slot / abi.USAGE_FILE, "r+b") as usage:  # the tmpfs file; the one beneath stays good
    usage.write(b"\\0" * 8)
print(init.pid)
"""
# What a later poststop (root, may unmount) does: remove its slot, sweeping buried ones.
POSTSTOP = """
from pathlib import Path
from fcsp_hook.slot import files
files.remove_slot(Path("/run/fcsp"), "some-other-container")
"""


def wait_for(what: str, predicate: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {what}")


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, e2e_ready: None) -> Iterator[SystemdContainer]:
    reason = systemd_container.usable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the systemd end-to-end test cannot run in CI: {reason}")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("systemd")
    root = systemd_container.build_rootfs(base / "rootfs")
    (base / "hooks.d").mkdir()
    try:
        container = SystemdContainer.boot(root, base / "hooks.d")
    except BootError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"systemd cannot boot in a podman container here: {exc}")
        pytest.skip(f"systemd cannot boot in a podman container here: {exc}")
    yield container
    container.remove()


def _tenant(box: SystemdContainer, cid: str) -> dict[str, object]:
    text = box.read("/run/fcsp/observer.json") or "{}"
    try:
        tenants = json.loads(text).get("tenants", {})
    except ValueError:
        return {}
    value = tenants.get(cid, {}) if isinstance(tenants, dict) else {}
    return value if isinstance(value, dict) else {}


def test_the_sandboxed_observer_reads_bounded_usage_and_reaps_it_without_dying(
    box: SystemdContainer,
) -> None:
    """The observer reads the tenant's usage through the mount (it reports the garbage
    written there), and when the container's init dies its reaper, which may make no
    mount call (SystemCallFilter=~@mount would kill it), takes the slot out of the
    tenants directory without one: the observer keeps running, with no restart; the next
    poststop detaches and deletes what was left."""
    assert box.exec("mount", "--make-rshared", "/").returncode == 0
    box.config.write_text(
        "[observer]\ninterval_ms = 50\nmetrics_port = 0\nreap_interval_ms = 200\n"
    )
    started = box.systemctl("start", UNIT)
    assert started.returncode == 0, f"{started.stderr}\n{box.journal()}"
    main_pid = box.show("MainPID")["MainPID"]

    added = box.exec(PYTHON, "-c", ADD_TENANT, "t1")
    assert added.returncode == 0, added.stderr
    wait_for(
        "the observer to read the mounted usage file",
        lambda: "not an FCSP" in str(_tenant(box, "t1").get("problem", "")),
    )
    assert "/run/fcsp/tenants/t1/usage" in (box.read(f"/proc/{main_pid}/mountinfo") or "")

    assert box.exec("kill", "-9", added.stdout.split()[-1]).returncode == 0
    wait_for(
        "the slot to be reaped", lambda: box.exec("test", "-e", "/run/fcsp/tenants/t1").returncode
    )
    wait_for("the observer to drop the tenant", lambda: not _tenant(box, "t1"))
    props = box.show("MainPID", "ActiveState", "NRestarts")
    assert props == {"MainPID": main_pid, "ActiveState": "active", "NRestarts": "0"}, box.journal()
    assert "status=31/SYS" not in box.journal()
    assert box.exec("ls", "/run/fcsp/reaped").stdout.startswith("t1.")

    assert box.exec(PYTHON, "-c", POSTSTOP).returncode == 0
    assert box.exec("ls", "-A", "/run/fcsp/reaped").stdout == ""
    assert "/run/fcsp/" not in (box.read("/proc/1/mountinfo") or "")
    box.systemctl("stop", UNIT)


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ((), "True"),
        (("SystemCallFilter=~@mount",), "False"),
        (("SystemCallFilter=~@mount", "SystemCallErrorNumber=EPERM"), "False"),
        (("CapabilityBoundingSet=~CAP_SYS_ADMIN",), "False"),
    ],
    ids=["root", "filter-kills", "filter-fails", "no-cap-sys-admin"],
)
def test_may_mount_asks_without_dying(
    box: SystemdContainer, properties: tuple[str, ...], expected: str
) -> None:
    """linux.may_mount under what systemd can do to a service: a filter that kills for a
    mount call, one that fails it, no CAP_SYS_ADMIN; the process asking survives."""
    argv = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect"]
    argv += [f"--property={p}" for p in properties]
    argv += [PYTHON, "-c", "from fcsp_hook import linux; print(linux.may_mount())"]
    done = box.exec(*argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
