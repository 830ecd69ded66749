"""fcspctl status / check-config / doctor against real slot files."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fcsp_hook.ctl import main as ctl
from fcsp_hook.ctl import status as ctl_status
from fcsp_hook.slot import abi, files

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[paths]\nrun_dir = "{tmp_path}/run"\n[hook]\nlibrary = "{tmp_path}/lib.so"\n')
    return path


def _slot(run_dir: Path, cid: str, **kw: object) -> Path:
    files.ensure_tenants_dir(run_dir)
    directory = files.slot_path(run_dir, cid)
    devices = (
        files.DeviceLimits(host_index=0, mem_limit_bytes=8 << 30, sm_requested_centi=4000),
        files.DeviceLimits(uuid="GPU-abc", mem_limit_basis_points=5000, sm_requested_centi=2500),
    )
    files.write_slot(
        directory, files.SlotSpec(container_id=cid, tenant="team-a", devices=devices), {}
    )
    return directory


def test_status_table_shows_each_tenant_gpu(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One row per tenant and GPU with requested/effective share and memory quota."""
    _slot(tmp_path / "run", "c0ffee" * 4)
    assert ctl.main(["--config", str(cfg_path), "status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["CONTAINER", "TENANT", "MODE"]
    assert "c0ffeec0ffee" in out[1] and "team-a" in out[1] and "40%" in out[1] and "8.0Gi" in out[1]
    assert "GPU-abc" in out[2] and "25%" in out[2] and "50%" in out[2]


def test_status_json_is_machine_readable(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json gives the same facts as a list of tenants."""
    _slot(tmp_path / "run", "abc")
    assert ctl.main(["--config", str(cfg_path), "status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc[0]["container_id"] == "abc"
    assert doc[0]["mode"] == "balanced"
    assert [d["sm_requested_pct"] for d in doc[0]["devices"]] == [40.0, 25.0]


def test_status_survives_a_corrupt_usage_file(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tenant's usage file is untrusted: a truncated one is reported on its row."""
    directory = _slot(tmp_path / "run", "abc")
    (directory / abi.USAGE_FILE).write_bytes(b"garbage")
    assert ctl.main(["--config", str(cfg_path), "status"]) == 0
    assert "expected" in capsys.readouterr().out


def test_status_clamps_hostile_values(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Out-of-range numbers from a slot are clamped, not shown or trusted as given."""
    directory = _slot(tmp_path / "run", "abc")
    row = ctl_status.read_tenant(directory)
    assert row.devices[0].sm_effective_pct == 40.0
    limits = files.read_limits(directory / abi.LIMITS_FILE)
    limits.device[0].sm_effective_centi = 4_000_000_000
    limits.device_count = 99
    (directory / abi.LIMITS_FILE).write_bytes(bytes(limits))
    row = ctl_status.read_tenant(directory)
    assert row.devices[0].sm_effective_pct == 100.0
    assert len(row.devices) == abi.MAX_DEVICES


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config: 0 for a valid file, 1 with one line for a bad or missing one."""
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('[defaults]\nmode = "strict"\n')
    bad.write_text('[defaults]\nmode = "fast"\n')
    assert ctl.main(["check-config", str(good)]) == 0
    assert ctl.main(["check-config", str(bad)]) == 1
    assert ctl.main(["check-config", str(tmp_path / "none.toml")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "mode = 'fast' is invalid" in err[0]
    assert "does not exist" in err[1]


def test_doctor_reports_a_missing_library(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """doctor fails and names what is missing."""
    assert ctl.main(["--config", str(cfg_path), "doctor"]) == 1
    out = capsys.readouterr().out
    assert "[!!] library" in out and "lib.so is missing" in out
    assert "[ok] slots" in out


def test_set_completes_while_a_tenant_holds_flock_on_its_limits(
    cfg_path: Path, tmp_path: Path
) -> None:
    """flock works on a read-only fd, so a tenant can hold one on its limits file for ever:
    host writers serialise on a lock of their own under the run directory, which no
    container can reach, and `fcspctl set` completes (its new request is in the slot)."""
    directory = _slot(tmp_path / "run", "abc")
    tenant_fd = os.open(directory / abi.LIMITS_FILE, os.O_RDONLY)  # what the tenant sees
    try:
        fcntl.flock(tenant_fd, fcntl.LOCK_EX)
        argv = ["--config", str(cfg_path), "set", "abc", "--sm", "55"]
        done = subprocess.run(
            [sys.executable, "-m", "fcsp_hook.ctl.main", *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(tenant_fd)
    assert done.returncode == 0, done.stderr
    limits = files.read_limits(directory / abi.LIMITS_FILE)
    assert [limits.device[i].sm_requested_centi for i in range(2)] == [5500, 5500]
    assert files.lock_path(directory) == tmp_path / "run" / files.LOCKS_SUBDIR / "abc"
    assert files.remove_slot(tmp_path / "run", "abc")
    assert not files.lock_path(directory).exists()
