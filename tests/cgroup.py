"""A real cgroup for a test's "container": created under the hierarchy FCSP uses on this host
(the v1 freezer, or the unified one), processes moved in, thawed and removed afterwards."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator

from fcsp_hook import cgroups

TIMEOUT = 20.0


@contextlib.contextmanager
def fresh_cgroup() -> Iterator[cgroups.Cgroup]:
    """A fresh cgroup beside this process's; every process left in it is killed at the end."""
    mine = cgroups.of_process(os.getpid())
    directory = mine.directory / f"fcsp-test-{uuid.uuid4().hex[:12]}"
    directory.mkdir()
    group = cgroups.Cgroup(directory, mine.v2)
    try:
        yield group
    finally:
        with contextlib.suppress(cgroups.CgroupError):
            group.set_frozen(False)
        for pid in group.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        deadline = time.monotonic() + TIMEOUT
        while group.processes() and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(OSError):
            directory.rmdir()


def join(group: cgroups.Cgroup, proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """Move a process (with the threads it has) into the cgroup."""
    (group.directory / "cgroup.procs").write_text(f"{proc.pid}\n")


def spawn(group: cgroups.Cgroup, argv: list[str]) -> subprocess.Popen[bytes]:
    """A process started inside the cgroup (before it runs anything, so all it forks is
    there too)."""
    procs = group.directory / "cgroup.procs"
    return subprocess.Popen(argv, preexec_fn=lambda: procs.write_text(f"{os.getpid()}\n"))  # noqa: PLW1509
