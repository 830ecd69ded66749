"""Shared fixtures.  End-to-end tests skip only where podman cannot run (not root, not
installed); under CI (CI=true) that is an error instead, so a broken setup never
passes as a green run."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import containers


@pytest.fixture(scope="session")
def e2e_ready() -> None:
    reason = containers.podman_usable()
    for built in (containers.LIBRARY, containers.SIM_CLIENT):
        if reason is None and not built.exists():
            reason = f"{built} is not built (run make)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"end-to-end tests cannot run in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def base_rootfs(tmp_path_factory: pytest.TempPathFactory, e2e_ready: None) -> Path:
    return containers.build_base_rootfs(tmp_path_factory.mktemp("base") / "rootfs")


@pytest.fixture
def rootfs(base_rootfs: Path, tmp_path: Path) -> Path:
    """A private copy of the base rootfs that a test may make malicious."""
    dest = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", str(base_rootfs), str(dest)], check=True)
    return dest


@pytest.fixture(scope="session")
def hook_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter hooks.d entries name in tests: it imports this checkout."""
    return containers.hook_interpreter(tmp_path_factory.mktemp("hook") / "venv")


@pytest.fixture
def hook(tmp_path: Path, e2e_ready: None, hook_python: Path) -> Iterator[containers.HookSetup]:
    setup = containers.HookSetup.create(tmp_path / "fcsp", hook_python)
    yield setup
    shutil.rmtree(setup.run_dir, ignore_errors=True)
