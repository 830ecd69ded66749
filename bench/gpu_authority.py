"""The host as the authority, on a real GPU: what a tenant that attacks gets.

    OUT=$OUT python3 bench/gpu_authority.py \
        [--only contexts,memory,compute,compute40,forged40,long,mps]

Sections (each tenant's container is a cgroup this bench makes, recorded in its slot as
the hook records it; fcsp-observer runs from this checkout with its defaults):
  contexts  a bare CUDA context as NVML counts it (the observer's probe), and what a
            PyTorch process holds beyond its allocations
  memory    an honest tenant at its quota with three processes is never touched; a
            process without the shim past the quota is stopped, and how soon
  compute   a tenant launching without the shim at strict 10 %, against one with it,
            for COMPUTE_S: the share each gets over the last 5 s, the part of the time it
            is frozen and when
  compute40 the same at strict 40 %, where the shimmed tenant reads more than the other
  forged40  compute40 with a record of the shim forged for the process without it, so
            that the shimmed tenant is suspected first
  long      ten processes in turn, each one 200 ms kernel then exit, at strict 10 %
  mps       an MPS tenant at 30 % that setenv()s 100 % before CUDA starts, with and
            without the shim: the share the real daemon gives it; three of its
            processes at once; two clients at once: whom NVML's per-process
            utilisation names; a 10 % MPS tenant's process outside both the shim and
            MPS beside a busy MPS client: what the host's hold leaves it
Writes $OUT/authority.md and $OUT/authority-raw.json (for the compute sections, what the
observer said of each tenant every 0.2 s, and the driver's samples every 50 ms beside
whether the held one was frozen: "seen" and "trace").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import lib  # noqa: F401  # the checkout first on sys.path
from lib.report import Report, out_dir, save_json
from lib.scene import Device, Scene

from fcsp_hook import cgroups, nvml
from fcsp_hook.observer import contexts
from fcsp_hook.slot import abi, files

WORKER = Path(__file__).resolve().parent / "authority_workers.py"
GiB = 1 << 30
SECTIONS = ("contexts", "memory", "compute", "compute40", "forged40", "long", "mps")


class Tenants:
    """Containers as cgroups, and worker processes started inside them."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.groups: list[cgroups.Cgroup] = []
        self.procs: list[subprocess.Popen[str]] = []

    def add(
        self, name: str, sm: int, mem: int = 0, device: Device | None = None, **slot: Any
    ) -> tuple[Path, cgroups.Cgroup]:
        directory = self.scene.slot(name, [device or Device(sm_centi=sm, mem_bytes=mem)], **slot)
        mine = cgroups.of_process(os.getpid())
        group = cgroups.Cgroup(mine.directory / f"fcsp-bench-{uuid.uuid4().hex[:8]}", mine.v2)
        group.directory.mkdir()
        self.groups.append(group)
        (directory / cgroups.CGROUP_FILE).write_text(group.to_text())
        init = self.start(group, ["sleep", "3600"], None)
        stat = Path(f"/proc/{init.pid}/stat").read_bytes()
        start_time = int(stat[stat.rfind(b")") + 2 :].split()[19])
        from fcsp_hook.slot import live  # noqa: PLC0415

        limits = live.LimitsMap(directory / abi.LIMITS_FILE)
        with limits.update() as view:
            view.init_host_pid, view.init_start_time = init.pid, start_time
        limits.close()
        return directory, group

    def start(
        self, group: cgroups.Cgroup | None, argv: list[str], slot: Path | None, **env: str
    ) -> subprocess.Popen[str]:
        procs = group.directory / "cgroup.procs" if group else None
        proc = subprocess.Popen(
            argv,
            env=self.scene.env(slot, extra=env) if slot else {**self.scene.env(), **env},
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=(lambda: procs.write_text("0\n")) if procs else None,  # noqa: PLW1509
        )
        self.procs.append(proc)
        return proc

    def worker(
        self, group: cgroups.Cgroup | None, slot: Path | None, *args: str, **env: str
    ) -> subprocess.Popen[str]:
        return self.start(group, [sys.executable, str(WORKER), *args], slot, **env)

    def close(self) -> None:
        for group in self.groups:
            with contextlib.suppress(cgroups.CgroupError):
                group.set_frozen(False)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for group in self.groups:
            with contextlib.suppress(OSError):
                group.directory.rmdir()


def lines(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    """The next JSON line of a worker (its 'ready' or its result)."""
    if proc.stdout is None:
        return {"error": "no stdout"}
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
        if time.monotonic() > deadline:
            break
    return {"error": f"exit {proc.wait()}"}


def tenant_state(scene: Scene, name: str) -> dict[str, Any]:
    value = scene.observer_state().get("tenants", {}).get(name, {})
    return value if isinstance(value, dict) else {}


def observed(scene: Scene, name: str) -> tuple[Any, int, Any]:
    """What the observer says of a tenant now: NVML's percent for it on its GPU, the part of
    the time it is held frozen, and the reading the hold follows."""
    state = tenant_state(scene, name)
    used = (state.get("driver_used_pct") or [None])[0]
    return used, int(state.get("held_pct", 0) or 0), state.get("held_reading_pct")


def section_contexts(t: Tenants, raw: dict[str, Any]) -> list[list[Any]]:
    nv = nvml.Nvml()
    gpu = nv.inventory()[0]
    bare = contexts.measure(nv, [gpu]).get(gpu.uuid)
    proc = t.worker(None, None, "hold", "1", "20")
    ready = lines(proc)
    used = next((p.used_bytes for p in nv.processes([gpu])[gpu.uuid] if p.host_pid == proc.pid), 0)
    proc.kill()
    over = used - int(ready.get("reserved", 0))
    raw["contexts"] = {"bare": bare, "torch_used": used, "torch_reserved": ready.get("reserved")}
    mib = 1 << 20
    return [
        ["a bare context (the observer's probe)", f"{(bare or 0) / mib:.0f} MiB"],
        [
            "a PyTorch process (1 GiB tensor, cuBLAS), beyond its allocations",
            f"{over / mib:.0f} MiB",
        ],
        [
            "allowed per process by default (context + process_allowance_mib)",
            f"{((bare or 0) + 256 * mib) / mib:.0f} MiB",
        ],
    ]


def section_memory(t: Tenants, raw: dict[str, Any]) -> list[list[Any]]:
    scene = t.scene
    honest_slot, honest_group = t.add("honest", 10_000, 6 * GiB)
    honest = []
    for gib in ("1.9", "1.9", "0"):  # the last one fills the quota to its last 2 MiB
        honest.append(t.worker(honest_group, honest_slot, "hold", gib, "15"))
        lines(honest[-1])
    charged = files.read_usage(honest_slot / abi.USAGE_FILE).device[0].mem_used_bytes
    forger_slot, forger_group = t.add("forger", 10_000, 4 * GiB)
    del forger_slot
    forger = t.worker(forger_group, None, "hold", "8", "60")  # no shim
    ready = lines(forger)
    t_ready = time.monotonic()
    while forger.poll() is None and time.monotonic() < t_ready + 20:
        time.sleep(0.05)
    stopped = time.monotonic() - t_ready if forger.poll() is not None else None
    time.sleep(3)
    alive = sum(p.poll() is None for p in honest)
    state = tenant_state(scene, "honest")
    driver = (state.get("driver_memory_bytes") or [0])[0] or 0
    raw["memory"] = {
        "forger": ready,
        "stopped_after_s": stopped,
        "honest_alive": alive,
        "honest_charged": charged,
        "honest_state": state,
    }
    return [
        [
            "honest: 3 processes filling a 6 GiB quota, still running",
            f"{alive} of 3",
            f"charged {charged / GiB:.3f} GiB; the driver counts {driver / GiB:.2f} GiB",
        ],
        [
            "forger: 8 GiB without the shim under 4 GiB, stopped after",
            f"{stopped:.1f} s" if stopped is not None else "not stopped in 20 s",
        ],
    ]


COMPUTE_S = 24  # long enough for a hold to settle, and 5 s more


def share(counts: list[int], solo: float) -> float:
    return 100 * statistics.mean(counts[-5:]) / solo if counts and solo else float("nan")


def solo_rate(t: Tenants) -> float:
    """Matmuls a second of one process alone on the GPU, without the shim."""
    solo_proc = t.worker(None, None, "matmul", "4")
    lines(solo_proc)
    return float(statistics.median(lines(solo_proc).get("per_second", [0])[1:] or [0]))


def section_compute(
    t: Tenants, raw: dict[str, Any], pct: int = 10, forged: bool = False
) -> list[list[Any]]:
    scene = t.scene
    solo = solo_rate(t)
    strict = abi.IsolationMode.STRICT
    case = f"{pct}{'-forged' if forged else ''}"
    bypassing, honest_name = f"greedy{case}", f"honest{case}"
    greedy_slot, greedy_group = t.add(bypassing, pct * 100, mode=strict)
    honest_slot, honest_group = t.add(honest_name, pct * 100, mode=strict)
    greedy = t.worker(greedy_group, None, "matmul", str(COMPUTE_S))
    honest = t.worker(honest_group, honest_slot, "matmul", str(COMPUTE_S))
    if forged:  # its process claimed as the shim's, as the tenant can write
        record = abi.UsageProc(state=abi.ProcState.LIVE, pid=greedy.pid, heartbeat_ns=1)
        fd = os.open(greedy_slot / abi.USAGE_FILE, os.O_WRONLY)
        os.pwrite(fd, bytes(record), abi.Usage.proc.offset)
        os.close(fd)
    lines(greedy), lines(honest)
    held = {bypassing: 0, honest_name: 0}
    seen: dict[str, list[tuple[Any, ...]]] = {bypassing: [], honest_name: []}  # every 0.2 s
    trace = Trace({greedy.pid: "greedy", honest.pid: "honest"}, greedy_group)
    end = time.monotonic() + COMPUTE_S
    while time.monotonic() < end and greedy.poll() is None:
        for name, most in held.items():
            seen[name].append(observed(scene, name))
            held[name] = max(most, seen[name][-1][1])
        for _ in range(4):
            trace.read()
            time.sleep(0.05)
    g, h = lines(greedy).get("per_second", []), lines(honest).get("per_second", [])
    for name in held:  # gone, as after poststop: no hold of theirs is left on the GPU
        scene.drop_slot(name)
    raw[f"compute{case}"] = {
        "solo_per_s": solo,
        "greedy": g,
        "honest": h,
        "held": held,
        "seen": seen,
        "trace": trace.taken,
    }
    return [
        [
            f"without the shim{', a record of it forged' if forged else ''}, strict {pct} %: "
            "share of its solo throughput, last 5 s",
            f"{share(g, solo):.1f} %",
            frozen_note(held[bypassing], seen[bypassing]),
        ],
        [
            f"with the shim, strict {pct} %, beside it",
            f"{share(h, solo):.1f} %",
            frozen_note(held[honest_name], seen[honest_name]),
        ],
    ]


class Trace:
    """What the driver says of two tenants every 50 ms, beside whether the held one was
    frozen: each process's samples (its newest after the last read: every one of them), the
    whole GPU's, as (seconds since the start, NVML's clock in us, percent)."""

    def __init__(self, roles: dict[int, str], held: cgroups.Cgroup) -> None:
        self.nv = nvml.Nvml()
        self.gpu = self.nv.inventory()[0]
        self.roles, self.held, self.start = roles, held, time.monotonic()
        _, self.since_us = self.nv.utilisation(self.gpu)
        self.busy_since_us = self.since_us
        self.seen_us: dict[int, int] = {}
        self.taken: dict[str, list[tuple[float, int, int]]] = {"frozen": [], "busy": []}

    def read(self) -> None:
        now = round(time.monotonic() - self.start, 3)
        self.taken["frozen"].append((now, 0, int(bool(self.held.frozen()))))
        # each process's samples end at times of its own: asked from a sample before
        samples, newest = self.nv.utilisation(self.gpu, max(self.since_us - nvml.SAMPLE_US, 1))
        for pid, sample in samples.items():
            if sample.at_us > self.seen_us.get(pid, 0):
                self.seen_us[pid] = sample.at_us
                role = self.roles.get(pid, str(pid))
                self.taken.setdefault(role, []).append((now, sample.at_us, sample.pct))
        self.since_us = max(self.since_us, newest)
        for b in self.nv.busy(self.gpu, self.busy_since_us):
            self.taken["busy"].append((now, b.at_us, b.pct))
            self.busy_since_us = b.at_us


def frozen_note(most: int, seen: list[tuple[Any, ...]]) -> str:
    """How much of the time a tenant was frozen at most, and when (seen: every 0.2 s)."""
    held_s = [i * 0.2 for i, (_, held_pct, *_) in enumerate(seen) if held_pct]
    if not held_s:
        return "never frozen"
    return f"frozen up to {most} % of the time, {held_s[0]:.0f}-{held_s[-1]:.0f} s after the start"


def section_long(t: Tenants, raw: dict[str, Any]) -> list[list[Any]]:
    scene = t.scene
    solo = lines(t.worker(None, None, "spin", "200")).get("kernel_ms", 0.0)
    slot = scene.slot(
        "long", [Device(sm_centi=1000)], mode=abi.IsolationMode.STRICT, observed=False
    )
    start = time.monotonic()
    kernels = [lines(t.worker(None, slot, "spin", "200")).get("kernel_ms", 0.0) for _ in range(10)]
    wall = time.monotonic() - start
    got = 100 * sum(kernels) / 1000 / wall
    raw["long"] = {"solo_ms": solo, "kernels_ms": kernels, "wall_s": wall}
    return [
        [
            "ten processes, one 200 ms kernel each, strict 10 %: share of the GPU",
            f"{got:.1f} %",
            f"kernel {solo:.0f} ms alone, {wall:.1f} s for all ten",
        ]
    ]


def mps_attribution(
    t: Tenants, nv: nvml.Nvml, gpu: nvml.GpuInfo, clients: dict[str, Path]
) -> list[Any]:
    """Whom NVML's per-process utilisation names while two MPS clients are busy at once
    (what a host-side check of MPS tenants' time would have to go by)."""
    procs = [
        t.worker(None, None, "mps-env", "100", "6", CUDA_MPS_PIPE_DIRECTORY=str(slot / abi.MPS_DIR))
        for slot in clients.values()
    ]
    for proc in procs:
        lines(proc)
    named: dict[int, int] = {}
    _, since = nv.utilisation(gpu)  # from now: the driver keeps samples of exited processes
    end = time.monotonic() + 4
    while time.monotonic() < end:
        time.sleep(0.25)
        samples, since = nv.utilisation(gpu, since)
        for pid, sample in samples.items():
            named[pid] = max(named.get(pid, 0), sample.pct)
    for proc in procs:
        lines(proc)
    mine = {proc.pid for proc in procs}
    others = {pid: pct for pid, pct in named.items() if pid not in mine}
    return [
        "NVML per-process utilisation, two MPS clients busy at once: clients named",
        f"{len(mine & set(named))} of 2",
        f"{len(others)} other process(es) named, at up to {max(others.values(), default=0)} %",
    ]


def mps_processes(t: Tenants, gpu: str, solo: float, raw: dict[str, Any]) -> list[Any]:
    """A strict 30 % MPS tenant's three busy processes, each with the shim, together: MPS
    caps each client's SMs, not a tenant's; once the observer has counted them, their
    shims hold them to the share together."""
    threads = t.scene.mps_threads(
        "mps-three", gpu, 3000, abi.IsolationMode.STRICT, abi.Priority.BEST_EFFORT
    )
    device = Device(uuid=gpu, sm_centi=3000, backend=abi.Backend.MPS, mps_threads_centi=threads)
    slot, group = t.add("mps-three", 3000, device=device, mode=abi.IsolationMode.STRICT)
    t.scene.link_mps(slot, gpu)
    procs = [t.worker(group, slot, "matmul", "10") for _ in range(3)]
    for proc in procs:
        lines(proc)
    counts = [lines(proc).get("per_second", []) for proc in procs]
    raw["mps-three"] = counts
    seconds = min(map(len, counts))
    together = [sum(c[i] for c in counts) for i in range(1, seconds - 1)]  # all three ran
    return [
        "MPS strict 30 %, three processes with the shim: share of its solo throughput "
        "together, last 5 s",
        f"{share(together, solo):.1f} %",
        "MPS caps each process's SMs; the shims hold the three together",
    ]


def mps_outside(t: Tenants, gpu: str, busy: Path, solo: float, raw: dict[str, Any]) -> list[Any]:
    """A strict 10 % MPS tenant whose process skips both the shim and MPS (a context of its
    own, time-sliced beside the MPS server), beside an MPS client as busy (of the tenant
    whose slot is busy): what the host leaves it."""
    device = Device(uuid=gpu, sm_centi=1000, backend=abi.Backend.MPS)
    _, group = t.add("mps-outside", 1000, device=device, mode=abi.IsolationMode.STRICT)
    client = t.worker(None, busy, "matmul", str(COMPUTE_S))
    outside = t.worker(group, None, "matmul", str(COMPUTE_S))
    lines(client), lines(outside)
    seen = []
    end = time.monotonic() + COMPUTE_S
    while time.monotonic() < end and outside.poll() is None:
        seen.append(observed(t.scene, "mps-outside"))
        time.sleep(0.2)
    counts, beside = lines(outside).get("per_second", []), lines(client).get("per_second", [])
    raw["mps-outside"] = {"outside": counts, "client": beside, "seen": seen}
    return [
        "MPS strict 10 %, a process outside both the shim and MPS: share of its solo "
        "throughput, last 5 s",
        f"{share(counts, solo):.1f} %",
        f"{frozen_note(max((h for _, h, _ in seen), default=0), seen)}; "
        f"the MPS client beside it {share(beside, solo):.1f} %",
    ]


def section_mps(raw: dict[str, Any], solo: float) -> list[list[Any]]:
    control = "/usr/local/nvidia/bin/nvidia-cuda-mps-control"
    nv = nvml.Nvml()
    gpu_info = nv.inventory()[0]
    gpu = gpu_info.uuid
    rows = []
    slots: dict[str, Path] = {}
    with Scene(Path(tempfile.mkdtemp(prefix="fa-", dir="/tmp")), name="mps") as scene:
        scene.start_observer(mps_gpus=[gpu], mps_control=control)
        scene.wait_mps(gpu)
        t = Tenants(scene)
        try:
            solo = solo or solo_rate(t)  # before any MPS client: it runs outside MPS
            for shim in (True, False):
                name = f"mps-{'shim' if shim else 'bare'}"
                threads = scene.mps_threads(
                    name, gpu, 3000, abi.IsolationMode.STRICT, abi.Priority.BEST_EFFORT
                )
                slot = scene.slot(
                    name,
                    [
                        Device(
                            uuid=gpu,
                            sm_centi=3000,
                            backend=abi.Backend.MPS,
                            mps_threads_centi=threads,
                        )
                    ],
                    mode=abi.IsolationMode.STRICT,
                )
                scene.link_mps(slot, gpu)
                slots[name] = slot
                env = {} if shim else {"CUDA_MPS_PIPE_DIRECTORY": str(slot / abi.MPS_DIR)}
                proc = t.worker(None, slot if shim else None, "mps-env", "100", "8", **env)
                lines(proc)
                counts = lines(proc).get("per_second", [])
                raw[name] = counts
                how = "with" if shim else "without"
                rows.append(
                    [
                        f"MPS strict 30 %, setenv 100 %, {how} the shim",
                        f"{share(counts, solo):.1f} %",
                        "" if shim else "held by the daemon's setting: the GPU's largest grant",
                    ]
                )
            try:  # failing, they leave the rows above
                rows.append(mps_processes(t, gpu, solo, raw))
                rows.append(mps_attribution(t, nv, gpu_info, slots))
                rows.append(mps_outside(t, gpu, slots["mps-shim"], solo, raw))
            except Exception as exc:
                rows.append(["mps", f"failed: {type(exc).__name__}: {exc}"[:200], ""])
        finally:
            t.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(SECTIONS))
    args = parser.parse_args(argv)
    wanted = [s for s in args.only.split(",") if s]
    out = out_dir()
    report = Report(
        "authority",
        "The host as the authority: what a tenant that attacks gets",
        "Tenants that forge, bypass the shim or launch long kernels, against "
        "fcsp-observer's host-side checks (NVML, cgroups) and the shim.",
        out,
    )
    raw: dict[str, Any] = {}
    rows: list[list[Any]] = []
    with Scene(
        Path(tempfile.mkdtemp(prefix="fa-", dir="/tmp")), out / "authority-raw", name="auth"
    ) as scene:
        scene.start_observer()
        t = Tenants(scene)
        try:
            for name in wanted:
                if name == "mps":
                    continue
                started = time.monotonic()
                try:
                    section = {
                        "contexts": section_contexts,
                        "memory": section_memory,
                        "compute": section_compute,
                        "compute40": lambda t, raw: section_compute(t, raw, 40),
                        "forged40": lambda t, raw: section_compute(t, raw, 40, forged=True),
                        "long": section_long,
                    }[name]
                    rows += [[*r, ""][:3] for r in section(t, raw)]
                except Exception as exc:  # one section failing leaves the others' figures
                    rows.append([name, f"failed: {type(exc).__name__}: {exc}"[:200], ""])
                print(f"[{name}] {time.monotonic() - started:.0f} s", flush=True)
        finally:
            t.close()
    if "mps" in wanted:
        try:
            rows += section_mps(raw, float(raw.get("compute10", {}).get("solo_per_s") or 0))
        except Exception as exc:
            rows.append(["mps", f"failed: {type(exc).__name__}: {exc}"[:200], ""])
    report.table(["what", "measured", "note"], rows)
    save_json(out / "authority-raw.json", {"meta": report.meta, "raw": raw})
    print(report.write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
