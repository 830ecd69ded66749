"""fcspctl status / top: each tenant's memory pressure (PRESSURE), a spill tenant's bytes in
host memory, and the same in --json; the observer's levels while it runs, the same rule on
the slot when it does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fcsp_hook import inventory, nvml, observer
from fcsp_hook.ctl import main as ctl
from fcsp_hook.ctl import status as ctl_status
from fcsp_hook.observer import memory, metrics, notify
from fcsp_hook.observer.publish import Publish
from fcsp_hook.observer.tenants import Tenants
from fcsp_hook.slot import abi, files, uvm
from tests.observer.scene import GiB, Scene, UsageWriter

MiB = 1 << 20
QUOTA = 8000 * MiB
GPU = "GPU-00000000-0000-0000-0000-0000000000ab"


def at(pct: int) -> int:
    return QUOTA * pct // 100


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    files.ensure_tenants_dir(tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def cfg_path(tmp_path: Path, run_dir: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[paths]\nrun_dir = "{run_dir}"\n')
    return path


def _tenant(
    run_dir: Path,
    cid: str,
    *devices: files.DeviceLimits,
    mem_mode: abi.MemMode = abi.MemMode.HARD,
    profile: str = "default",
    **usage: int,
) -> None:
    """A slot as the hook writes it, its first GPU's usage as its shim reports it."""
    spec = files.SlotSpec(
        container_id=cid,
        tenant=f"team-{cid}",
        mem_mode=mem_mode,
        uvm=uvm.PROFILES[profile],
        devices=devices or (files.DeviceLimits(uuid=GPU, mem_limit_bytes=QUOTA),),
    )
    directory = files.slot_path(run_dir, cid)
    files.write_slot(directory, spec, {})
    writer = UsageWriter(directory)
    try:
        writer.device(**usage)
    finally:
        writer.close()


def _cells(text: str, column: str) -> dict[str, str]:
    """Each row's cell of one column of the table, by container id (cells may hold single
    spaces; the columns are padded to the header's offsets)."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("CONTAINER"))
    names = lines[header].split("  ")
    names = [n.strip() for n in names if n.strip()]
    start = lines[header].index(column)
    after = names.index(column) + 1
    end = lines[header].index(names[after]) if after < len(names) else None
    rows = lines[header + 1 :]
    rows = rows[: rows.index("")] if "" in rows else rows  # the observer's lines follow
    return {line.split()[0]: line[start:end].strip() for line in rows}


# (container, devices, mem mode, profile, usage) -> (PRESSURE, MEMORY USED / QUOTA)
TENANTS = [
    ("hard-warm", (), abi.MemMode.HARD, "default", {"mem_used_bytes": at(70)},
     ("warning", "5.5Gi / 7.8Gi")),
    ("hard-high", (), abi.MemMode.HARD, "default", {"mem_used_bytes": at(90)},
     ("high", "7.0Gi / 7.8Gi")),
    ("train-90", (), abi.MemMode.HARD, "training", {"mem_used_bytes": at(90)},
     ("high", "7.0Gi / 7.8Gi")),
    ("train-85", (), abi.MemMode.HARD, "training", {"mem_used_bytes": at(85)},
     ("warning", "6.6Gi / 7.8Gi")),
    ("spill", (), abi.MemMode.SPILL, "default",
     {"mem_used_bytes": at(100), "mem_spilled_bytes": 3 * GiB // 2, "mem_migrated_in_bytes": GiB},
     ("critical", "7.8Gi / 7.8Gi +1.5Gi spilled")),
    ("spill-idle", (), abi.MemMode.SPILL, "training", {},
     ("ok", "0B / 7.8Gi +0B spilled")),
    ("soft-over", (), abi.MemMode.SOFT, "default", {"mem_used_bytes": at(120)},
     ("critical", "9.4Gi / 7.8Gi")),
    ("no-quota", (files.DeviceLimits(uuid=GPU),), abi.MemMode.HARD, "default",
     {"mem_used_bytes": 5 * GiB}, ("-", "5.0Gi / -")),
    ("pct", (files.DeviceLimits(uuid=GPU, mem_limit_basis_points=1000),), abi.MemMode.HARD,
     "default", {"mem_used_bytes": 15 * GiB}, ("high", "15.0Gi / 10%")),  # of 160 GiB
    ("liar", (), abi.MemMode.SPILL, "default",
     {"mem_used_bytes": (1 << 64) - 1, "mem_spilled_bytes": 1 << 62},
     ("ok", "0B / 7.8Gi +0B spilled")),  # forged counters read as nothing
]  # fmt: skip


def test_status_rates_each_tenant_without_an_observer(
    run_dir: Path, cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no observer, status takes each tenant's level from its slot by the observer's
    rule: the bytes on the GPU against the quota at the profile's percentages (a
    percentage quota against the GPU's total as the observer last recorded it); `-`
    without a quota; a spill tenant's spilled bytes after its memory; forged counters
    bounded.  top shows the same."""
    inventory.write(run_dir, [(GPU, 0, 160 * GiB)])
    for cid, devices, mem_mode, profile, usage, _ in TENANTS:
        _tenant(run_dir, cid, *devices, mem_mode=mem_mode, profile=profile, **usage)
    assert ctl.main(["--config", str(cfg_path), "status"]) == 0
    out = capsys.readouterr().out
    assert "not running" in out
    pressure, memory_cells = _cells(out, "PRESSURE"), _cells(out, "MEMORY USED / QUOTA")
    for cid, *_, (level, memory_text) in TENANTS:
        assert (pressure[cid[:12]], memory_cells[cid[:12]]) == (level, memory_text), cid
    assert ctl.main(["--config", str(cfg_path), "top", "--count", "1", "--interval", "0"]) == 0
    top = capsys.readouterr().out
    assert top.startswith("fcspctl top")
    assert _cells(top, "PRESSURE") == pressure
    assert _cells(top, "MEMORY USED / QUOTA") == memory_cells


def test_a_percentage_of_an_unknown_gpu_has_no_level(run_dir: Path) -> None:
    """Without the observer's record of the GPU's total (it never ran), a percentage quota
    cannot be resolved: the level is unknown (`-`), not guessed."""
    dev = files.DeviceLimits(uuid=GPU, mem_limit_basis_points=1000)
    _tenant(run_dir, "pct", dev, mem_used_bytes=15 * GiB)
    (row,) = ctl_status.tenants(run_dir)
    assert row.devices[0].pressure is None
    assert _cells(ctl_status.status_text(run_dir), "PRESSURE") == {"pct": "-"}


def test_status_json_carries_pressure_and_spill(
    run_dir: Path, cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json has, per device, the level, the bytes spilled and their peak, and the bytes
    moved each way, besides the memory used."""
    _tenant(
        run_dir,
        "spill",
        mem_mode=abi.MemMode.SPILL,
        profile="training",
        mem_used_bytes=at(92),
        mem_spilled_bytes=GiB,
        mem_spill_peak_bytes=2 * GiB,
        mem_migrated_in_bytes=3 * GiB,
        mem_migrated_out_bytes=4 * GiB,
    )
    _tenant(run_dir, "none", files.DeviceLimits(uuid=GPU))
    assert ctl.main(["--config", str(cfg_path), "status", "--json"]) == 0
    doc = {t["container_id"]: t for t in json.loads(capsys.readouterr().out)}
    (dev,) = doc["spill"]["devices"]
    assert doc["spill"]["mem_mode"] == "spill"
    assert {k: dev[k] for k in FIELDS} == {
        "pressure": "high",
        "mem_used_bytes": at(92),
        "mem_spilled_bytes": GiB,
        "mem_spill_peak_bytes": 2 * GiB,
        "mem_migrated_in_bytes": 3 * GiB,
        "mem_migrated_out_bytes": 4 * GiB,
    }
    assert doc["none"]["devices"][0]["pressure"] is None


FIELDS = (
    "pressure",
    "mem_used_bytes",
    "mem_spilled_bytes",
    "mem_spill_peak_bytes",
    "mem_migrated_in_bytes",
    "mem_migrated_out_bytes",
)


def test_status_shows_the_observers_level_while_it_runs(tmp_path: Path) -> None:
    """While the observer runs, PRESSURE is the level it published (it knows the GPU's
    total from NVML: a percentage quota resolves); a published value that is not a level
    is ignored for status's own; with the observer gone, status's own rule again."""
    scene = Scene.create(tmp_path, gpus=(nvml.GpuInfo(0, GPU, 0, 160 * GiB),))
    try:
        scene.add("pct", files.DeviceLimits(uuid=GPU, mem_limit_basis_points=1000)).device(
            mem_used_bytes=15 * GiB
        )
        scene.add("hard", files.DeviceLimits(uuid=GPU, mem_limit_bytes=QUOTA)).device(
            mem_used_bytes=at(96)
        )
        scene.run(Tenants(), memory.Memory())
        Publish(notify.Notifier({}), metrics.Metrics()).run(scene.state, scene.now_ns)
        text = ctl_status.status_text(scene.run_dir)
        assert "fcsp-observer pid" in text
        assert _cells(text, "PRESSURE") == {"pct": "high", "hard": "critical"}
        state_file = scene.run_dir / observer.STATE_FILE
        doc = json.loads(state_file.read_text())
        doc["tenants"]["hard"]["pressure"] = ["bogus"]
        doc["tenants"]["pct"]["pressure"] = [None]  # the observer's word: no quota it knows
        state_file.write_text(json.dumps(doc))
        assert _cells(ctl_status.status_text(scene.run_dir), "PRESSURE") == {
            "pct": "-",
            "hard": "critical",
        }
        state_file.unlink()
        text = ctl_status.status_text(scene.run_dir)
        assert "not running" in text
        assert _cells(text, "PRESSURE") == {"pct": "-", "hard": "critical"}  # no gpus.json
    finally:
        scene.close()


def test_rows_without_devices_or_readable_usage_keep_the_columns(
    run_dir: Path, cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tenant with no GPU and one whose usage file is garbage still fill every column,
    PRESSURE included, beside a rated tenant."""
    _tenant(run_dir, "rated", mem_used_bytes=at(90))
    files.write_slot(files.slot_path(run_dir, "nogpu"), files.SlotSpec("nogpu", "t"), {})
    _tenant(run_dir, "broken")
    (files.slot_path(run_dir, "broken") / abi.USAGE_FILE).write_bytes(b"garbage")
    assert ctl.main(["--config", str(cfg_path), "status"]) == 0
    out = capsys.readouterr().out
    assert _cells(out, "PRESSURE") == {"broken": "?", "nogpu": "-", "rated": "high"}
