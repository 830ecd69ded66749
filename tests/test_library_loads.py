"""libvgpu.so is preloaded into every glibc process of a container, CUDA or not: it must
load anywhere a glibc program runs and never break a program that does not use CUDA."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.containers import LIBRARY

# What every glibc image has.  Anything else (libm, libstdc++, libcuda, and libdl or
# libpthread, which images of glibc >= 2.34 may lack) would make every program in an
# image that lacks it fail to start: ld.so treats a preloaded object's missing dependency
# as fatal.
ALLOWED_NEEDED = {"libc.so.6", "ld-linux-x86-64.so.2"}


def _needed(library: Path) -> set[str]:
    out = subprocess.run(
        ["readelf", "-d", str(library)], capture_output=True, text=True, check=True
    )
    return {
        line.split("[")[1].split("]")[0] for line in out.stdout.splitlines() if "(NEEDED)" in line
    }


def test_library_needs_only_the_c_library() -> None:
    """The shim links nothing but glibc's own libraries: no libm, no CUDA."""
    needed = _needed(LIBRARY)
    assert "libc.so.6" in needed
    assert needed <= ALLOWED_NEEDED, f"unexpected dependencies: {needed - ALLOWED_NEEDED}"


def test_preloaded_into_a_program_without_cuda_is_harmless(tmp_path: Path) -> None:
    """With no slot and no CUDA, a preloaded program runs and exits as it would without it."""
    env = {"LD_PRELOAD": str(LIBRARY), "PATH": "/usr/bin:/bin", "FCSP_SLOT_DIR": str(tmp_path)}
    result = subprocess.run(
        ["/bin/sh", "-c", "echo hello; exit 3"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 3
    assert result.stdout == "hello\n"
    assert result.stderr == ""
