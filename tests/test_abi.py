"""The slot ABI: shim/fcsp_slot.h and its ctypes mirror fcsp_hook/abi.py agree byte for byte."""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path
from struct import unpack_from

import pytest

from fcsp_hook.slot import abi, rules, uvm

REPO = Path(__file__).resolve().parents[1]

CONSTANTS = {
    "FCSP_LIMITS_MAGIC": abi.LIMITS_MAGIC,
    "FCSP_USAGE_MAGIC": abi.USAGE_MAGIC,
    "FCSP_SLOT_VERSION": abi.SLOT_VERSION,
    "FCSP_MAX_DEVICES": abi.MAX_DEVICES,
    "FCSP_MAX_PROCS": abi.MAX_PROCS,
    "FCSP_UUID_LEN": abi.UUID_LEN,
    "FCSP_ID_LEN": abi.ID_LEN,
    "FCSP_TENANT_LEN": abi.TENANT_LEN,
    "FCSP_DEV_SELECTED_BY_UUID": abi.DEV_SELECTED_BY_UUID,
    "FCSP_TURN_BITS": abi.TURN_BITS,
    "FCSP_MODE_NONE": abi.IsolationMode.NONE,
    "FCSP_MODE_BALANCED": abi.IsolationMode.BALANCED,
    "FCSP_MODE_STRICT": abi.IsolationMode.STRICT,
    "FCSP_MODE_ADAPTIVE": abi.IsolationMode.ADAPTIVE,
    "FCSP_MEM_HARD": abi.MemMode.HARD,
    "FCSP_MEM_SOFT": abi.MemMode.SOFT,
    "FCSP_MEM_SPILL": abi.MemMode.SPILL,
    "FCSP_UVM_DEFAULT": abi.UvmProfile.DEFAULT,
    "FCSP_UVM_LLM_INFERENCE": abi.UvmProfile.LLM_INFERENCE,
    "FCSP_UVM_TRAINING": abi.UvmProfile.TRAINING,
    "FCSP_EVICT_LRU": abi.EvictPolicy.LRU,
    "FCSP_EVICT_FIFO": abi.EvictPolicy.FIFO,
    "FCSP_PRESSURE_BITS": abi.PRESSURE_BITS,
    "FCSP_PRIORITY_BEST_EFFORT": abi.Priority.BEST_EFFORT,
    "FCSP_PRIORITY_LATENCY": abi.Priority.LATENCY,
    "FCSP_BACKEND_TIMESLICE": abi.Backend.TIMESLICE,
    "FCSP_BACKEND_MPS": abi.Backend.MPS,
    "FCSP_PROC_FREE": abi.ProcState.FREE,
    "FCSP_PROC_LIVE": abi.ProcState.LIVE,
    "FCSP_PROC_REAPING": abi.ProcState.REAPING,
    "FCSP_WHOLE_GPU_CENTI": abi.WHOLE_GPU_CENTI,
    "FCSP_MIN_SHARE_CENTI": rules.MIN_SHARE_CENTI,
    "FCSP_OBSERVER_STALE_NS": rules.OBSERVER_STALE_NS,
}


def _program() -> str:
    """A C program printing the layout of every field the Python mirror names."""
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "fcsp_slot.h"',
        "int main(void) {",
    ]
    for cname, struct in abi.STRUCTS.items():
        lines.append(f'printf("{cname}:sizeof %zu\\n", sizeof(struct {cname}));')
        lines.append(f'printf("{cname}:alignof %zu\\n", _Alignof(struct {cname}));')
        for field, *_ in struct._fields_:
            lines.append(
                f'printf("{cname}.{field} %zu %zu\\n", offsetof(struct {cname}, {field}), '
                f"sizeof(((struct {cname} *)0)->{field}));"
            )
    for name in CONSTANTS:
        lines.append(f'printf("{name} %llu\\n", (unsigned long long){name});')
    lines += ['printf("FCSP_SLOT_DIR %s\\n", FCSP_SLOT_DIR);']
    lines += [
        "#define PRINT_PROFILE(id, name, warning, high, critical, mib, evict) "
        'printf("profile:%s %d %d %d %d %d %d\\n", name, (int)id, warning, high, critical, '
        "mib, (int)evict);",
        "FCSP_UVM_PROFILES(PRINT_PROFILE)",
    ]
    lines += ['printf("FCSP_MPS_DIR %s\\n", FCSP_MPS_DIR);', "return 0; }"]
    return "\n".join(lines) + "\n"


def _c_layout(tmp_path: Path) -> dict[str, str]:
    source = tmp_path / "layout.c"
    source.write_text(_program())
    exe = tmp_path / "layout"
    subprocess.run(
        ["gcc", "-std=c11", "-Wall", "-Werror", f"-I{REPO / 'shim'}", "-o", str(exe), str(source)],
        check=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_every_field_has_the_same_offset_and_size(tmp_path: Path) -> None:
    """Each field of each slot struct sits at the same offset with the same size in C and Python."""
    layout = _c_layout(tmp_path)
    checked = 0
    for cname, struct in abi.STRUCTS.items():
        assert layout[f"{cname}:sizeof"] == str(ctypes.sizeof(struct)), cname
        assert int(layout[f"{cname}:alignof"]) <= 8, cname
        for field, *_ in struct._fields_:
            descriptor = getattr(struct, field)
            assert layout[f"{cname}.{field}"] == f"{descriptor.offset} {descriptor.size}", (
                f"{cname}.{field}"
            )
            checked += 1
    assert checked >= 40


def test_constants_agree(tmp_path: Path) -> None:
    """Magics, version, array bounds, enum values and the slot path are the same on both sides."""
    layout = _c_layout(tmp_path)
    for name, value in CONSTANTS.items():
        assert int(layout[name]) == int(value), name
    assert layout["FCSP_SLOT_DIR"] == abi.CONTAINER_SLOT_DIR
    assert layout["FCSP_MPS_DIR"] == abi.MPS_DIR


def test_the_unified_memory_profiles_are_the_same_on_both_sides(tmp_path: Path) -> None:
    """FCSP_UVM_PROFILES (what a bare process's BUD_UVM_PROFILE picks) and uvm.PROFILES (what
    the hook writes into a slot) name the same profiles with the same knobs."""
    layout = _c_layout(tmp_path)
    c_side = {k.split(":", 1)[1]: v for k, v in layout.items() if k.startswith("profile:")}
    python = {
        name: " ".join(
            str(int(v))
            for v in (
                knobs.profile,
                *knobs.pressure_pct,
                knobs.prefetch_bytes // uvm.MiB,
                knobs.evict_policy,
            )
        )
        for name, knobs in uvm.PROFILES.items()
    }
    assert c_side == python


def test_python_mirror_covers_every_struct_of_the_header() -> None:
    """No struct is added to fcsp_slot.h without its mirror in abi.STRUCTS."""
    header = (REPO / "shim" / "fcsp_slot.h").read_text()

    declared = set(re.findall(r"^struct (fcsp_\w+) \{", header, re.MULTILINE))
    assert declared == set(abi.STRUCTS)


def _filled(cls: type[ctypes.Structure], until: str | None) -> ctypes.Structure:
    """An instance whose every scalar before `until` holds a value of its own."""
    record = cls()
    for n, (name, ctype, *_) in enumerate(cls._fields_):
        if name == until:
            break
        element = ctype._type_ if issubclass(ctype, ctypes.Array) else None
        if element is ctypes.c_char:
            setattr(record, name, f"f{n}".encode())
        elif element is not None:
            getattr(record, name)[:] = [n * 100 + i for i in range(ctype._length_)]
        else:
            setattr(record, name, n + 1)
    return record


@pytest.mark.parametrize(
    ("cls", "until"),
    [
        (abi.UsageDevice, None),
        (abi.UsageProc, None),
        (abi.Usage, "device"),
        (abi.LimitsDevice, None),
    ],
)
def test_flat_layouts_read_every_field_where_ctypes_puts_it(
    cls: type[ctypes.Structure], until: str | None
) -> None:
    """The struct formats the usage reader unpacks are derived from the ctypes structures:
    unpacking a filled record gives each field's value, and the sizes match."""
    layout = abi.flat_layout(cls, until)
    record = _filled(cls, until)
    values = unpack_from(layout.format, bytes(record))
    expected_size = getattr(cls, until).offset if until else ctypes.sizeof(cls)
    assert layout.size == expected_size
    assert set(layout.fields) == {n for n, *_ in cls._fields_[: len(layout.fields)]}
    for name, at in layout.fields.items():
        got = values[at]
        want = getattr(record, name)
        if isinstance(want, bytes):
            assert got == (want.ljust(getattr(cls, name).size, b"\0"),), name
        elif isinstance(want, int):
            assert got == (want,), name
        else:
            assert got == tuple(want), name


def test_flat_layout_refuses_what_it_cannot_flatten() -> None:
    """A nested structure array has no flat format: asked for one, it says so."""
    with pytest.raises(TypeError, match="nested"):
        abi.flat_layout(abi.Usage)
