"""A container's cgroup: which processes are the tenant's, and freezing them.

The hook records the container's cgroup at prestart, before any of the tenant's code has
run, in the slot (CGROUP_FILE, read-only inside the container).  From then on the host
counts as the tenant's every process in that cgroup's subtree, whatever pid namespace it
runs in and whatever it calls itself: the tenant cannot leave its cgroup nor write the
record.  On cgroup v2 hosts the unified hierarchy is used; on v1 and hybrid hosts the
freezer hierarchy, whose subtree is the container's too and which freezes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fcsp_hook.errors import FcspError

PROC = Path("/proc")
MOUNTINFO = PROC / "self" / "mountinfo"
CGROUP_FILE = "cgroup"  # in the slot: "v2 <directory>" or "v1 <directory>"
MAX_DEPTH = 32  # a deeper tree is a tenant's making: its processes are counted that deep
_V1_STATE = {True: b"FROZEN", False: b"THAWED"}


class CgroupError(FcspError):
    """A cgroup that cannot be found, read or frozen."""


@dataclass(frozen=True)
class Cgroup:
    directory: Path  # absolute, on the host, under a cgroup mount
    v2: bool

    def to_text(self) -> str:
        return f"{'v2' if self.v2 else 'v1'} {self.directory}\n"

    @classmethod
    def from_text(cls, text: str) -> Cgroup:
        version, _, directory = text.strip().partition(" ")
        path = Path(directory)
        if version not in {"v1", "v2"} or not path.is_absolute() or ".." in path.parts:
            raise CgroupError(f"not a cgroup record: {text[:200]!r}")
        return cls(path, version == "v2")

    def exists(self) -> bool:
        return self.directory.is_dir()

    def processes(self) -> set[int]:
        """Every process in the subtree (cgroup.procs of each cgroup in it)."""
        found: set[int] = set()
        stack = [(self.directory, 0)]
        while stack:
            directory, depth = stack.pop()
            try:
                found.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
                if depth < MAX_DEPTH:
                    with os.scandir(directory) as entries:
                        stack.extend(
                            (Path(e.path), depth + 1)
                            for e in entries
                            if e.is_dir(follow_symlinks=False)
                        )
            except (OSError, ValueError):
                continue  # removed while walked
        return found

    def set_frozen(self, frozen: bool) -> None:
        """Freeze or thaw every process of the subtree (CgroupError when it cannot)."""
        name = "cgroup.freeze" if self.v2 else "freezer.state"
        value = (b"1" if frozen else b"0") if self.v2 else _V1_STATE[frozen]
        try:
            fd = os.open(self.directory / name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.write(fd, value)
            finally:
                os.close(fd)
        except OSError as exc:
            raise CgroupError(f"{self.directory}: cannot write {name}: {exc.strerror}") from exc

    def frozen(self) -> bool | None:
        """Whether it is frozen (or being frozen) now; None if that cannot be read."""
        name = "cgroup.freeze" if self.v2 else "freezer.state"
        try:
            text = (self.directory / name).read_text().strip()
        except OSError:
            return None
        return text == "1" if self.v2 else text in {"FROZEN", "FREEZING"}


def _mounts(mountinfo: Path) -> tuple[Path | None, Path | None]:
    """(the cgroup2 mount, the v1 freezer mount) of this host, either may be None."""
    unified = freezer = None
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        fstype, options = after[0], (after[2] if len(after) > 2 else "")
        if fstype == "cgroup2" and unified is None:
            unified = Path(fields[4])
        elif fstype == "cgroup" and "freezer" in options.split(",") and freezer is None:
            freezer = Path(fields[4])
    return unified, freezer


def of_process(pid: int, proc: Path = PROC, mountinfo: Path = MOUNTINFO) -> Cgroup:
    """The cgroup a host process is in: the freezer hierarchy's where the host has one
    (v1, hybrid), else the unified one's."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError as exc:
        raise CgroupError(f"cannot read the cgroup of pid {pid}: {exc.strerror}") from exc
    unified, freezer = _mounts(mountinfo)
    paths = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        paths[controllers] = path
        for controller in controllers.split(","):
            paths[controller] = path
    if freezer is not None and "freezer" in paths:
        return Cgroup(freezer / paths["freezer"].lstrip("/"), v2=False)
    if unified is not None and "" in paths:
        return Cgroup(unified / paths[""].lstrip("/"), v2=True)
    raise CgroupError(f"pid {pid} is in no freezer or unified cgroup this host mounts")


def read_record(slot_dir: Path) -> Cgroup | None:
    """The cgroup the hook recorded in a slot; None when there is none (or it is bad)."""
    try:
        return Cgroup.from_text((slot_dir / CGROUP_FILE).read_text()[:4096])
    except (OSError, CgroupError):
        return None
