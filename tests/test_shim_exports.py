"""libvgpu.so's interface: what it exports, and that every allocation and launch family of
the CUDA 13 header is hooked (shim/hooks.def is the one list)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.shim.harness import REPO, SHIM, build

CUDA_H = Path("/usr/local/cuda/include/cuda.h")
HOOKS_DEF = REPO / "shim" / "hooks.def"

# Entry-point families that take device memory, give it back, show it, dispatch or launch.
FAMILIES = [
    r"cuMemAlloc\w*",
    r"cuMemFree\w*",
    r"cuMemCreate",
    r"cuMemRelease",
    r"cuArrayCreate",
    r"cuArray3DCreate",
    r"cuArrayDestroy",
    r"cuMipmappedArrayCreate",
    r"cuMipmappedArrayDestroy",
    r"cuIpcOpenMemHandle",
    r"cuIpcCloseMemHandle",
    r"cuMemGetInfo",
    r"cuDeviceTotalMem",
    r"cuLaunch\w*",
    r"cuGraphLaunch",
    r"cuGetProcAddress",
    r"cuCtxDestroy",
    r"cuDevicePrimaryCtx(Release|Reset)",
]
# Matches of the families above that take no device memory, with the reason.
EXEMPT = {
    "cuMemAllocHost": "pinned host memory",
    "cuMemFreeHost": "pinned host memory",
}


def hooks() -> dict[str, str]:
    """symbol -> role from shim/hooks.def."""
    table = {}
    for raw in HOOKS_DEF.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _lib, role = line.split()
            table[name] = role
    return table


def hooked() -> set[str]:
    return {name for name, role in hooks().items() if role == "hook"}


def header_functions() -> set[str]:
    return set(re.findall(r"CUresult CUDAAPI (cu\w+)\(", CUDA_H.read_text()))


def header_variants() -> dict[str, set[str]]:
    """base name -> the exported variants the header maps it to (_v2, _ptsz, ...)."""
    text = CUDA_H.read_text()
    variants: dict[str, set[str]] = {}
    for base, target in re.findall(r"#define (cu\w+)\s+(\S+)", text):
        m = re.fullmatch(r"__CUDA_API_PTS[ZD]\((\w+)\)", target)
        if m:  # per-thread variant next to the legacy-stream one
            inner = m.group(1)
            variants.setdefault(base, set()).update({inner, inner + "_ptsz"})
        elif re.fullmatch(r"cu\w+", target) and target.startswith(base):
            variants.setdefault(base, set()).add(target)
    return variants


def test_exports_are_exactly_the_hooks_and_dlsym() -> None:
    """The version script lets out the hooked entry points and dlsym, nothing else."""
    build()
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(SHIM)], check=True, capture_output=True, text=True
    ).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert exported == hooked() | {"dlsym"}


def test_library_never_calls_the_public_dlsym() -> None:
    """libvgpu.so imports dlvsym (to reach the real dlsym), never dlsym itself."""
    build()
    out = subprocess.run(
        ["nm", "-D", "--undefined-only", str(SHIM)], check=True, capture_output=True, text=True
    ).stdout
    imported = {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}
    assert "dlvsym" in imported
    assert "dlsym" not in imported


def test_library_does_not_link_the_driver() -> None:
    """libcuda and NVML are dlopen'ed lazily, so a process that never uses CUDA never loads them."""
    build()
    out = subprocess.run(["readelf", "-d", str(SHIM)], check=True, capture_output=True, text=True)
    needed = re.findall(r"\(NEEDED\).*\[(.*)\]", out.stdout)
    assert needed, out.stdout
    assert not any(n.startswith(("libcuda", "libnvidia-ml")) for n in needed)


@pytest.mark.skipif(not CUDA_H.exists(), reason="CUDA headers not installed")
def test_every_memory_and_launch_family_of_the_header_is_hooked(tmp_path: Path) -> None:
    """Each family entry point of cuda.h, and every variant the header maps it to
    (cuMemAlloc -> cuMemAlloc_v2, cuLaunchKernel -> cuLaunchKernel_ptsz), is in hooks.def."""
    declared = header_functions()
    variants = header_variants()
    have = hooked()
    missing = []
    for family in FAMILIES:
        members = sorted(n for n in declared if re.fullmatch(family, n) and n not in EXEMPT)
        assert members, f"no {family} in {CUDA_H}: the header parse broke"
        for name in members:
            for symbol in {name} | variants.get(name, set()):
                if symbol not in have:
                    missing.append(symbol)
    # Recorded for the reader of CI logs.
    listing = "\n".join(sorted(have))
    (REPO / "tests" / "build").mkdir(parents=True, exist_ok=True)
    (REPO / "tests" / "build" / "hooked.txt").write_text(listing + "\n")
    print(f"{len(have)} hooked entry points:\n{listing}")
    assert not missing, f"not hooked: {sorted(set(missing))}"


def test_hook_list_has_no_duplicates_and_known_roles() -> None:
    """hooks.def is well formed: one line per symbol, roles hook or real, libraries cuda or nvml."""
    seen = set()
    for raw in HOOKS_DEF.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, lib, role = line.split()
        assert name not in seen, name
        seen.add(name)
        assert lib in {"cuda", "nvml"} and role in {"hook", "real"}
        assert name.startswith("cu" if lib == "cuda" else "nvml")
    assert len(seen) >= 60


# The dl and pthread functions that glibc's libc.so.6 exported before 2.34 (2.17-2.33;
# read off Debian 11's 2.31): every other dl* and pthread_* function lived in libdl.so.2 or
# libpthread.so.0 there.
OLD_LIBC_DL_PTHREAD = {
    "dl_iterate_phdr",
    *(f"pthread_attr_{v}{k}" for v in ("get", "set") for k in (
        "detachstate", "inheritsched", "schedparam", "schedpolicy", "scope")),
    "pthread_attr_destroy", "pthread_attr_init",
    "pthread_cond_broadcast", "pthread_cond_destroy", "pthread_cond_init", "pthread_cond_signal",
    "pthread_cond_timedwait", "pthread_cond_wait", "pthread_condattr_destroy",
    "pthread_condattr_init", "pthread_equal", "pthread_exit", "pthread_getschedparam",
    "pthread_mutex_destroy", "pthread_mutex_init", "pthread_mutex_lock", "pthread_mutex_unlock",
    "pthread_self", "pthread_setcancelstate", "pthread_setcanceltype", "pthread_setschedparam",
}  # fmt: skip


def test_the_library_loads_under_an_old_glibc() -> None:
    """libvgpu.so goes into every tenant's image through /etc/ld.so.preload, so it may need
    no glibc symbol version newer than 2.17: built on Debian 12 without glibc_compat.h it
    needed GLIBC_2.34, and every program of a Debian 11 image (glibc 2.31) failed to start
    ("version `GLIBC_2.34' not found (required by libvgpu.so)")."""
    build()
    symbols = subprocess.run(
        ["readelf", "--dyn-syms", "--wide", str(SHIM)], capture_output=True, text=True, check=True
    ).stdout
    versions = {
        tuple(int(p) for p in v.split(".")) for v in re.findall(r"@GLIBC_([\d.]+)", symbols)
    }
    assert versions, "no versioned glibc symbols found: readelf output changed?"
    assert max(versions) <= (2, 17), sorted(versions)[-3:]


def test_the_library_needs_neither_libdl_nor_libpthread() -> None:
    """ld.so refuses a preloaded object whose dependency is missing, before main, in every
    program, and an image may have glibc's libc.so.6 without libdl.so.2 or libpthread.so.0
    (glibc >= 2.34 needs neither).  So libvgpu.so depends on libc alone, and every dl or
    pthread function that a glibc older than 2.34 keeps outside libc.so.6 is a weak
    reference: bound where the process loaded libdl and libpthread (the hook lists an old
    image's own in ld.so.preload), NULL elsewhere, and never a failure to start."""
    build()
    dynamic = subprocess.run(
        ["readelf", "--dynamic", str(SHIM)], capture_output=True, text=True, check=True
    ).stdout
    needed = set(re.findall(r"\(NEEDED\).*\[(.*)\]", dynamic))
    assert needed == {"libc.so.6", "ld-linux-x86-64.so.2"}, needed
    imports = subprocess.run(
        ["nm", "-D", "--undefined-only", str(SHIM)], capture_output=True, text=True, check=True
    ).stdout
    outside_old_libc = {}
    for line in imports.splitlines():
        kind, symbol = line.split()[-2:]
        name = symbol.split("@")[0]
        if name.startswith(("dl", "pthread_")) and name not in OLD_LIBC_DL_PTHREAD:
            outside_old_libc[name] = kind
    assert {"dlopen", "dlvsym", "pthread_key_create"} <= outside_old_libc.keys(), imports
    assert set(outside_old_libc.values()) == {"w"}, outside_old_libc
