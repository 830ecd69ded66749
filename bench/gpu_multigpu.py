"""Two-GPU benchmark of libvgpu.so (issue 7, item 3), driven by bench/gpu_multigpu.sh.

    python3 bench/gpu_multigpu.py run --out DIR --raw DIR --work DIR --shim PATH ...
    python3 bench/gpu_multigpu.py report --raw DIR --out DIR    (re-render multigpu.md)
    python3 bench/gpu_multigpu.py probe-mem|calibrate|worker|nccl-rank ...   (internal)

Sections (each on its own: a failure is a row "failed: <reason>", never an abort):
  1. mapping: a slot whose entries name GPU A (4 GiB) and GPU B (8 GiB) by UUID, in host
     order; processes see CUDA_VISIBLE_DEVICES = B,A (reversed), A,B and B alone.  For every
     CUDA ordinal, torch.cuda.mem_get_info must show the quota of the physical GPU behind
     it (told by the UUID torch reports), and a 6 GiB allocation must pass on B, fail on A.
  2. shares: tenants X (sm 30 on GPU0, 70 on GPU1) and Y (70 / 30), one bf16 matmul worker
     (kernels of about 500 us) per tenant and GPU, all four at once; achieved = throughput /
     the solo (slot at 100) throughput on that GPU, raw and normalised by the mean SM clock
     (NVML, sampled at 10 Hz here), under fcsp-observer (BENCH_CLOCK_NORMALISE, default
     full-load, as on a host).  Then tenant Z at sm 10 on GPU0, 100 on GPU1: GPU1 must
     run at its solo speed (a tenant throttled on one GPU is not slowed on another).
  3. nccl: torch.distributed (NCCL, file:// store) across both GPUs, one rank per GPU, both
     in one slot (16 GiB and sm 50 per GPU): a 256 MiB bf16 all-reduce, checked exactly,
     timed (bus bandwidth), and the slot's memory charge per GPU against torch's own
     reservation (NCCL's cuMemCreate buffers must be charged too); the same without shim.

The orchestrator never imports torch; its children do.  Results go to RAW/results.json
(rendered by `report` as well as at the end of `run`), children's outputs to RAW/*.out/err.
"""

# torch is imported in the children only; pynvml and fcsp_hook where used.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is this script's directory on sys.path
import observer_proc
from gpu_compute import kernel_ms, matmul, timed_ops

GIB = 1 << 30
MIB = 1 << 20
SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
BUDGET_S = float(os.environ.get("BENCH_BUDGET", "270"))
# fcsp-observer over the shares section, as on a host ("" runs none: the shim alone)
CLOCK_NORMALISE = os.environ.get("BENCH_CLOCK_NORMALISE", "full-load")
WARMUP_S = 1.0
TOLERANCE_POINTS = 3.0
QUOTA_A = 4 * GIB
QUOTA_B = 8 * GIB
PROBE_ALLOC = 6 * GIB  # between the two quotas: fits on B, not on A
TARGET_KERNEL_MS = 0.5
CANDIDATES = (3072, 4096, 4608, 5120, 5632, 6144, 6656, 7168, 8192)
FALLBACK_N = 6144  # about 0.6 ms on an H200 (bench/results/2026-11-29-compute.md)
SHARES = {"X": (30, 70), "Y": (70, 30)}
THROTTLED = {"Z": (10, 100)}
NCCL_BYTES = 256 * MIB
NCCL_QUOTA = 16 * GIB
NCCL_SM = 50
NCCL_BATCH = 50  # in-place sums per timed batch: 3 * 2**49 is still exact in bf16
CLOCK_PERIOD_S = 0.1
GRACE_S = 10.0  # how long siblings of a failed child may still finish


def stamp() -> str:
    return time.strftime("%H:%M:%S")


def log(msg: str) -> None:
    print(f"[{stamp()}] {msg}", flush=True)


# ---- shared by the orchestrator and the children -------------------------------------


def slot_snapshot(slot: Path) -> dict[str, Any]:
    """Per-device counters and live process records of a slot's usage file."""
    from fcsp_hook import abi
    from fcsp_hook.slot import read_limits, read_usage

    count = min(int(read_limits(slot / abi.LIMITS_FILE).device_count), abi.MAX_DEVICES)
    usage = read_usage(slot / abi.USAGE_FILE)
    devices = [
        {
            "mem_used": int(d.mem_used_bytes),
            "mem_peak": int(d.mem_peak_bytes),
            "mem_rejected": int(d.mem_rejected),
            "launches": int(d.launches),
            "busy_ns": int(d.busy_ns),
            "throttled_ns": int(d.throttled_ns),
        }
        for d in list(usage.device)[:count]
    ]
    procs = [
        {"pid": int(p.pid), "mem_used": [int(v) for v in list(p.mem_used_bytes)[:count]]}
        for p in usage.proc
        if p.state == abi.ProcState.LIVE
    ]
    return {"devices": devices, "procs": procs}


def write_result(path: str, obj: dict[str, Any]) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


# ---- children (run under the shim or plain) ------------------------------------------


def torch_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    with contextlib.suppress(Exception):
        v = torch.cuda.nccl.version()
        info["nccl"] = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    return info


def torch_uuid(ordinal: int) -> str:
    """The physical GPU behind a CUDA ordinal, as "GPU-..." (what NVML calls it)."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(ordinal), "uuid", None)
    raw = getattr(uuid, "bytes", None)
    if raw is not None and len(raw) == 16:
        h = bytes(raw).hex()
        return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
    text = str(uuid or "")
    return text if not text or text.startswith("GPU-") else f"GPU-{text}"


def probe_mem(alloc: int) -> dict[str, Any]:
    """Section 1: what every CUDA ordinal looks like, then one allocation of `alloc` bytes."""
    import torch

    ordinals: list[dict[str, Any]] = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        ordinals.append(
            {
                "ordinal": i,
                "name": str(props.name),
                "uuid": torch_uuid(i),
                "props_total": int(props.total_memory),
                "free": int(free),
                "total": int(total),
            }
        )
    # Allocations only after every view was read: a charge would lower what follows.
    for entry in ordinals:
        i = entry["ordinal"]
        try:
            x = torch.empty(alloc, dtype=torch.uint8, device=f"cuda:{i}")
            torch.cuda.synchronize(i)
            entry["alloc_ok"] = True
            del x
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            entry["alloc_ok"] = False
            entry["alloc_error"] = type(exc).__name__
            entry["alloc_message"] = (str(exc).strip().splitlines() or [""])[0][:300]
        torch.cuda.empty_cache()
    return {
        "torch": torch_info(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "ordinals": ordinals,
    }


def calibrate(device: int) -> dict[str, Any]:
    """The matmul size whose back-to-back kernels take closest (in log) to 500 us."""
    import torch

    torch.cuda.set_device(device)
    times: dict[int, float] = {}
    for n in CANDIDATES:
        op = matmul(n)
        first = kernel_ms(op, 3)
        times[n] = kernel_ms(op, max(5, min(100, int(60 / max(first, 1e-3)))))
        del op
        if times[n] > 3 * TARGET_KERNEL_MS:
            break
    n = min(times, key=lambda k: abs(math.log(times[k] / TARGET_KERNEL_MS)))
    return {
        "n": n,
        "kernel_ms": times[n],
        "times": {str(k): v for k, v in times.items()},
        "uuid": torch_uuid(device),
        "torch": torch_info(),
    }


def worker(device: int, n: int, seconds: float, barrier: str, tag: str) -> dict[str, Any]:
    """Section 2: a matmul loop on `device`; ops timed by events on the GPU's clock."""
    import torch

    torch.cuda.set_device(device)
    op = matmul(n)
    kernel_time_ms = kernel_ms(op, 5)
    every = max(1, round(2.0 / max(kernel_time_ms, 1e-3)))  # an event every ~2 ms of GPU work
    stop = time.monotonic() + WARMUP_S  # the shim calibrates its cost estimate here
    while time.monotonic() < stop:
        op()
    torch.cuda.synchronize()
    Path(barrier, f"ready-{tag}").touch()
    go = Path(barrier, "go")
    deadline = time.monotonic() + 180
    while not go.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("no go signal within 180 s")
        time.sleep(0.002)
    t_start = time.monotonic()
    ops, marks = timed_ops(op, seconds, every)
    t_end = time.monotonic()
    return {
        "device": device,
        "uuid": torch_uuid(device),
        "n": n,
        "ops": ops,
        "kernel_ms": kernel_time_ms,
        "t_start": t_start,
        "t_end": t_end,
        "marks": marks,
        "torch": torch_info(),
    }


def _nccl_init(rank: int, world: int, init: str) -> None:
    import torch
    import torch.distributed as dist

    kwargs: dict[str, Any] = {
        "backend": "nccl",
        "init_method": init,
        "rank": rank,
        "world_size": world,
        "timeout": datetime.timedelta(seconds=120),
    }
    try:
        dist.init_process_group(**kwargs, device_id=torch.device("cuda", rank))
    except TypeError:  # a torch without device_id: the communicator comes lazily
        dist.init_process_group(**kwargs)


def nccl_rank(
    rank: int, world: int, init: str, *, nbytes: int, seconds: float, batch: int
) -> dict[str, Any]:
    """Section 3: one rank; the all-reduce checked, then timed in batches of `batch`."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    t0 = time.monotonic()
    _nccl_init(rank, world, init)
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    first = float(world * (world + 1) // 2)  # each rank holds rank + 1
    x.fill_(rank + 1)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    init_s = time.monotonic() - t0
    first_ok = bool((x == first).all().item())
    expected = first * 2 ** (batch - 1)  # in place: first, then doubled by every sum

    def timed() -> tuple[float, bool]:
        x.fill_(rank + 1)
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(batch):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return dt, bool((x == expected).all().item())

    warm_dt, warm_ok = timed()
    # Every rank must run the same number of batches: rank 0 decides, the others follow.
    count = torch.tensor([max(3, min(400, round(seconds / max(warm_dt, 1e-6))))], device=dev)
    dist.broadcast(count, src=0)
    per_op: list[float] = []
    bad = 0 if warm_ok else 1
    for _ in range(int(count.item())):
        dt, ok = timed()
        per_op.append(dt / batch)
        bad += 0 if ok else 1
    dist.barrier()
    torch.cuda.synchronize()
    slot = os.environ.get("FCSP_SLOT_DIR", "")
    usage = slot_snapshot(Path(slot)) if slot and os.environ.get("LD_PRELOAD") else None
    memory = {
        "max_reserved": int(torch.cuda.max_memory_reserved(dev)),
        "reserved": int(torch.cuda.memory_reserved(dev)),
        "max_allocated": int(torch.cuda.max_memory_allocated(dev)),
    }
    dist.barrier()  # the other rank read the usage file while this one still held its memory
    dist.destroy_process_group()
    return {
        "rank": rank,
        "pid": os.getpid(),
        "uuid": torch_uuid(rank),
        "bytes": nbytes,
        "batch": batch,
        "init_s": init_s,
        "first_ok": first_ok,
        "batches": len(per_op),
        "bad_batches": bad,
        "per_op_s": per_op,
        "memory": memory,
        "usage_running": usage,
        "torch": torch_info(),
    }


# ---- GPUs and clocks (orchestrator, no torch) -----------------------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _discover_nvml() -> dict[str, Any]:
    import pynvml

    pynvml.nvmlInit()
    gpus = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        gpu: dict[str, Any] = {
            "index": i,
            "name": _text(pynvml.nvmlDeviceGetName(h)),
            "uuid": _text(pynvml.nvmlDeviceGetUUID(h)),
            "memory_total": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
        }
        with contextlib.suppress(Exception):
            gpu["pci"] = _text(pynvml.nvmlDeviceGetPciInfo(h).busId)
        with contextlib.suppress(Exception):
            gpu["power_limit_w"] = pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000
        gpus.append(gpu)
    info: dict[str, Any] = {"source": "pynvml", "gpus": gpus}
    with contextlib.suppress(Exception):
        info["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
    with contextlib.suppress(Exception):
        v = int(pynvml.nvmlSystemGetCudaDriverVersion())
        info["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}"
    return info


def _discover_smi() -> dict[str, Any]:
    fields = "index,name,uuid,pci.bus_id,memory.total,driver_version,power.limit"
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    gpus, driver = [], ""
    for line in out.strip().splitlines():
        idx, name, uuid, pci, mem, driver, power = (c.strip() for c in line.split(","))
        gpu: dict[str, Any] = {"index": int(idx), "name": name, "uuid": uuid, "pci": pci}
        gpu["memory_total"] = int(float(mem)) * MIB
        with contextlib.suppress(ValueError):
            gpu["power_limit_w"] = float(power)
        gpus.append(gpu)
    return {"source": "nvidia-smi", "gpus": gpus, "driver": driver}


def discover() -> dict[str, Any]:
    errors = []
    for probe in (_discover_nvml, _discover_smi):
        try:
            return probe()
        except Exception as exc:  # try the next source
            errors.append(f"{probe.__name__}: {exc}")
    return {"source": "none", "gpus": [], "error": "; ".join(errors)}


def choose_pair(gpus: list[dict[str, Any]], wanted: str, visible: str) -> list[dict[str, Any]]:
    """The two GPUs to use: BENCH_GPUS (NVML indices), else those CUDA_VISIBLE_DEVICES names
    (UUIDs or indices), else NVML's first two; in host order."""
    names = [v.strip() for v in (wanted or visible).split(",") if v.strip()]
    chosen = []
    for name in names:
        for gpu in gpus:
            if (name.startswith("GPU-") and gpu["uuid"].startswith(name)) or name == str(
                gpu["index"]
            ):
                if gpu not in chosen:
                    chosen.append(gpu)
                break
    if len(chosen) < 2:
        chosen = gpus[:2]
    return sorted(chosen[:2], key=lambda g: int(g["index"]))  # GPU0 / A: the lower host index


class Clocks:
    """The SM clock (MHz) and power (W) of each GPU, sampled at 10 Hz with timestamps."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices
        self.samples: dict[int, list[tuple[float, float, float]]] = {i: [] for i in indices}
        self.source = "none"
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._smi: subprocess.Popen[str] | None = None

    def start(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices}
            self.source = "pynvml"
            self._thread = threading.Thread(target=self._nvml_loop, args=(handles,), daemon=True)
        except Exception as exc:
            self.error = f"pynvml: {exc}"
            try:
                self._smi = subprocess.Popen(
                    [
                        "nvidia-smi",
                        "--query-gpu=index,clocks.sm,power.draw",
                        "--format=csv,noheader,nounits",
                        "-lms",
                        str(int(CLOCK_PERIOD_S * 1000)),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    bufsize=1,
                )
            except OSError as exc2:
                self.error += f"; nvidia-smi: {exc2}"
                return
            self.source = "nvidia-smi -lms"
            self._thread = threading.Thread(target=self._smi_loop, daemon=True)
        self._thread.start()

    def _add(self, index: int, mhz: float, watts: float) -> None:
        if index in self.samples:
            self.samples[index].append((time.monotonic(), mhz, watts))

    def _nvml_loop(self, handles: dict[int, Any]) -> None:
        import pynvml

        while not self._stop.is_set():
            for i, h in handles.items():
                with contextlib.suppress(Exception):
                    mhz = float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
                    watts = pynvml.nvmlDeviceGetPowerUsage(h) / 1000
                    self._add(i, mhz, watts)
            self._stop.wait(CLOCK_PERIOD_S)

    def _smi_loop(self) -> None:
        assert self._smi is not None and self._smi.stdout is not None  # noqa: S101
        for line in self._smi.stdout:
            if self._stop.is_set():
                break
            with contextlib.suppress(ValueError):
                idx, mhz, watts = (c.strip() for c in line.split(","))
                self._add(int(idx), float(mhz), float(watts))

    def mean(self, index: int, t0: float, t1: float) -> dict[str, float] | None:
        window = [s for s in list(self.samples.get(index, [])) if t0 <= s[0] <= t1]
        if not window:
            return None
        return {
            "mhz": statistics.fmean(s[1] for s in window),
            "watts": statistics.fmean(s[2] for s in window),
            "samples": len(window),
        }

    def stop(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._smi.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=2)


# ---- orchestration --------------------------------------------------------------------


class Skipped(Exception):
    """Not run: the wall-clock budget is spent (or a precondition is missing)."""


class ChildFailed(Exception):
    """A child process failed; the message names it and says why."""


@dataclass
class Child:
    tag: str
    proc: subprocess.Popen[bytes]
    result: Path
    stderr: Path


@dataclass
class Bench:
    out: Path
    raw: Path
    work: Path
    shim: Path
    build_ok: bool
    deadline: float  # time.monotonic()
    results: dict[str, Any]
    pair: list[dict[str, Any]] = field(default_factory=list)
    clocks: Clocks | None = None
    live: list[Child] = field(default_factory=list)
    observer: subprocess.Popen[bytes] | None = None

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    def start_observer(self) -> None:
        """fcsp-observer over the bench's slots with the default clock_normalise (strict
        tenants keep their requests; it learns each GPU's full-load clock from the solo run)."""
        from fcsp_hook.slot import ensure_tenants_dir

        ensure_tenants_dir(self.run_dir)
        self.observer = observer_proc.start(
            self.work / "observer.toml",
            observer_proc.bench_config(self.run_dir, self.work / "state", CLOCK_NORMALISE, ""),
            self.raw / "observer.log",
        )

    def stop_observer(self) -> None:
        observer_proc.stop(self.observer)
        self.observer = None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, seconds: float) -> None:
        left = self.remaining()
        if left < seconds:
            raise Skipped(
                f"skipped: {max(left, 0):.0f} s of the wall-clock budget left, "
                f"needs ~{seconds:.0f} s"
            )

    def shim_ready(self) -> None:
        if not self.build_ok or not self.shim.is_file():
            raise Skipped("libvgpu.so did not build (see multigpu-raw/build.log)")
        if Path("/run/fcsp/limits").exists():
            raise Skipped("/run/fcsp/limits exists: the shim would use it, not FCSP_SLOT_DIR")

    @property
    def visible(self) -> str:
        """Both GPUs, in host (NVML) order: CUDA ordinal i is pair[i]."""
        return ",".join(g["uuid"] for g in self.pair)

    def slot(self, name: str, entries: list[tuple[int, int, int]], observed: bool = False) -> Path:
        """A fresh slot; entries are (position in the pair, sm %, quota bytes), host order.
        observed: where the observer looks (only the shares section's: slots of the other
        sections left there would add up past 100 % and have every tenant scaled down)."""
        from fcsp_hook import abi
        from fcsp_hook.slot import DeviceLimits, SlotSpec, ensure_tenants_dir, slot_path, write_slot

        if observed:
            ensure_tenants_dir(self.run_dir)
            directory = slot_path(self.run_dir, name)
        else:
            directory = self.work / "slots" / name
            directory.parent.mkdir(parents=True, exist_ok=True)
        devices = tuple(
            DeviceLimits(
                host_index=int(self.pair[pos]["index"]),
                uuid=str(self.pair[pos]["uuid"]),
                mem_limit_bytes=mem,
                sm_requested_centi=sm * 100,
            )
            for pos, sm, mem in entries
        )
        spec = SlotSpec(
            container_id=name,
            tenant=name,
            isolation_mode=abi.IsolationMode.STRICT,
            devices=devices,
        )
        write_slot(directory, spec, {})
        return directory

    def env(self, slot: Path | None, visible: str, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BUD_", "FCSP_"))}
        env.pop("LD_PRELOAD", None)
        env["CUDA_VISIBLE_DEVICES"] = visible
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on the bench machine
        env["PYTHONUNBUFFERED"] = "1"
        if slot is not None:
            env["LD_PRELOAD"] = str(self.shim)
            env["FCSP_SLOT_DIR"] = str(slot)
            env["BUD_LOG_LEVEL"] = "info"  # the shim logs its ordinal -> entry -> quota map
        env.update(extra)
        return env

    def spawn(
        self,
        tag: str,
        args: list[str],
        slot: Path | None,
        visible: str,
        extra: dict[str, str] | None = None,
    ) -> Child:
        result = self.raw / f"{tag}.json"
        result.unlink(missing_ok=True)
        out, err = self.raw / f"{tag}.out", self.raw / f"{tag}.err"
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                [sys.executable, __file__, *args, "--result", str(result)],
                env=self.env(slot, visible, extra or {}),
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
            )
        child = Child(tag, proc, result, err)
        self.live.append(child)
        return child

    def collect(self, children: list[Child], timeout: float) -> list[dict[str, Any] | Exception]:
        """Wait for all; once one fails, the others get GRACE_S (a collective would hang)."""
        end = time.monotonic() + max(1.0, min(timeout, self.remaining()))
        while time.monotonic() < end and any(c.proc.poll() is None for c in children):
            if any(c.proc.poll() not in (None, 0) for c in children):
                end = min(end, time.monotonic() + GRACE_S)
            time.sleep(0.05)
        out: list[dict[str, Any] | Exception] = []
        for c in children:
            timed_out = c.proc.poll() is None
            if timed_out:
                c.proc.kill()
                c.proc.wait()
            with contextlib.suppress(ValueError):
                self.live.remove(c)
            out.append(self._result(c, timed_out))
        return out

    def _result(self, c: Child, timed_out: bool) -> dict[str, Any] | Exception:
        if timed_out:
            return ChildFailed(f"{c.tag}: killed after the time limit")
        if c.proc.returncode != 0 or not c.result.is_file():
            return ChildFailed(f"{c.tag}: exit {c.proc.returncode}: {last_error(c.stderr)}")
        try:
            value: dict[str, Any] = json.loads(c.result.read_text())
        except ValueError as exc:
            return ChildFailed(f"{c.tag}: bad result file: {exc}")
        return value

    def kill_all(self) -> None:
        for c in self.live:
            if c.proc.poll() is None:
                c.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=5)
        self.live.clear()

    def save(self) -> None:
        (self.raw / "results.json").write_text(json.dumps(self.results, indent=1))
        (self.out / "multigpu.md").write_text(render(self.results))


def last_error(path: Path) -> str:
    """The line that says why a child failed: its exception, else its last line."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no stderr"
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def shim_map(path: Path) -> list[str]:
    """The shim's own account of its devices (BUD_LOG_LEVEL=info)."""
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace")
        return re.findall(r"device \d+: slot entry -?\d+, quota \d+ bytes \(\w+\)", text)
    return []


def reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, Skipped | ChildFailed) else f"{type(exc).__name__}: {text}"


# ---- section 1: UUID -> ordinal -> quota ------------------------------------------------


def section_mapping(b: Bench) -> None:
    sec: dict[str, Any] = {"runs": []}
    b.results["mapping"] = sec
    a, bb = b.pair
    variants = [("reversed", [bb, a]), ("host order", [a, bb]), ("GPU B only", [bb])]
    quotas = {a["uuid"]: QUOTA_A, bb["uuid"]: QUOTA_B}
    for name, order in variants:
        tag = "map-" + name.replace(" ", "-").lower()
        run: dict[str, Any] = {
            "name": name,
            "visible": ",".join(g["uuid"] for g in order),
            "expect": [
                {"index": g["index"], "uuid": g["uuid"], "quota": quotas[g["uuid"]]} for g in order
            ],
        }
        sec["runs"].append(run)
        try:
            b.shim_ready()
            b.need(35)
            log(f"mapping: {name} (CUDA_VISIBLE_DEVICES = {run['visible']})")
            slot = b.slot(tag, [(0, 100, QUOTA_A), (1, 100, QUOTA_B)])
            child = b.spawn(tag, ["probe-mem", "--alloc", str(PROBE_ALLOC)], slot, run["visible"])
            (res,) = b.collect([child], timeout=60)
            run["shim_log"] = shim_map(child.stderr)
            if isinstance(res, Exception):
                raise res
            run["result"] = res
            run["usage_after"] = slot_snapshot(slot)
            for row in mapping_rows(b.results, run):
                log(f"mapping: {name}: ordinal {row[2]} -> {row[3]}, {row[4]}: {row[-1]}")
        except Exception as exc:
            run["error"] = reason(exc)
            b.kill_all()
            log(f"mapping: {name}: failed: {run['error']}")
        b.save()


# ---- section 2: per-device shares -------------------------------------------------------


def run_group(b: Bench, name: str, tenants: dict[str, tuple[int, int]], n: int) -> dict[str, Any]:
    """One worker per tenant and GPU, all started together behind a file barrier."""
    group: dict[str, Any] = {"name": name, "tenants": tenants, "workers": [], "clock": {}}
    barrier = b.work / f"barrier-{name}"
    barrier.mkdir(parents=True, exist_ok=True)
    slots = {
        t: b.slot(f"shares-{name}-{t}", [(0, s[0], 0), (1, s[1], 0)], observed=True)
        for t, s in tenants.items()
    }
    children, meta = [], []
    for tenant, shares in tenants.items():
        for pos in (0, 1):
            tag = f"shares-{name}-{tenant}-gpu{pos}"
            args = ["worker", "--device", str(pos), "--n", str(n), "--seconds", str(SECONDS)]
            args += ["--barrier", str(barrier), "--tag", tag]
            children.append(b.spawn(tag, args, slots[tenant], b.visible))
            meta.append({"tenant": tenant, "gpu": pos, "sm": shares[pos], "tag": tag})
    ready_by = time.monotonic() + min(60.0, max(b.remaining() - SECONDS - 15, 5.0))
    while len(list(barrier.glob("ready-*"))) < len(children) and time.monotonic() < ready_by:
        if any(c.proc.poll() is not None for c in children):
            break
        time.sleep(0.02)
    group["t_go"] = time.monotonic()
    (barrier / "go").touch()
    results = b.collect(children, timeout=SECONDS + 30)  # all were ready: measure and exit
    for m, r in zip(meta, results, strict=True):
        if isinstance(r, Exception):
            m["error"] = reason(r)
        else:
            m["result"] = r
        group["workers"].append(m)
    group["usage_after"] = {t: slot_snapshot(s) for t, s in slots.items()}
    if b.clocks is not None:
        for pos in (0, 1):
            ends = [
                w["result"]["t_end"] for w in group["workers"] if w["gpu"] == pos and "result" in w
            ]
            t1 = max(ends) if ends else time.monotonic()
            group["clock"][str(pos)] = b.clocks.mean(
                int(b.pair[pos]["index"]), group["t_go"] + 0.2, t1
            )
    return group


def section_shares(b: Bench) -> None:
    sec: dict[str, Any] = {"groups": []}
    b.results["shares"] = sec
    try:
        b.need(30)
        log("shares: calibrating the matmul size (about 500 us per kernel, GPU0, no shim)")
        (res,) = b.collect(
            [b.spawn("shares-calibrate", ["calibrate", "--device", "0"], None, b.visible)], 60
        )
        if isinstance(res, Exception):
            raise res
        sec["calibration"] = res
    except Exception as exc:
        sec["calibration"] = {"error": reason(exc), "n": FALLBACK_N}
        log(f"shares: calibration failed ({sec['calibration']['error']}); n = {FALLBACK_N}")
    n = int(sec["calibration"].get("n") or FALLBACK_N)
    sec["clock_normalise"] = CLOCK_NORMALISE
    if CLOCK_NORMALISE:
        b.start_observer()
    b.save()
    try:
        run_plan(b, sec, n)
    finally:
        b.stop_observer()


def run_plan(b: Bench, sec: dict[str, Any], n: int) -> None:
    from fcsp_hook.slot import remove_slot

    plan = [
        ("solo", {"solo": (100, 100)}),
        ("shared", dict(SHARES)),
        ("throttled", dict(THROTTLED)),
    ]
    for name, tenants in plan:
        try:
            b.shim_ready()
            b.need(SECONDS + WARMUP_S + 25)
            log(f"shares: {name}: {', '.join(f'{t} {s[0]}/{s[1]}' for t, s in tenants.items())}")
            group = run_group(b, name, tenants, n)
            sec["groups"].append(group)
            for w in group["workers"]:
                with contextlib.suppress(Exception):
                    w["summary"] = f"{throughput(w['result']):.1f} ops/s"
                log(f"shares: {name}: {w['tenant']} GPU{w['gpu']} sm {w['sm']}: "
                    f"{w.get('summary') or w.get('error')}")  # fmt: skip
        except Exception as exc:
            sec["groups"].append({"name": name, "tenants": tenants, "error": reason(exc)})
            b.kill_all()
            log(f"shares: {name}: failed: {reason(exc)}")
        for tenant in tenants:  # gone, as after poststop: the observer must not count them
            remove_slot(b.run_dir, f"shares-{name}-{tenant}")
        b.save()


# ---- section 3: NCCL all-reduce under limits ------------------------------------------


def nccl_transports(raw: Path, slug: str) -> dict[str, Any]:
    via: set[str] = set()
    version = ""
    for path in sorted(raw.glob(f"nccl-{slug}.*.log")):
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace")
            via.update(re.findall(r"\bvia (\S+)", text))
            m = re.search(r"NCCL version (\S+)", text)
            version = version or (m.group(1) if m else "")
    return {"via": sorted(via), "version": version}


def run_nccl(b: Bench, run: dict[str, Any]) -> None:
    slug = run["slug"]
    slot = None
    if run["shim"]:
        b.shim_ready()
        slot = b.slot(f"nccl-{slug}", [(0, run["sm"], NCCL_QUOTA), (1, run["sm"], NCCL_QUOTA)])
    store = b.work / f"nccl-store-{slug}"
    store.unlink(missing_ok=True)
    extra = {
        "NCCL_DEBUG": "INFO",
        "NCCL_DEBUG_SUBSYS": "INIT,ENV",
        "NCCL_DEBUG_FILE": str(b.raw / f"nccl-{slug}.%h.%p.log"),
        **run["env"],
    }
    args = ["nccl-rank", "--world", "2", "--init", f"file://{store}", "--bytes", str(NCCL_BYTES)]
    args += ["--seconds", str(SECONDS), "--batch", str(NCCL_BATCH)]
    children = [
        b.spawn(f"nccl-{slug}-rank{r}", [*args, "--rank", str(r)], slot, b.visible, extra)
        for r in (0, 1)
    ]
    results = b.collect(children, timeout=2 * SECONDS + 60)
    run["transport"] = nccl_transports(b.raw, slug)
    if slot is not None:
        run["usage_after"] = slot_snapshot(slot)
        run["shim_log"] = [shim_map(c.stderr) for c in children]
    errors = [reason(r) for r in results if isinstance(r, Exception)]
    run["ranks"] = [r for r in results if not isinstance(r, Exception)]
    if errors:
        raise ChildFailed("; ".join(errors))


def section_nccl(b: Bench) -> None:
    sec: dict[str, Any] = {"runs": []}
    b.results["nccl"] = sec
    plan = [
        ("plain", "plain (no shim)", False, 100, {}, True),
        ("sm50", f"shim, sm {NCCL_SM}", True, NCCL_SM, {}, True),
        ("sm100", "shim, sm 100", True, 100, {}, False),
        ("sm50-nocumem", f"shim, sm {NCCL_SM}, NCCL_CUMEM_ENABLE=0", True, NCCL_SM,
         {"NCCL_CUMEM_ENABLE": "0"}, False),
    ]  # fmt: skip
    for slug, name, shim, sm, env, core in plan:
        run: dict[str, Any] = {"slug": slug, "name": name, "shim": shim, "sm": sm, "env": env}
        run["quota"] = NCCL_QUOTA if shim else 0
        run["optional"] = not core
        sec["runs"].append(run)
        try:
            # Optional runs only where the core ones left time (with a margin for the report).
            b.need(2 * SECONDS + 40 + (0 if core else 10))
            log(f"nccl: {name}: 2 ranks, {NCCL_BYTES // MIB} MiB bf16 all-reduce")
            run_nccl(b, run)
            busbw = nccl_busbw(run)
            log(f"nccl: {name}: busbw {busbw:.1f} GB/s" if busbw else f"nccl: {name}: no result")
        except Exception as exc:
            run["error"] = reason(exc)
            b.kill_all()
            log(f"nccl: {name}: failed: {run['error']}")
        b.save()


# ---- report (pure: results -> markdown) ------------------------------------------------


def gib(v: float | None) -> str:
    return "-" if v is None else f"{v / GIB:.2f} GiB"


def mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:.0f} MiB"


def short(uuid: str) -> str:
    return uuid[:12] if uuid else "?"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def gpu_label(results: dict[str, Any], uuid: str) -> str:
    for pos, g in enumerate(results.get("pair", [])):
        if g.get("uuid") == uuid:
            return f"GPU{pos} ({'AB'[pos]}, host {g.get('index')})"
    return f"unknown {short(uuid)}"


def mapping_rows(results: dict[str, Any], run: dict[str, Any]) -> list[list[Any]]:
    name, vis = run["name"], " ".join(short(u) for u in run["visible"].split(","))
    if "error" in run:
        return [[name, vis, "-", "-", "-", "-", "-", f"failed: {run['error']}"]]
    got = run["result"]["ordinals"]
    rows = []
    if len(got) != len(run["expect"]):
        rows.append([name, vis, "-", "-", "-", "-", "-",
                     f"FAIL: {len(got)} ordinals, expected {len(run['expect'])}"])  # fmt: skip
    for exp, o in zip(run["expect"], got, strict=False):
        fits = exp["quota"] >= PROBE_ALLOC
        problems = []
        if o["uuid"].lower() != exp["uuid"].lower():
            problems.append("not the expected GPU")
        if o["total"] != exp["quota"]:
            problems.append(f"total {gib(o['total'])}, expected {gib(exp['quota'])}")
        if bool(o.get("alloc_ok")) != fits:
            problems.append("allocation " + ("refused" if fits else "not refused"))
        alloc = "ok" if o.get("alloc_ok") else f"refused ({o.get('alloc_error', '?')})"
        rows.append(
            [
                name,
                vis,
                o["ordinal"],
                gpu_label(results, o["uuid"]),
                f"{gib(o['total'])} (free {gib(o['free'])}; props {gib(o.get('props_total'))})",
                gib(exp["quota"]),
                alloc,
                "PASS" if not problems else "FAIL: " + "; ".join(problems),
            ]
        )
    return rows


def mapping_usage(run: dict[str, Any]) -> str:
    usage = run.get("usage_after")
    if not usage:
        return ""
    parts = [
        f"entry {e} ({'AB'[e] if e < 2 else e}): peak {gib(d['mem_peak'])}, "
        f"{d['mem_rejected']} refused, {gib(d['mem_used'])} still charged"
        for e, d in enumerate(usage["devices"])
    ]
    shim = "; ".join(run.get("shim_log", [])) or "no shim log lines"
    return (
        f"- {run['name']}: slot after exit: {'; '.join(parts)}; charged to the right entries: "
        f"{charges_verdict(run)}. Shim: {shim}."
    )


def charges_verdict(run: dict[str, Any]) -> str:
    """The allocation landed on B's entry (1), A's entry (0) refused it if A was visible."""
    devs = run["usage_after"]["devices"]
    if len(devs) < 2:
        return "FAIL: fewer than 2 entries"
    a, b = devs[0], devs[1]
    a_visible = any(e["quota"] == QUOTA_A for e in run["expect"])
    ok = b["mem_peak"] >= PROBE_ALLOC and a["mem_peak"] < PROBE_ALLOC
    ok = ok and (a["mem_rejected"] >= 1 if a_visible else a["mem_rejected"] == 0)
    ok = ok and a["mem_used"] == 0 and b["mem_used"] == 0
    return "PASS" if ok else "FAIL"


def section_failure(sec: dict[str, Any]) -> list[str]:
    """A section that broke outside its own rows (or never ran) still gets a row."""
    if not sec.get("error"):
        return []
    return ["", *table(["section", "result"], [["whole section", f"failed: {sec['error']}"]])]


def render_mapping(results: dict[str, Any]) -> list[str]:
    sec = results.get("mapping")
    lines = [
        "",
        "## 1. Slot entries follow GPU UUIDs, whatever the CUDA ordinals",
        "",
        f"One slot, entries in host order naming the GPUs by UUID: A (GPU0) {gib(QUOTA_A)}, "
        f"B (GPU1) {gib(QUOTA_B)}. Each run is one process under the shim with "
        "CUDA_VISIBLE_DEVICES set to the UUIDs shown; per ordinal: the GPU torch reports "
        "(get_device_properties().uuid), torch.cuda.mem_get_info(i), and one "
        f"{gib(PROBE_ALLOC)} allocation (must pass on B, be refused on A).",
        "",
    ]
    if not sec:
        return [*lines, "not run"]
    rows = [r for run in sec.get("runs", []) for r in mapping_rows(results, run)]
    header = ["run", "CUDA_VISIBLE_DEVICES", "ordinal", "physical GPU", "mem_get_info total",
              "quota of that GPU", f"{PROBE_ALLOC // GIB} GiB alloc", "result"]  # fmt: skip
    lines += table(header, rows)
    notes = [mapping_usage(run) for run in sec.get("runs", [])]
    return [*lines, *section_failure(sec), "", *[n for n in notes if n]]


def throughput(result: dict[str, Any]) -> float:
    """Ops per second of GPU time, from the first mark to the last (start-up excluded)."""
    marks = [(int(i), float(t)) for i, t in result["marks"]]
    if len(marks) < 2 or marks[-1][1] <= marks[0][1]:
        raise ValueError("too few marks")
    return (marks[-1][0] - marks[0][0]) / (marks[-1][1] - marks[0][1])


def share_row(w: dict[str, Any], group: dict[str, Any], solo: dict[int, tuple[float, float]]):
    """One worker's cells after (run, tenant, GPU, target)."""
    tp = throughput(w["result"])
    clock = (group.get("clock") or {}).get(str(w["gpu"])) or {}
    mhz = clock.get("mhz")
    usage = (group.get("usage_after") or {}).get(w["tenant"]) or {}
    devs = usage.get("devices") or []
    throttled = f"{devs[w['gpu']]['throttled_ns'] / 1e9:.2f}" if len(devs) > w["gpu"] else "-"
    if group["name"] == "solo":
        return [f"{tp:.1f}", "1.000", "-", f"{mhz:.0f}" if mhz else "-", "-", "-", throttled,
                "baseline"]  # fmt: skip
    if w["gpu"] not in solo:
        return [f"{tp:.1f}", "-", "-", "-", "-", "-", throttled, "failed: no solo baseline"]
    solo_tp, solo_mhz = solo[w["gpu"]]
    achieved = tp / solo_tp
    err = achieved * 100 - w["sm"]
    norm = achieved * solo_mhz / mhz if mhz and solo_mhz else None
    nerr = norm * 100 - w["sm"] if norm is not None else None
    if abs(err) <= TOLERANCE_POINTS:
        verdict = "PASS"
    elif nerr is not None and abs(nerr) <= TOLERANCE_POINTS:
        verdict = "PASS (clock-normalised)"
    else:
        verdict = "FAIL"
    return [
        f"{tp:.1f}",
        f"{achieved:.3f}",
        f"{err:+.1f}",
        f"{mhz:.0f} / {solo_mhz:.0f}" if mhz and solo_mhz else "-",
        f"{norm:.3f}" if norm is not None else "-",
        f"{nerr:+.1f}" if nerr is not None else "-",
        throttled,
        verdict,
    ]


def solo_baselines(groups: list[dict[str, Any]]) -> dict[int, tuple[float, float]]:
    solo: dict[int, tuple[float, float]] = {}
    for g in groups:
        if g["name"] != "solo":
            continue
        for w in g.get("workers", []):
            with contextlib.suppress(Exception):
                clock = (g.get("clock") or {}).get(str(w["gpu"])) or {}
                solo[w["gpu"]] = (throughput(w["result"]), clock.get("mhz") or 0.0)
    return solo


def item2_verdict(groups: list[dict[str, Any]], solo: dict[int, tuple[float, float]]) -> str:
    for g in groups:
        if g["name"] != "throttled":
            continue
        if "error" in g:
            return f"failed: {g['error']}"
        for w in g["workers"]:
            if w["gpu"] != 1 or "result" not in w or 1 not in solo:
                continue
            try:
                achieved = throughput(w["result"]) / solo[1][0]
            except ValueError as exc:
                return f"failed: {exc}"
            ok = achieved >= 1 - TOLERANCE_POINTS / 100
            return (
                f"{'PASS' if ok else 'FAIL'}: tenant Z (sm 10 on GPU0, 100 on GPU1) runs GPU1 "
                f"at {achieved:.3f} of the solo throughput (target >= "
                f"{1 - TOLERANCE_POINTS / 100:.2f})"
            )
    return "failed: no result for tenant Z on GPU1"


def render_shares(results: dict[str, Any]) -> list[str]:
    sec = results.get("shares")
    lines = [
        "",
        "## 2. Per-device shares: two tenants on two GPUs",
        "",
    ]
    if not sec:
        return [*lines, "not run"]
    cal = sec.get("calibration") or {}
    seconds = results.get("meta", {}).get("seconds", SECONDS)
    if "error" in cal:
        lines.append(f"Calibration failed: {cal['error']}; using n = {cal.get('n')}.")
    else:
        lines.append(
            f"bf16 matmul n = {cal.get('n')}: {cal.get('kernel_ms', 0) * 1000:.0f} us per kernel "
            "back to back (GPU0, no shim)."
        )
    lines += [
        "",
        f"Every worker runs {seconds:g} s after {WARMUP_S:g} s of warm-up, all of a run at "
        "once; throughput is ops per second of GPU time (CUDA events). achieved = throughput / "
        "the solo throughput on that GPU (one worker alone, slot at 100). SM clock: mean NVML "
        "SM clock of that GPU over the run / over the solo run; clock-normalised achieved = "
        "(throughput / clock) / (solo throughput / solo clock): a power-limited H200 clocks "
        "higher when partly idle, which lets a throttled tenant overshoot its share in "
        "throughput while its GPU-time share is right. throttled s: time the tenant's "
        "launches waited on that GPU (usage file).",
        "",
    ]
    groups = sec.get("groups", [])
    solo = solo_baselines(groups)
    rows = []
    for g in groups:
        if "error" in g:
            rows.append([g["name"], "-", "-", "-", *["-"] * 7, f"failed: {g['error']}"])
            continue
        for w in g["workers"]:
            head = [g["name"], w["tenant"], f"GPU{w['gpu']}", w["sm"]]
            try:
                if "error" in w:
                    raise RuntimeError(w["error"])
                rows.append([*head, *share_row(w, g, solo)])
            except Exception as exc:
                rows.append([*head, *["-"] * 7, f"failed: {exc}"])
    header = ["run", "tenant", "GPU", "sm target", "ops/s", "achieved", "error (points)",
              "SM MHz (run / solo)", "clock-normalised", "error (points)", "throttled s",
              "result"]  # fmt: skip
    lines += table(header, rows)
    lines += section_failure(sec)
    lines += [
        "",
        f"- Item 2, not slowed on GPU1 while throttled on GPU0: {item2_verdict(groups, solo)}",
    ]
    clock = results.get("clocks") or {}
    lines.append(
        f"- Clocks sampled by {clock.get('source', '?')} {clock.get('error', '')}".rstrip()
    )
    return lines


def nccl_bandwidth_row(run: dict[str, Any], plain_busbw: float | None) -> list[Any]:
    limits = f"sm {run['sm']}, {gib(run['quota'])}" if run["shim"] else "-"
    ranks = run.get("ranks") or []
    if "error" in run or len(ranks) < 2:
        why = run.get("error", "fewer than 2 ranks reported")
        return [run["name"], limits, *["-"] * 6, f"failed: {why}"]
    per_op = max(statistics.median(r["per_op_s"]) for r in ranks)
    best = max(min(r["per_op_s"]) for r in ranks)
    nbytes, world = ranks[0]["bytes"], len(ranks)
    algbw = nbytes / per_op / 1e9
    busbw = algbw * 2 * (world - 1) / world
    correct = all(r["first_ok"] and r["bad_batches"] == 0 for r in ranks)
    ops = sum(len(r["per_op_s"]) for r in ranks[:1]) * ranks[0]["batch"]
    versus = f"{busbw / plain_busbw:.2f}" if plain_busbw else "-"
    via = ", ".join((run.get("transport") or {}).get("via", [])) or "?"
    return [
        run["name"],
        limits,
        "yes" if correct else "NO",
        ops,
        f"{per_op * 1000:.3f} ({best * 1000:.3f})",
        f"{algbw:.1f}",
        f"{busbw:.1f}",
        versus,
        via,
    ]


def nccl_busbw(run: dict[str, Any]) -> float | None:
    ranks = run.get("ranks") or []
    if "error" in run or len(ranks) < 2:
        return None
    per_op = max(statistics.median(r["per_op_s"]) for r in ranks)
    return ranks[0]["bytes"] / per_op / 1e9 * 2 * (len(ranks) - 1) / len(ranks)


def nccl_memory_rows(run: dict[str, Any]) -> list[list[Any]]:
    if not run["shim"]:
        return []
    if "error" in run and not run.get("ranks"):
        return [[run["name"], "-", *["-"] * 6, f"failed: {run['error']}"]]
    after = (run.get("usage_after") or {}).get("devices") or []
    rows = []
    for r in sorted(run.get("ranks") or [], key=lambda r: r["rank"]):
        g = r["rank"]
        running = (r.get("usage_running") or {}).get("devices") or []
        procs = (r.get("usage_running") or {}).get("procs") or []
        own = next((p["mem_used"] for p in procs if p["pid"] == r["pid"]), None)
        torch_peak = r["memory"]["max_reserved"]
        peak = after[g]["mem_peak"] if len(after) > g else None
        used_after = after[g]["mem_used"] if len(after) > g else None
        problems = []
        if peak is None or peak <= torch_peak:
            problems.append("peak not above torch's reservation")
        if peak is not None and peak > run["quota"]:
            problems.append("peak above the quota")
        if used_after:
            problems.append("charge left after exit")
        rows.append(
            [
                run["name"],
                f"GPU{g} (rank {g})",
                mib(torch_peak),
                mib(running[g]["mem_used"]) if len(running) > g else "-",
                mib(peak),
                mib(peak - torch_peak) if peak is not None else "-",
                " / ".join(mib(v) for v in own) if own else "-",
                mib(used_after),
                "PASS" if not problems else "FAIL: " + "; ".join(problems),
            ]
        )
    return rows


def render_nccl(results: dict[str, Any]) -> list[str]:
    sec = results.get("nccl")
    lines = [
        "",
        "## 3. NCCL all-reduce across both GPUs under limits",
        "",
        f"torch.distributed, backend nccl, 2 ranks (one per GPU, both GPUs visible to each, "
        f"file:// store), NCCL_NVLS_ENABLE=0. Each rank fills a {NCCL_BYTES // MIB} MiB bf16 "
        "tensor with rank + 1: one all-reduce must give exactly 3, then timed batches of "
        f"{NCCL_BATCH} in-place all-reduces (exactly 3 * 2^{NCCL_BATCH - 1} after each batch, "
        "checked) between barriers, host-timed around a synchronize. busbw = algbw * 2(n-1)/n. "
        "Shim runs: both ranks in one slot (per GPU: the quota and share shown). No observer: "
        f"at sm {NCCL_SM} the all-reduce kernels themselves are held to {NCCL_SM} % of each GPU's "
        f"time, so about {NCCL_SM / 100:.2f} of the plain bandwidth is the expected result; "
        "sm 100 shows the interception cost alone.",
        "",
    ]
    if not sec:
        return [*lines, "not run"]
    runs = sec.get("runs", [])
    plain = next((nccl_busbw(r) for r in runs if not r["shim"]), None)
    header = ["run", "limits per GPU", "correct", "all-reduces timed",
              "ms per all-reduce, median (best)", "algbw GB/s", "busbw GB/s", "vs plain",
              "NCCL transport"]  # fmt: skip
    lines += table(header, [nccl_bandwidth_row(r, plain) for r in runs])
    lines += [
        "",
        "Memory charged per GPU (shim runs). torch peak: torch.cuda.max_memory_reserved of the "
        "rank on that GPU; slot used while running: read by that rank after its last "
        "all-reduce, both ranks alive; slot peak: mem_peak after both exited; the rank's own "
        "charge: its process record (GPU0 / GPU1). NCCL's own buffers (cuMemCreate, or "
        "cudaMalloc with NCCL_CUMEM_ENABLE=0) are charged, so the peak must exceed torch's.",
        "",
    ]
    header = ["run", "GPU", "torch peak reserved", "slot used while running", "slot peak",
              "peak - torch", "rank's own charge (GPU0 / GPU1)", "slot used after exit",
              "result"]  # fmt: skip
    lines += table(header, [row for r in runs for row in nccl_memory_rows(r)])
    notes = [
        f"- {r['name']}: shim: {'; '.join(itertools.chain.from_iterable(r['shim_log']))}"
        for r in runs
        if any(r.get("shim_log") or [])
    ]
    return [*lines, *section_failure(sec), "", *notes]


def observer_note(results: dict[str, Any]) -> str:
    normalise = (results.get("shares") or {}).get("clock_normalise", "")
    if normalise:
        return (
            f'shares section under fcsp-observer with clock_normalise = "{normalise}" '
            "(strict tenants: each held to its requested share); mapping and NCCL without"
        )
    return "no observer (each tenant held to its requested share, strict)"


def render_header(results: dict[str, Any]) -> list[str]:
    meta = results.get("meta", {})
    gpus = results.get("gpus", {})
    torch = results.get("torch") or {}
    lines = ["# FCSP on two GPUs: UUID mapping, per-device shares, NCCL under limits", ""]
    for g in gpus.get("gpus", []):
        extra = f", {g['power_limit_w']:.0f} W limit" if g.get("power_limit_w") else ""
        lines.append(
            f"- GPU {g['index']}: {g['name']}, {g['uuid']}, {g.get('pci', '?')}, "
            f"{g['memory_total'] // MIB} MiB{extra}"
        )
    if gpus.get("error"):
        lines.append(f"- GPUs: not found ({gpus['error']})")
    pair = results.get("pair") or []
    if len(pair) == 2:
        lines.append(
            f"- used: GPU0 = A = host {pair[0]['index']}, GPU1 = B = host {pair[1]['index']}"
        )
    lines += [
        f"- driver {gpus.get('driver', '?')}, CUDA driver {gpus.get('cuda_driver', '?')}; "
        f"torch {torch.get('torch', '?')} (CUDA {torch.get('cuda', '?')}), "
        f"NCCL {torch.get('nccl', '?')}",
        f"- commit: {meta.get('commit') or 'not given (set FCSP_COMMIT)'}",
        f"- command: `{meta.get('command', '?')}`",
        f"- run {meta.get('date', '?')}; {meta.get('seconds', SECONDS):g} s per measurement; "
        f"total bench time {meta.get('elapsed_s', 0):.0f} s of a {meta.get('budget_s', 0):.0f} s "
        f"budget; {observer_note(results)}; no MPS",
        "- libvgpu.so build: "
        + ("ok" if meta.get("build_ok") else "FAILED (see multigpu-raw/build.log)"),
    ]
    if meta.get("alloc_conf"):
        lines.append(f"- PYTORCH_CUDA_ALLOC_CONF={meta['alloc_conf']}")
    return [*lines, *[f"- **{w}**" for w in meta.get("warnings", [])]]


def render(results: dict[str, Any]) -> str:
    parts: list[str] = []
    for fn in (render_header, render_mapping, render_shares, render_nccl):
        try:
            parts += fn(results)
        except Exception as exc:  # a report with one broken table is still a report
            parts += ["", f"({fn.__name__} failed: {type(exc).__name__}: {exc})"]
    return "\n".join(parts) + "\n"


# ---- run --------------------------------------------------------------------------------


def first_torch_info(results: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            info = node.get("torch")
            if isinstance(info, dict) and ("info" not in found or "nccl" not in found["info"]):
                found["info"] = info
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit({k: v for k, v in results.items() if k != "torch"})
    return found.get("info", {})


def run(args: argparse.Namespace) -> int:
    started_wall = float(args.started) if args.started else time.time()
    deadline = time.monotonic() + BUDGET_S - (time.time() - started_wall)
    results: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "commit": os.environ.get("FCSP_COMMIT", ""),
            "command": f"OUT={args.out} BENCH_SECONDS={SECONDS:g} bash bench/gpu_multigpu.sh",
            "budget_s": BUDGET_S,
            "seconds": SECONDS,
            "build_ok": args.build_ok == "1",
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "warnings": [],
        }
    }
    b = Bench(
        Path(args.out), Path(args.raw), Path(args.work), Path(args.shim),
        args.build_ok == "1", deadline, results,
    )  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        log("discovering GPUs")
        results["gpus"] = discover()
        gpus = results["gpus"]["gpus"]
        b.pair = choose_pair(
            gpus, os.environ.get("BENCH_GPUS", ""), os.environ.get("CUDA_VISIBLE_DEVICES", "")
        )
        results["pair"] = b.pair
        for g in gpus:
            log(f"GPU {g['index']}: {g['name']} {g['uuid']}")
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        if len(b.pair) < 2:
            results["meta"]["warnings"].append(f"needs 2 GPUs, found {len(gpus)}")
            for s in sections:
                results[s] = {"error": f"needs 2 GPUs, found {len(gpus)}"}
            return 1
        b.clocks = Clocks([int(g["index"]) for g in b.pair])
        b.clocks.start()
        results["clocks"] = {"source": b.clocks.source, "error": b.clocks.error}
        b.save()
        for name, fn in (
            ("mapping", section_mapping),
            ("shares", section_shares),
            ("nccl", section_nccl),
        ):
            if name not in sections:
                continue
            try:
                fn(b)
            except Exception as exc:  # a section that broke outside its own rows
                results.setdefault(name, {})["error"] = reason(exc)
                log(f"{name}: failed: {reason(exc)}")
            results["torch"] = first_torch_info(results)
            b.save()
        return 0
    finally:
        b.kill_all()
        if b.clocks is not None:
            b.clocks.stop()
        results["meta"]["elapsed_s"] = time.time() - started_wall
        results["torch"] = first_torch_info(results)
        b.save()
        log("report saved")


def report(args: argparse.Namespace) -> int:
    results = json.loads((Path(args.raw) / "results.json").read_text())
    (Path(args.out) / "multigpu.md").write_text(render(results))
    return 0


def child(args: argparse.Namespace) -> int:
    if args.cmd == "probe-mem":
        result = probe_mem(args.alloc)
    elif args.cmd == "calibrate":
        result = calibrate(args.device)
    elif args.cmd == "worker":
        result = worker(args.device, args.n, args.seconds, args.barrier, args.tag)
    else:
        result = nccl_rank(
            args.rank,
            args.world,
            args.init,
            nbytes=args.bytes,
            seconds=args.seconds,
            batch=args.batch,
        )
    write_result(args.result, result)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    for name in ("--out", "--raw", "--work", "--shim", "--build-ok", "--started"):
        r.add_argument(name, default="")
    r.add_argument("--sections", default=os.environ.get("BENCH_SECTIONS", "mapping,shares,nccl"))
    rep = sub.add_parser("report")
    rep.add_argument("--raw", required=True)
    rep.add_argument("--out", required=True)
    p = sub.add_parser("probe-mem")
    p.add_argument("--alloc", type=int, default=PROBE_ALLOC)
    c = sub.add_parser("calibrate")
    c.add_argument("--device", type=int, default=0)
    w = sub.add_parser("worker")
    w.add_argument("--device", type=int, required=True)
    w.add_argument("--n", type=int, required=True)
    w.add_argument("--seconds", type=float, required=True)
    w.add_argument("--barrier", required=True)
    w.add_argument("--tag", required=True)
    nr = sub.add_parser("nccl-rank")
    nr.add_argument("--rank", type=int, required=True)
    nr.add_argument("--world", type=int, default=2)
    nr.add_argument("--init", required=True)
    nr.add_argument("--bytes", type=int, default=NCCL_BYTES)
    nr.add_argument("--seconds", type=float, default=SECONDS)
    nr.add_argument("--batch", type=int, default=NCCL_BATCH)
    for sp in (p, c, w, nr):
        sp.add_argument("--result", required=True)
    args = parser.parse_args()
    if args.cmd == "run":
        return run(args)
    if args.cmd == "report":
        return report(args)
    return child(args)


if __name__ == "__main__":
    sys.exit(main())
