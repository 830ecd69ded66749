"""Duty: NVML's view against the tenants' (at most once a second: process-list queries
hold the driver's global lock and slow every tenant).

The host's authority over memory: a tenant's processes are those in its container's
cgroup (the reaper finds them), whatever they call themselves, and their memory is what
the driver counts, not what the tenant's shim reports.  Per tenant and GPU: that memory
against the quota plus each process's allowance (its context, measured per GPU and
driver by observer.contexts, and [observer] process_allowance_mib for the modules the
driver loads), past it the processes stopped until the tenant is within it
([observer] over_quota_action = "kill"; "warn" only logs); processes that run without the
shim (static or musl binaries; a process the tenant's records name counts as shimmed only
if it maps FCSP's library: ShimMaps), processes of an MPS tenant outside MPS, and a tenant whose
share MPS holds per process with several processes in MPS, reported; the number of a
tenant's MPS processes is published in its limits, where its shims hold several to the
share together.
nvml.cross_check is the pure part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import signal
from collections.abc import Callable
from pathlib import Path

from fcsp_hook import config, mps, nvml
from fcsp_hook.errors import SlotError
from fcsp_hook.observer import contexts
from fcsp_hook.observer.state import NS_PER_MS, Duty, HostState
from fcsp_hook.slot import abi


class CrossCheck(Duty):
    name = "crosscheck"

    def __init__(self) -> None:
        self.over_quota: set[tuple[str, str]] = set()  # (container, GPU) warned about
        self.context_bytes: dict[str, int] = {}  # per GPU UUID, measured
        self.shim_maps: ShimMaps | None = None

    def start(self, state: HostState) -> None:
        """Each GPU's bare context, from the state directory or measured now."""
        if not state.nv.available:
            return
        driver = state.nv.driver_version()
        state_dir = state.cfg.paths.state_dir
        self.context_bytes = contexts.load(state_dir, driver)
        missing = [g for g in state.gpus if g.uuid not in self.context_bytes]
        if missing:
            self.context_bytes |= contexts.measure(state.nv, missing)
            problem = contexts.save(state_dir, driver, self.context_bytes)
            if problem:
                state.log.warning("context sizes not saved", reason=problem)
        state.log.info("context sizes", driver=driver, bytes=self.context_bytes)

    def period_ns(self, state: HostState) -> int:
        return state.cfg.observer.nvml_interval_ms * NS_PER_MS

    def due(self, state: HostState, now_ns: int, next_ns: int) -> bool:
        return state.nv.available and now_ns >= next_ns

    def run(self, state: HostState, now_ns: int) -> None:
        extra = state.cfg.observer.process_allowance_mib << 20
        allowance = {g.uuid: self.context_bytes.get(g.uuid, 0) + extra for g in state.gpus}
        if self.shim_maps is None or self.shim_maps.library != state.cfg.hook.library:
            self.shim_maps = ShimMaps(state.cfg.hook.library, state.cfg.paths.state_dir)
        maps_shim = self.shim_maps.checker(set(state.members))
        tenants = views(state, maps_shim)
        result = nvml.cross_check(tenants, processes(state), state.members.get, allowance)
        self.apply(state, result)

    def apply(self, state: HostState, result: nvml.CrossCheck) -> None:
        state.nvml_memory = result.memory
        state.foreign = result.foreign
        for cid, tenant in state.tenants.items():
            pids = sorted(result.unshimmed.get(cid, []))
            if pids != tenant.unshimmed and pids:
                tenant.log.warning("processes on the GPU without the shim", host_pids=pids)
            tenant.unshimmed = pids
            outside = sorted(result.outside_mps.get(cid, []))
            if outside != tenant.outside_mps and outside:
                tenant.log.warning(
                    "processes of an MPS tenant run outside MPS (time-sliced, no SM limit)",
                    host_pids=outside,
                )
            tenant.outside_mps = outside
            clients = sorted(result.mps_clients.get(cid, []))
            if len(clients) > max(len(tenant.mps_clients), 1) and mps.share_in_hardware(
                int(tenant.spec.isolation_mode), int(tenant.spec.priority)
            ):
                tenant.log.warning(
                    "MPS caps each process's SMs, not the tenant's: its processes together "
                    "may use more than its share",
                    host_pids=clients,
                )
            tenant.mps_clients = clients
            for i, device in enumerate(tenant.devices):
                # Its shims count their kernel time against the share while it has several.
                count = len(clients) if device.grant.backend == abi.Backend.MPS else 0
                if tenant.limits.mps_processes(i) != count:
                    tenant.limits.set_mps_processes(i, count)
        now_over = set()
        for over in result.over_quota:
            key = (over.container_id, over.gpu)
            now_over.add(key)
            log = state.log.bind(container_id=over.container_id)
            if over.culprits and state.cfg.observer.over_quota_action == config.OVER_QUOTA_KILL:
                for pid in over.culprits:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                log.error(
                    "over memory quota: processes killed",
                    gpu=over.gpu,
                    used=over.used_bytes,
                    quota=over.quota_bytes,
                    host_pids=list(over.culprits),
                )
            elif key not in self.over_quota:
                log.warning(
                    "over memory quota", gpu=over.gpu, used=over.used_bytes, quota=over.quota_bytes
                )
        self.over_quota = now_over


@dataclasses.dataclass(frozen=True)
class Library:
    """FCSP's library as /proc/<pid>/maps shows a mapping of it."""

    device: str  # major:minor in hex
    inode: str


LIBRARIES_FILE = "libraries.json"
LIBRARIES_KEPT = 8


class ShimMaps:
    """Which host processes map FCSP's library (the file the hook mounts into containers as
    libvgpu.so), from /proc/<pid>/maps, which a tenant cannot write: a record of the shim
    that it forges for a process without it does not make that process shimmed.  A mapping
    is of the library if it shows the device and inode the observer's own mapping of it
    shows (an overlay filesystem can show those of the file below it rather than stat's);
    nothing of the tenant's is opened, so no file it serves can stall the observer.  The
    library as it was before an upgrade still counts (its containers mapped it when they
    started): the last LIBRARIES_KEPT are kept in <state_dir>/libraries.json."""

    def __init__(self, library: Path, state_dir: Path) -> None:
        self.library, self.state_dir = library, state_dir
        self.read_as: tuple[int, int, int] | None = None  # its inode, size and mtime, read
        self.known: list[Library] = _load_libraries(state_dir)
        self.mapping: set[int] = set()  # host pids found to map it

    def identities(self) -> list[Library]:
        """The library now and as it was before; [] where it is not there now."""
        try:
            st = os.stat(self.library)
            if self.read_as != (st.st_ino, st.st_size, st.st_mtime_ns):
                now = _as_mapped(self.library)
                self.read_as = (st.st_ino, st.st_size, st.st_mtime_ns)
                if now not in self.known:
                    self.known = [*self.known, now][-LIBRARIES_KEPT:]
                    _save_libraries(self.state_dir, self.known)
        except (OSError, ValueError):
            return []
        return self.known

    def checker(self, live: set[int]) -> Callable[[int], bool] | None:
        """maps_shim for views, over the processes in live; None where the library is not
        there: the tenants' records alone then say which processes run the shim."""
        libraries = self.identities()
        self.mapping &= live
        if not libraries:
            return None
        name = self.library.name

        def maps_it(host_pid: int) -> bool:
            if host_pid not in self.mapping and _maps(host_pid, name, libraries):
                self.mapping.add(host_pid)
            return host_pid in self.mapping

        return maps_it


def _as_mapped(library: Path) -> Library:
    """The library as the observer's own mapping of it shows in /proc/self/maps."""
    with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ):
        st = os.fstat(f.fileno())
        path = str(library.resolve())
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5] == path:
                return Library(fields[3], fields[4])
    return Library(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", str(st.st_ino))


def _load_libraries(state_dir: Path) -> list[Library]:
    try:
        doc = json.loads((state_dir / LIBRARIES_FILE).read_text()[: 1 << 16])
        return [Library(**entry) for entry in doc][-LIBRARIES_KEPT:]
    except (OSError, ValueError, TypeError):
        return []


def _save_libraries(state_dir: Path, libraries: list[Library]) -> None:
    with contextlib.suppress(OSError):
        state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = state_dir / f".{LIBRARIES_FILE}.tmp"
        tmp.write_text(json.dumps([dataclasses.asdict(lib) for lib in libraries]))
        os.replace(tmp, state_dir / LIBRARIES_FILE)


# Of a process's maps, read at most this: a tenant can give a process any number of
# mappings, and one whose library lies past it counts as unshimmed, its own doing.
MAPS_READ = 4 << 20


def _maps(host_pid: int, name: str, libraries: list[Library]) -> bool:
    """Whether a process maps a file called name that is one of the libraries; True where
    its maps cannot be read (it is gone: NVML no longer lists it either)."""
    try:
        with open(f"/proc/{host_pid}/maps", "rb") as maps:
            lines = maps.read(MAPS_READ).decode(errors="replace").splitlines()
    except OSError:
        return True
    known = {(lib.device, lib.inode) for lib in libraries}
    return any(
        len(f := line.split()) >= 6 and f[5].endswith("/" + name) and (f[3], f[4]) in known
        for line in lines
    )


def views(
    state: HostState, maps_shim: Callable[[int], bool] | None = None
) -> list[nvml.TenantView]:
    """What each tenant is granted and which of its pids report through the shim: those its
    records name that, where maps_shim can tell (ShimMaps), map FCSP's library."""
    host_pid_of = {(cid, ns_pid): pid for pid, (cid, ns_pid) in state.members.items()}
    out = []
    for cid, tenant in state.tenants.items():
        quotas = {d.grant.gpu: state.memory_quota(d.grant) for d in tenant.devices}
        try:
            shimmed = frozenset(r.pid for r in tenant.usage.live_processes())
        except SlotError:
            shimmed = frozenset()
        if maps_shim is not None:
            shimmed = frozenset(
                p for p in shimmed if (h := host_pid_of.get((cid, p))) is None or maps_shim(h)
            )
        on_mps = frozenset(
            d.grant.gpu for d in tenant.devices if d.grant.backend == abi.Backend.MPS
        )
        hard = int(tenant.spec.mem_mode) != abi.MemMode.SOFT
        out.append(nvml.TenantView(cid, quotas, shimmed, on_mps, hard))
    return out


def processes(state: HostState) -> dict[str, list[nvml.GpuProcess]]:
    """NVML's compute processes per GPU, without the MPS daemons the observer started (by
    their pids and their children's, never by a name a tenant could give a process)."""
    served = frozenset(u for u, d in state.backends.items() if d.backend == "mps")
    daemons = {d.pid for d in state.backends.values() if d.pid}
    return {
        uuid: [p for p in procs if p.host_pid not in daemons and parent(p.host_pid) not in daemons]
        for uuid, procs in state.nv.processes(state.gpus, served).items()
    }


def parent(pid: int) -> int:
    """A process's parent pid; 0 when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
        return int(data[data.rfind(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return 0
