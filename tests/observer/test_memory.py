"""observer.memory: each tenant's memory pressure on each GPU from its slot (the level at
its profile's percentages, one log line per change), and what the observer publishes of
it: the state file fcspctl reads and the Prometheus metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fcsp_hook import nvml, observer
from fcsp_hook.observer import memory, metrics, notify
from fcsp_hook.observer.publish import Publish, metrics_snapshot
from fcsp_hook.observer.tenants import Tenants
from fcsp_hook.slot import abi, files, live, rules
from tests.observer.scene import MS, GiB, Scene

GPU = "GPU-00000000-0000-0000-0000-0000000000e7"
MiB = 1 << 20
QUOTA = 8000 * MiB  # every percent of it a whole number of bytes
OK, WARNING, HIGH, CRITICAL = (
    rules.Pressure.OK,
    rules.Pressure.WARNING,
    rules.Pressure.HIGH,
    rules.Pressure.CRITICAL,
)
HOLD = memory.FALL_HOLD_NS


def at(pct: int, delta: int = 0) -> int:
    """pct % of QUOTA, plus delta bytes."""
    return QUOTA * pct // 100 + delta


def _scene(tmp_path: Path) -> Scene:
    """A scene whose one GPU NVML knows (80 GiB), so that percentage quotas resolve."""
    return Scene.create(tmp_path, gpus=(nvml.GpuInfo(0, GPU, 0, 80 * GiB),), idle_window_ms=100)


def _quota(**kw: Any) -> files.DeviceLimits:
    return files.DeviceLimits(uuid=GPU, sm_requested_centi=2500, **{"mem_limit_bytes": QUOTA, **kw})


def _observer(scene: Scene) -> Callable[..., None]:
    """One tick of the duties under test, step_ns after the last: sample, then rate."""
    duties = (Tenants(), memory.Memory())

    def step(step_ns: int = 10 * MS) -> None:
        scene.run(*duties, step_ns=step_ns)

    return step


def _changes(scene: Scene) -> list[dict[str, Any]]:
    return scene.events("memory pressure")


def _scraped(exporter: metrics.Metrics, name: str) -> list[tuple[dict[str, str], float]]:
    """One series' samples as a Prometheus scrape parses them: (labels, value)."""
    text = generate_latest(exporter.registry).decode()
    return [
        (s.labels, s.value)
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    ]


def _levels(exporter: metrics.Metrics) -> list[float]:
    return [value for _, value in _scraped(exporter, "fcsp_memory_pressure_level")]


# (profile, used bytes) -> level: each profile's three percentages, and a byte under each.
LEVELS = [
    ("default", at(0), OK),
    ("default", at(70, -1), OK),
    ("default", at(70), WARNING),
    ("default", at(85, -1), WARNING),
    ("default", at(85), HIGH),
    ("default", at(95, -1), HIGH),
    ("default", at(95), CRITICAL),
    ("default", at(100), CRITICAL),
    ("llm_inference", at(85), HIGH),
    ("training", at(70), OK),
    ("training", at(80, -1), OK),
    ("training", at(80), WARNING),
    ("training", at(90, -1), WARNING),
    ("training", at(90), HIGH),
    ("training", at(95), HIGH),
    ("training", at(97, -1), HIGH),
    ("training", at(97), CRITICAL),
]


@pytest.mark.parametrize(("profile", "used", "level"), LEVELS)
@pytest.mark.parametrize("mem_mode", [abi.MemMode.HARD, abi.MemMode.SPILL])
def test_levels_at_the_profiles_percentages(
    tmp_path: Path, profile: str, used: int, level: rules.Pressure, mem_mode: abi.MemMode
) -> None:
    """The level of the bytes on the GPU against the quota, at the percentages the slot's
    profile carries (default 70/85/95, training 80/90/97), in hard and spill mode alike;
    the state file and the metrics say the same level."""
    scene = _scene(tmp_path)
    step = _observer(scene)
    try:
        usage = scene.add("t", _quota(), mem_mode=mem_mode, uvm_profile=profile)
        usage.device(mem_used_bytes=used)
        step()
        assert scene.tenant("t").devices[0].pressure is level
        publish = Publish(notify.Notifier({}), metrics.Metrics())
        publish.run(scene.state, scene.now_ns)
        doc = json.loads((scene.run_dir / observer.STATE_FILE).read_text())
        assert doc["tenants"]["t"]["pressure"] == [level.name.lower()]
        assert _levels(publish.exporter) == [int(level)]
    finally:
        scene.close()


# One tenant's memory tick by tick: (used bytes, time since the last tick) -> the lines
# logged on that tick, as (pressure, was).  A rise is logged at once; a fall once it has
# lasted HOLD (a tenant allocating and freeing across a level logs one rise).
STORY: list[tuple[int, int, list[tuple[str, str]]]] = [
    (at(10), 10 * MS, []),  # the first sample, at ok: nothing to say
    (at(10), 10 * MS, []),
    (at(90), 10 * MS, [("high", "ok")]),  # ok to high: one line, not one per level passed
    (at(90), 10 * MS, []),
    (at(90), HOLD, []),  # steady: nothing, however long
    (at(96), 10 * MS, [("critical", "high")]),
    (at(80), 10 * MS, []),  # falls...
    (at(96), 10 * MS, []),  # ... and rises back within the hold: nothing either way
    (at(80), 10 * MS, []),
    (at(90), HOLD // 2, []),  # still below critical, not for long enough
    (at(80), HOLD // 2, [("warning", "critical")]),  # below it for HOLD: the level now
    (at(10), 10 * MS, []),
    (at(10), HOLD, [("ok", "warning")]),
    (at(10), HOLD, []),
]


def test_one_line_per_change_of_level(tmp_path: Path) -> None:
    """Each change of a tenant's level on a GPU is one structured line naming the
    container, tenant, GPU, level, used, quota and spilled bytes; a steady level, however
    long, logs nothing; rises are logged at once and a fall once it has lasted."""
    scene = _scene(tmp_path)
    step = _observer(scene)
    try:
        usage = scene.add("t", _quota(), mem_mode=abi.MemMode.SPILL)
        for tick, (used, step_ns, lines) in enumerate(STORY):
            before = len(_changes(scene))
            usage.device(mem_used_bytes=used, mem_spilled_bytes=tick * MiB)
            step(step_ns)
            logged = _changes(scene)[before:]
            assert [(e["pressure"], e["was"]) for e in logged] == lines, tick
            for event in logged:
                assert {k: event[k] for k in ("container_id", "tenant", "gpu", "device")} == {
                    "container_id": "t",
                    "tenant": "team-t",
                    "gpu": GPU,
                    "device": 0,
                }
                assert (event["used_bytes"], event["quota_bytes"]) == (used, QUOTA)
                assert (event["spilled_bytes"], event["mem_mode"]) == (tick * MiB, "spill")
                high = event["pressure"] in {"high", "critical"}
                assert event["level"] == ("warning" if high else "info")
        assert len(_changes(scene)) == sum(len(lines) for *_, lines in STORY)
    finally:
        scene.close()


def test_a_first_sample_under_pressure_is_one_rise(tmp_path: Path) -> None:
    """A tenant found (or an observer restarted) already at high logs one line, from ok."""
    scene = _scene(tmp_path)
    step = _observer(scene)
    try:
        scene.add("t", _quota()).device(mem_used_bytes=at(88))
        for _ in range(5):
            step()
        assert [(e["pressure"], e["was"]) for e in _changes(scene)] == [("high", "ok")]
        assert scene.state.dirty
    finally:
        scene.close()


def test_a_soft_tenant_past_its_quota_is_critical(tmp_path: Path) -> None:
    """Soft mode lets a tenant pass its quota: that is critical, and its one line is soft
    mode's over-quota warning."""
    scene = _scene(tmp_path)
    step = _observer(scene)
    try:
        usage = scene.add("s", _quota(), mem_mode=abi.MemMode.SOFT)
        usage.device(mem_used_bytes=at(150))
        step()
        step()
        (event,) = _changes(scene)
        assert scene.tenant("s").devices[0].pressure is CRITICAL
        assert (event["pressure"], event["mem_mode"], event["level"]) == (
            "critical",
            "soft",
            "warning",
        )
        assert event["used_bytes"] == at(150) and event["quota_bytes"] == QUOTA
    finally:
        scene.close()


# (byte quota, basis points, GPU known to NVML) -> the quota the level is taken against
QUOTAS = [
    (QUOTA, 0, True, QUOTA),
    (0, 1000, True, 8 * GiB),  # 10 % of the GPU's 80 GiB
    (QUOTA, 500, True, 4 * GiB),  # the smaller of the two, as the shim enforces
    (0, 1000, False, 0),  # a percentage of a total nobody knows: no quota, no level
    (0, 0, True, 0),  # no quota: no level
]


@pytest.mark.parametrize(("limit", "points", "known", "quota"), QUOTAS)
def test_the_level_is_against_the_quota_the_shim_enforces(
    tmp_path: Path, limit: int, points: int, known: bool, quota: int
) -> None:
    """The quota is rules.device_memory_quota with NVML's total of the GPU; without a
    quota the level is None: published as null, no pressure series, nothing logged."""
    scene = _scene(tmp_path)
    step = _observer(scene)
    try:
        dev = files.DeviceLimits(
            uuid=GPU if known else "",
            host_index=0 if known else 7,
            mem_limit_bytes=limit,
            mem_limit_basis_points=points,
        )
        used = 6 * GiB
        scene.add("t", dev).device(mem_used_bytes=used)
        step()
        device = scene.tenant("t").devices[0]
        if quota:
            assert device.pressure is rules.pressure_level(used, quota, 0)
            assert device.pressure is not OK  # as it would be against the GPU's 80 GiB
        else:
            assert device.pressure is None and not _changes(scene)
        (sample,) = metrics_snapshot(scene.state).samples
        assert sample.mem_quota_bytes == quota
        publish = Publish(notify.Notifier({}), metrics.Metrics())
        publish.run(scene.state, scene.now_ns)
        assert _levels(publish.exporter) == ([] if device.pressure is None else [device.pressure])
        doc = json.loads((scene.run_dir / observer.STATE_FILE).read_text())
        assert doc["tenants"]["t"]["pressure"] == [
            None if device.pressure is None else device.pressure.name.lower()
        ]
    finally:
        scene.close()


def test_the_level_follows_a_quota_changed_while_idle(tmp_path: Path) -> None:
    """fcspctl set lowers the quota of a tenant that has gone idle (nothing in its usage
    moves): its level is taken against the new quota all the same."""
    scene = _scene(tmp_path)
    step = _observer(scene)
    try:
        scene.add("t", _quota()).device(mem_used_bytes=at(50))
        step()
        step(200 * MS)  # past the idle window: the tenants duty skips it now
        assert scene.tenant("t").quiescent and scene.tenant("t").devices[0].pressure is OK
        limits = live.LimitsMap(files.slot_path(scene.run_dir, "t") / abi.LIMITS_FILE)
        try:
            with limits.update() as view:
                view.device[0].mem_limit_bytes = at(52)
        finally:
            limits.close()
        step()
        assert scene.tenant("t").devices[0].pressure is CRITICAL
        assert [(e["pressure"], e["quota_bytes"]) for e in _changes(scene)] == [
            ("critical", at(52))
        ]
    finally:
        scene.close()


def test_spill_and_migration_are_sampled_and_published(tmp_path: Path) -> None:
    """A spill tenant's bytes on the GPU, spilled to the host and moved each way are read
    into its device's record; the state file carries them with the level, and the metrics
    exposition has the level, the spilled bytes and the bytes moved by direction, with the
    labels of every per-tenant series."""
    scene = _scene(tmp_path)
    step = _observer(scene)
    try:
        usage = scene.add("sp", _quota(), mem_mode=abi.MemMode.SPILL, uvm_profile="training")
        scene.add("hard", _quota(mem_limit_bytes=0))  # no quota: no level, nothing spilled
        usage.device(
            mem_used_bytes=at(98),
            mem_spilled_bytes=3 * GiB // 2,
            mem_spill_peak_bytes=2 * GiB,
            mem_migrated_in_bytes=5 * GiB,
            mem_migrated_out_bytes=7 * GiB,
        )
        step()
        recorded = scene.tenant("sp").devices[0].usage
        assert (recorded.mem_used_bytes, recorded.mem_spilled_bytes) == (at(98), 3 * GiB // 2)
        assert (recorded.mem_migrated_in_bytes, recorded.mem_migrated_out_bytes) == (
            5 * GiB,
            7 * GiB,
        )
        exporter = metrics.Metrics()
        Publish(notify.Notifier({}), exporter).run(scene.state, scene.now_ns)
        tenants = json.loads((scene.run_dir / observer.STATE_FILE).read_text())["tenants"]
        assert {k: tenants["sp"][k] for k in PUBLISHED} == {
            "pressure": ["critical"],
            "mem_spilled_bytes": [3 * GiB // 2],
            "mem_spill_peak_bytes": [2 * GiB],
            "mem_migrated_in_bytes": [5 * GiB],
            "mem_migrated_out_bytes": [7 * GiB],
        }
        assert {k: tenants["hard"][k] for k in PUBLISHED} == {
            "pressure": [None],
            **{k: [0] for k in PUBLISHED if k != "pressure"},
        }
        text = generate_latest(exporter.registry).decode()
        assert "# TYPE fcsp_memory_pressure_level gauge" in text
        assert "# TYPE fcsp_memory_spilled_bytes gauge" in text
        assert re.search(r"^# TYPE fcsp_memory_migrated_bytes(_total)? counter$", text, re.M)
        labels = {
            "container_id": "sp",
            "tenant": "team-sp",
            "gpu": GPU,
            "pod": "",
            "namespace": "",
            "container": "",
        }
        assert _scraped(exporter, "fcsp_memory_pressure_level") == [(labels, 3.0)]
        spilled = {s["container_id"]: v for s, v in _scraped(exporter, "fcsp_memory_spilled_bytes")}
        assert spilled == {"sp": 3 * GiB // 2, "hard": 0}
        moved = {
            (s["container_id"], s["direction"]): value
            for s, value in _scraped(exporter, "fcsp_memory_migrated_bytes_total")
        }
        assert moved == {
            ("sp", "in"): 5 * GiB,
            ("sp", "out"): 7 * GiB,
            ("hard", "in"): 0,
            ("hard", "out"): 0,
        }
        (series,) = [s for s, _ in _scraped(exporter, "fcsp_memory_migrated_bytes_total")][:1]
        assert set(series) == {*labels, "direction"}
    finally:
        scene.close()


PUBLISHED = (
    "pressure",
    "mem_spilled_bytes",
    "mem_spill_peak_bytes",
    "mem_migrated_in_bytes",
    "mem_migrated_out_bytes",
)

# Forged counters: (field, value written, the series that shows it) -> what is read
FORGED = [
    ("mem_used_bytes", 1 << 60, "fcsp_memory_used_bytes", 0),  # past any GPU's memory
    ("mem_used_bytes", (1 << 64) - 1, "fcsp_memory_used_bytes", 0),
    ("mem_spilled_bytes", 1 << 63, "fcsp_memory_spilled_bytes", 0),
    ("mem_spill_peak_bytes", (1 << 64) - 1, "", 0),
    ("mem_migrated_in_bytes", (1 << 64) - 1, "fcsp_memory_migrated_bytes_total", 0),
    ("mem_migrated_out_bytes", 1 << 63, "fcsp_memory_migrated_bytes_total", 0),
    # The bounds themselves are kept: 1 PiB held, 2^62 moved (a total: bounded as counters).
    ("mem_spilled_bytes", live.MAX_BYTES, "fcsp_memory_spilled_bytes", live.MAX_BYTES),
    ("mem_migrated_in_bytes", live.MAX_COUNTER, "fcsp_memory_migrated_bytes_total",
     live.MAX_COUNTER),
]  # fmt: skip


@pytest.mark.parametrize(("name", "value", "series", "read"), FORGED)
def test_forged_huge_values_are_bounded(
    tmp_path: Path, name: str, value: int, series: str, read: int
) -> None:
    """The usage file is the tenant's: a byte count past 1 PiB, a migration total past
    2^62, is read as 0, so that a tenant can neither make itself look critical nor publish
    nonsense: the level stays ok, nothing is logged, the state file and the metrics carry
    what was read."""
    scene = _scene(tmp_path)
    step = _observer(scene)
    try:
        scene.add("liar", _quota(), mem_mode=abi.MemMode.SPILL).device(**{name: value})
        step()
        device = scene.tenant("liar").devices[0]
        assert getattr(device.usage, name) == read
        assert device.pressure is OK and not _changes(scene)
        exporter = metrics.Metrics()
        Publish(notify.Notifier({}), exporter).run(scene.state, scene.now_ns)
        published = json.loads((scene.run_dir / observer.STATE_FILE).read_text())
        assert published["tenants"]["liar"]["pressure"] == ["ok"]
        if name in PUBLISHED:
            assert published["tenants"]["liar"][name] == [read]
        direction = {"mem_migrated_in_bytes": "in", "mem_migrated_out_bytes": "out"}.get(name)
        shown = [v for labels, v in _scraped(exporter, series) if labels.get("direction") in
                 (direction, None)]  # fmt: skip
        assert shown == ([float(read)] if series else [])
    finally:
        scene.close()
