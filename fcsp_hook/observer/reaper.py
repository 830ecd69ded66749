"""Duty: remove the slots of containers that are gone; find each container's processes.

A whole tenant is reaped when the container's init process, recorded by the hook in its
limits (init_host_pid, init_start_time), is gone or its pid was reused: poststop hooks
can be skipped (a crash, a killed engine).  Only proof counts: the kernel saying there is
no such process, or one with another start time; a /proc that cannot be read now (out of
descriptors, an I/O error) proves nothing.  A slot without that record is never reaped (a
dead container cannot be told from an idle one), only reported.

A tenant's processes are every process in the cgroup the hook recorded for its container
(nested and shared pid namespaces included, whatever they call themselves); a slot
without that record falls back to the processes in the init's pid namespace.

Per-process records (pid LIVE in a usage file) are released by the shims, not here:
releasing a dead process's memory charge exactly once needs a compare-and-swap on shared
memory, which the shim does natively on its next allocation.  This duty only reports dead
records (status, metrics, log), mapping pids through the container's pid namespace
(/proc/<host pid>/status NSpid), and leaves that map in the state for the NVML check.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fcsp_hook import cgroups
from fcsp_hook.errors import SlotError
from fcsp_hook.observer.state import NS_PER_MS, Duty, HostState, Tenant
from fcsp_hook.procfs import PROC, process_alive
from fcsp_hook.slot import abi, files


def cgroup_members(tenants: dict[str, Tenant], proc: Path = PROC) -> dict[int, tuple[str, int]]:
    """Every process in the tenants' recorded cgroups: host pid -> (container id, pid in its
    own pid namespace, as its shim records it)."""
    members: dict[int, tuple[str, int]] = {}
    for cid, tenant in tenants.items():
        if tenant.cgroup is None:
            continue
        for pid in tenant.cgroup.processes():
            members[pid] = (cid, _innermost_pid(pid, proc) or pid)
    return members


def _innermost_pid(pid: int, proc: Path) -> int:
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def namespace_members(init_pids: dict[str, int], proc: Path = PROC) -> dict[int, tuple[str, int]]:
    """Every host process in the tenants' pid namespaces: host pid -> (container id, ns pid).

    A pid namespace that several tenants share (containers run with --pid=host, or joined
    to one another's) names no single owner: its processes are attributed to none, rather
    than all to whichever tenant came last (which would flag the others' processes as
    running without the shim).
    """
    ns_owner: dict[str, str] = {}
    shared: set[str] = set()
    for cid, pid in init_pids.items():
        with contextlib.suppress(OSError):
            ns = os.readlink(proc / str(pid) / "ns" / "pid")
            if ns in ns_owner and ns_owner[ns] != cid:
                shared.add(ns)
            ns_owner[ns] = cid
    for ns in shared:
        del ns_owner[ns]
    members: dict[int, tuple[str, int]] = {}
    if not ns_owner:
        return members
    try:
        entries = list(os.scandir(proc))
    except OSError:
        return members  # /proc unreadable now (descriptors): nobody is known to be anyone's
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            owner = ns_owner.get(os.readlink(f"{entry.path}/ns/pid"))
            if owner is None:
                continue
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue  # exited while we looked
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                members[int(entry.name)] = (owner, int(line.split()[-1]))
                break
    return members


class Reaper(Duty):
    name = "reaper"

    def period_ns(self, state: HostState) -> int:
        return state.cfg.observer.reap_interval_ms * NS_PER_MS

    def run(self, state: HostState, now_ns: int) -> None:
        init_pids: dict[str, int] = {}
        for tenant in state.tenants.values():
            if tenant.cgroup is None:  # the hook may have written it after the limits
                tenant.cgroup = cgroups.read_record(tenant.directory)
        for cid, tenant in list(state.tenants.items()):
            alive = process_alive(int(tenant.spec.init_host_pid), int(tenant.spec.init_start_time))
            if alive is False:
                # Under the slots lock, checked again: a restart may have reused the id.
                removal = files.remove_if_gone(state.run_dir, cid)
                if removal is files.Removal.FAILED:
                    state.log.error("slot not removed; next round", container_id=cid)
                    continue
                state.drop_tenant(cid, f"container gone, slot {removal.value}")
            elif alive:
                init_pids[cid] = int(tenant.spec.init_host_pid)
        reap_unwatched(state)
        by_namespace = {c: p for c, p in init_pids.items() if state.tenants[c].cgroup is None}
        state.members = namespace_members(by_namespace) if by_namespace else {}
        state.members |= cgroup_members(state.tenants)
        known: dict[str, set[int]] = {}
        for cid, ns_pid in state.members.values():
            known.setdefault(cid, set()).add(ns_pid)
        for cid, tenant in state.tenants.items():
            counted = cid in init_pids or tenant.cgroup is not None
            report_dead(state, tenant, known.get(cid, set()) if counted else None)


def reap_unwatched(state: HostState) -> None:
    """Slots no tenant is watched for (an earlier install's, a usage file that cannot be
    read) are removed on the same proof: the init process their limits record is gone."""
    for cid in list(state.unwatched):
        try:
            pid, start = files.read_init_process(
                files.slot_path(state.run_dir, cid) / abi.LIMITS_FILE
            )
        except (SlotError, OSError):
            continue  # no record to prove anything by
        if process_alive(pid, start) is False:
            removal = files.remove_if_gone(state.run_dir, cid)
            if removal is not files.Removal.FAILED:
                del state.unwatched[cid]
                state.log.info("unwatched slot's container gone", container_id=cid,
                               slot=removal.value)  # fmt: skip


def report_dead(state: HostState, tenant: Tenant, live: set[int] | None) -> None:
    """Per-process records whose pid is not in the container's namespace any more."""
    try:
        records = tenant.usage.live_processes()
    except SlotError:
        return
    if live is None:  # no namespace to look in: cannot tell
        tenant.dead_processes, tenant.dead_bytes = [], 0
        return
    dead = [r for r in records if r.pid not in live]
    pids = [r.pid for r in dead]
    if pids != tenant.dead_processes:
        if pids:
            tenant.log.warning(
                "dead processes still charged; the shim releases them on its next allocation",
                pids=pids,
            )
        state.dirty = True
    tenant.dead_processes = pids
    tenant.dead_bytes = sum(sum(r.mem_used_bytes) for r in dead)
