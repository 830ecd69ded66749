"""The rules of the slot's live words (fcsp_hook.slot.rules), and the memory quota rule
being the same in C (fcsp_mem_quota in shim/fcsp_slot.h, and what libvgpu.so enforces)
and in Python (what the observer checks against NVML and publishes)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcsp_hook.slot import abi, files, live, rules
from tests.shim.harness import Env, make_slot, run

REPO = Path(__file__).resolve().parent.parent
GiB = 1 << 30
MiB = 1 << 20


@pytest.mark.parametrize(
    ("limit_bytes", "basis_points", "total", "quota"),
    [
        (0, 0, 80 * GiB, 0),  # no quota
        (8 * GiB, 0, 80 * GiB, 8 * GiB),  # bytes only
        (0, 2500, 80 * GiB, 20 * GiB),  # a percentage of the real total
        (8 * GiB, 2500, 80 * GiB, 8 * GiB),  # both: the smaller, whichever it is
        (30 * GiB, 2500, 80 * GiB, 20 * GiB),
        (0, 2500, 0, 0),  # a percentage of an unknown total is no quota
        (8 * GiB, 2500, 0, 8 * GiB),
        (0, 10_000, 80 * GiB, 80 * GiB),  # the whole GPU
        (0, 12_000, 80 * GiB, 80 * GiB),  # never more than the whole GPU
        (0, 1, 9_999, 0),  # rounds down, as the shim does
    ],
)
def test_memory_quota_is_the_smaller_of_what_is_set(
    limit_bytes: int, basis_points: int, total: int, quota: int
) -> None:
    """A byte quota and a percentage of the GPU's total: whichever are set, the smaller."""
    assert rules.memory_quota(limit_bytes, basis_points, total) == quota


@pytest.fixture(scope="module")
def c_quota(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fcsp_mem_quota from shim/fcsp_slot.h over a limits file: argv[1] the file, then each
    device's real total; prints one quota per device."""
    return _compile(
        tmp_path_factory.mktemp("quota"),
        "    struct fcsp_limits l;\n"
        '    FILE *f = fopen(argv[1], "rb");\n'
        "    if (!f || fread(&l, sizeof(l), 1, f) != 1) return 1;\n"
        "    for (unsigned i = 0; i < l.device_count && (int)i + 2 < argc; i++)\n"
        '        printf("%llu\\n", (unsigned long long)fcsp_mem_quota(\n'
        "            l.device[i].mem_limit_bytes, l.device[i].mem_limit_basis_points,\n"
        "            strtoull(argv[i + 2], NULL, 10)));\n"
        "    return 0;\n",
    )


def _compile(directory: Path, body: str) -> Path:
    """A program of main's body over shim/fcsp_slot.h, built as C11, warnings as errors."""
    source = directory / "main.c"
    source.write_text(
        '#include <stdio.h>\n#include <stdlib.h>\n#include "fcsp_slot.h"\n'
        f"int main(int argc, char **argv) {{\n{body}}}\n"
    )
    exe = directory / "main"
    subprocess.run(
        ["gcc", "-std=c11", "-Wall", "-Werror", f"-I{REPO / 'shim'}", "-o", str(exe), str(source)],
        check=True,
    )
    return exe


@pytest.fixture(scope="module")
def slot_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("slots")


devices = st.lists(
    st.tuples(
        st.sampled_from([0, 1, MiB, 3 * GiB + 7, 1 << 40, (1 << 64) - 1])
        | st.integers(0, (1 << 64) - 1),
        st.sampled_from([0, 1, 2500, 9_999, 10_000, 10_001, (1 << 32) - 1])
        | st.integers(0, (1 << 32) - 1),
        st.sampled_from([0, 1, 9_999, 141 * GiB, (1 << 64) - 1]) | st.integers(0, (1 << 64) - 1),
    ),
    min_size=1,
    max_size=abi.MAX_DEVICES,
)


@settings(max_examples=150, deadline=None)
@given(devices=devices)
def test_the_quota_rule_is_the_same_in_c_and_python(
    c_quota: Path, slot_dir: Path, devices: list[tuple[int, int, int]]
) -> None:
    """The same slot, fed to fcsp_mem_quota and to rules.device_memory_quota: the same quota
    for every device, whatever the byte quota, the percentage and the real total."""
    spec = files.SlotSpec(
        container_id="quota",
        devices=tuple(
            files.DeviceLimits(mem_limit_bytes=b, mem_limit_basis_points=bp) for b, bp, _ in devices
        ),
    )
    files.write_slot(slot_dir, spec, {})
    limits = files.read_limits(slot_dir / abi.LIMITS_FILE)
    totals = [str(t) for _, _, t in devices]
    out = subprocess.run(
        [str(c_quota), str(slot_dir / abi.LIMITS_FILE), *totals],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    python = [
        str(rules.device_memory_quota(limits.device[i], total))
        for i, (_, _, total) in enumerate(devices)
    ]
    assert out == python


@pytest.mark.parametrize(
    ("limit_bytes", "basis_points"), [(256 * MiB, 5000), (768 * MiB, 2500), (0, 2500)]
)
def test_the_shim_enforces_the_quota_the_host_computes(
    tmp_path: Path, limit_bytes: int, basis_points: int
) -> None:
    """libvgpu.so under the simulated driver (a 1 GiB GPU) reports and enforces, as the
    device's total, exactly the quota the observer computes for the same slot."""
    slot = make_slot(tmp_path / "slot", [limit_bytes], basis_points=[basis_points])
    env = Env(state=tmp_path / "sim", mem_bytes=GiB, slot=slot)
    quota = rules.memory_quota(limit_bytes, basis_points, GiB)
    r = run(env, "init", "meminfo", "alloc", "mem", str(quota), "alloc", "mem", "1M")
    assert r.field("meminfo")[2] == str(quota)
    assert r.outcomes() == ["ok 0", "err 2"]


# ---- the live words ------------------------------------------------------------------------


def _limits(tmp_path: Path, *requests: int) -> live.LimitsMap:
    directory = tmp_path / "slot"
    devs = tuple(
        files.DeviceLimits(host_index=i, sm_requested_centi=r) for i, r in enumerate(requests)
    )
    files.write_slot(directory, files.SlotSpec(container_id="t", devices=devs), {})
    return live.LimitsMap(directory / abi.LIMITS_FILE)


@pytest.mark.parametrize(
    ("share", "written"),
    [(0, 1), (-5, 1), (1, 1), (4000, 4000), (10_000, 10_000), (12_000, 10_000)],
)
def test_a_share_is_never_written_as_zero_nor_past_the_gpu(
    tmp_path: Path, share: int, written: int
) -> None:
    """0 means "unset, use the request" to the shim: the least share written is 0.01 %."""
    limits = _limits(tmp_path, 2500)
    try:
        changed = rules.grant_share(limits, 0, share)
        assert limits.effective(0) == written
        assert changed == (written != 2500)
        assert rules.grant_share(limits, 0, share) is False  # the same again: no store
    finally:
        limits.close()


def test_a_new_slot_carries_its_requests_as_the_shares_in_force(tmp_path: Path) -> None:
    """Before any observer has run, the shim runs on what the slot says is in force."""
    limits = _limits(tmp_path, 2500, 7000)
    try:
        assert [limits.effective(0), limits.effective(1)] == [2500, 7000]
        assert limits.heartbeat_ns == 0
    finally:
        limits.close()


@pytest.mark.parametrize("observer_alive", [True, False])
def test_a_new_request_is_in_force_at_once_only_without_an_observer(
    tmp_path: Path, observer_alive: bool
) -> None:
    """fcspctl set: a running observer recomputes the share; without one, the request is it."""
    limits = _limits(tmp_path, 2500)
    try:
        rules.grant_share(limits, 0, 9000)  # an observer lent it a burst
        with limits.update() as view:
            rules.request_share(view.device[0], 4000, observer_alive)
        assert limits.snapshot().device[0].sm_requested_centi == 4000
        assert limits.effective(0) == (9000 if observer_alive else 4000)
    finally:
        limits.close()


def test_restoring_requests_leaves_no_trace_of_the_observer(tmp_path: Path) -> None:
    """An observer that stops: requests in force, no clock scale, no turns, heartbeat 0."""
    limits = _limits(tmp_path, 2500, 6000)
    try:
        for i in range(2):
            rules.grant_share(limits, i, 100)
            limits.set_clock_scale(i, 12_000)
            limits.set_turn(i, abi.pack_turn(50_000, 0, 10_000))
        rules.beat(limits, live.monotonic_ns())
        rules.restore_requests(limits, limits.snapshot())
        assert [limits.effective(i) for i in range(2)] == [2500, 6000]
        assert [limits.clock_scale(i) for i in range(2)] == [0, 0]
        assert [limits.turn(i) for i in range(2)] == [0, 0]
        assert limits.heartbeat_ns == 0
    finally:
        limits.close()


@pytest.mark.parametrize(
    ("age_ns", "alive"),
    [
        (0, True),
        (rules.OBSERVER_STALE_NS, True),
        (rules.OBSERVER_STALE_NS + 1, False),
        (-5_000_000, True),  # a heartbeat a little ahead of this reader's clock
    ],
)
def test_an_observer_is_alive_while_its_heartbeat_is_fresh(age_ns: int, alive: bool) -> None:
    """The same boundary as the shim's: a heartbeat up to FCSP_OBSERVER_STALE_NS old."""
    now = 10 * rules.OBSERVER_STALE_NS
    assert rules.observer_alive(now - age_ns, now) is alive
    assert rules.observer_alive(0, now) is False  # 0: no observer, ever


@pytest.fixture(scope="module")
def c_spill(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fcsp_mem_spill from shim/fcsp_slot.h: argv triples (bytes, centi, quota), one bound
    printed per triple."""
    return _compile(
        tmp_path_factory.mktemp("spill"),
        "    for (int i = 1; i + 2 < argc; i += 3)\n"
        '        printf("%llu\\n", (unsigned long long)fcsp_mem_spill(\n'
        "            strtoull(argv[i], NULL, 10), (uint32_t)strtoul(argv[i + 1], NULL, 10),\n"
        "            strtoull(argv[i + 2], NULL, 10)));\n"
        "    return 0;\n",
    )


@settings(max_examples=100, deadline=None)
@given(
    triples=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 12 * GiB]) | st.integers(0, (1 << 64) - 1),
            st.sampled_from([0, 1, 5_000, 10_000, 1_000_000, (1 << 32) - 1])
            | st.integers(0, (1 << 32) - 1),
            st.sampled_from([0, 9_999, 8 * GiB, (1 << 64) - 1]) | st.integers(0, (1 << 64) - 1),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_the_spill_rule_is_the_same_in_c_and_python(
    c_spill: Path, triples: list[tuple[int, int, int]]
) -> None:
    """fcsp_mem_spill and rules.memory_spill give the same bound for any bytes, multiple
    and quota, saturating rather than wrapping."""
    out = subprocess.run(
        [str(c_spill), *(str(v) for triple in triples for v in triple)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out == [str(rules.memory_spill(*triple)) for triple in triples]


@pytest.mark.parametrize(
    ("used_pct", "levels", "level"),
    [
        (0, 0, rules.Pressure.OK),
        (69.9, 0, rules.Pressure.OK),  # 0: the default profile's 70 / 85 / 95
        (70, 0, rules.Pressure.WARNING),
        (85, 0, rules.Pressure.HIGH),
        (95, 0, rules.Pressure.CRITICAL),
        (120, 0, rules.Pressure.CRITICAL),  # a soft tenant past its quota
        (85, rules.pack_pressure(80, 90, 97), rules.Pressure.WARNING),
        (96, rules.pack_pressure(80, 90, 97), rules.Pressure.HIGH),
        (97, rules.pack_pressure(80, 90, 97), rules.Pressure.CRITICAL),
    ],
)
def test_pressure_levels_at_the_profiles_percentages(
    used_pct: float, levels: int, level: rules.Pressure
) -> None:
    quota = 100 * MiB  # a whole number of bytes at each percentage
    assert rules.pressure_level(round(quota * used_pct / 100), quota, levels) == level


def test_no_quota_is_never_pressed_and_levels_must_rise() -> None:
    assert rules.pressure_level(1 << 40, 0, 0) == rules.Pressure.OK
    assert rules.unpack_pressure(rules.pack_pressure(1, 2, 100)) == (1, 2, 100)
    for bad in ((85, 70, 95), (0, 85, 95), (70, 85, 101), (70, 70, 95)):
        with pytest.raises(ValueError, match="must rise"):
            rules.pack_pressure(*bad)
