"""The GPUs a bench runs on: what they are, and what they do while it runs.

inventory()   every GPU's name, UUID, PCI bus, memory and power limit, the driver and the
              CUDA version it supports: NVML, else nvidia-smi
Sampler       SM clock, power (and on request utilisation) of some GPUs at a fixed period
              through NVML, else by polling nvidia-smi; on request, each process's SM
              utilisation as NVML reports it
nvidia_smi()  the one call of nvidia-smi, for hosts without pynvml

NVML's device counters are cheap to read; its process lists and per-process utilisation
hold the driver's lock (~2.6 ms a call on an H200), so they are asked for only where a
bench needs them, at most once a second.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20
GpuKey = int | str  # an NVML index, or a UUID ("GPU-...")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "[N/A]"
        return math.nan


def nvidia_smi(fields: str, index: GpuKey | None = None) -> list[list[str]]:
    """Rows of `nvidia-smi --query-gpu=FIELDS` (no header, no units); [] without it."""
    argv = ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"]
    if index is not None:
        argv += ["-i", str(index)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


def _optional(read: Callable[[], float]) -> float:
    """A reading some GPUs do not report (power on many boards): nan without it."""
    try:
        return float(read())
    except Exception:  # NVML_ERROR_NOT_SUPPORTED and the like
        return math.nan


def _nvml() -> Any:
    import pynvml  # noqa: PLC0415  # optional: a host without it falls back to nvidia-smi

    pynvml.nvmlInit()
    return pynvml


def _handle(nvml: Any, key: GpuKey) -> Any:
    if isinstance(key, str):
        return nvml.nvmlDeviceGetHandleByUUID(key)
    return nvml.nvmlDeviceGetHandleByIndex(key)


def _inventory_nvml() -> dict[str, Any]:
    nvml = _nvml()
    gpus = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        gpu: dict[str, Any] = {"index": i, "name": "unknown GPU", "memory_total": 0}
        gpu["uuid"] = _text(nvml.nvmlDeviceGetUUID(h))
        with contextlib.suppress(Exception):
            gpu["name"] = _text(nvml.nvmlDeviceGetName(h))
        with contextlib.suppress(Exception):
            gpu["memory_total"] = int(nvml.nvmlDeviceGetMemoryInfo(h).total)
        with contextlib.suppress(Exception):
            gpu["pci"] = _text(nvml.nvmlDeviceGetPciInfo(h).busId)
        with contextlib.suppress(Exception):
            gpu["power_limit_w"] = nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000
        gpus.append(gpu)
    info: dict[str, Any] = {"source": "pynvml", "gpus": gpus}
    with contextlib.suppress(Exception):
        info["driver"] = _text(nvml.nvmlSystemGetDriverVersion())
    with contextlib.suppress(Exception):
        v = int(nvml.nvmlSystemGetCudaDriverVersion())
        info["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}"
    return info


def inventory() -> dict[str, Any]:
    """{"source", "gpus": [{index, name, uuid, pci, memory_total, power_limit_w}], "driver",
    "cuda_driver"}; with no GPU found, "gpus" is empty and "error" says why."""
    errors = []
    try:
        return _inventory_nvml()
    except Exception as exc:  # no pynvml, no driver: try nvidia-smi
        errors.append(f"pynvml: {exc}")
    rows = nvidia_smi("index,name,uuid,pci.bus_id,memory.total,driver_version,power.limit")
    if not rows:
        errors.append("nvidia-smi: no answer")
        return {"source": "none", "gpus": [], "error": "; ".join(errors)}
    rows = [r for r in rows if len(r) == 7]
    gpus = []
    for idx, name, uuid, pci, mem, _driver, power in rows:
        gpu: dict[str, Any] = {"index": int(idx), "name": name, "uuid": uuid, "pci": pci}
        gpu["memory_total"] = int(float(mem)) * MIB
        with contextlib.suppress(ValueError):
            gpu["power_limit_w"] = float(power)
        gpus.append(gpu)
    return {"source": "nvidia-smi", "gpus": gpus, "driver": rows[0][5] if rows else ""}


def process_memory(pid: int, index: int = 0) -> int | None:
    """A process's device memory by NVML's process list (what the driver counts, not what
    the shim shows it); None without NVML or if it is not listed."""
    try:
        nvml = _nvml()
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid:
                return int(proc.usedGpuMemory or 0)
    except Exception:  # no NVML: not measured
        return None
    return None


def memory_info(index: int = 0) -> dict[str, int] | None:
    try:
        nvml = _nvml()
        info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
    except Exception:  # no NVML: not measured
        return None
    return {"total": int(info.total), "free": int(info.free), "used": int(info.used)}


@dataclass(frozen=True)
class Sample:
    t: float  # time.monotonic()
    gpu: GpuKey  # as the sampler was given it
    mhz: float
    watts: float
    util: float = math.nan  # device utilisation %, if asked for
    tag: object = None  # what the bench's tag() said during the whole reading


@dataclass
class Sampler:
    """Readings of `gpus` every `period` seconds in a thread, from start() to stop().

    tag: a callable read before and after each reading; the sample keeps its value, and a
    reading during which it changed is dropped (the clock probe files each reading under
    busy or idle).  processes: also nvmlDeviceGetProcessUtilization each period, as
    (pid, wall-clock seconds, smUtil %) in process_samples."""

    gpus: Sequence[GpuKey]
    period: float = 0.1
    tag: Callable[[], object] | None = None
    util: bool = False
    processes: bool = False
    samples: list[Sample] = field(default_factory=list)
    process_samples: list[tuple[int, float, int]] = field(default_factory=list)
    process_calls_s: list[float] = field(default_factory=list)
    process_error: str = ""
    source: str = "none"
    error: str = ""
    _drained: int = 0
    _halt: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        if not self.gpus:
            return self
        try:
            nvml = _nvml()
            handles = {key: _handle(nvml, key) for key in self.gpus}
            target: Callable[[], None] = lambda: self._nvml_loop(nvml, handles)  # noqa: E731
            self.source = "pynvml"
        except Exception as exc:  # poll nvidia-smi instead
            self.error = f"pynvml: {exc}"
            if self.processes:
                self.process_error = "per-process utilisation needs pynvml"
            target = self._smi_loop
            self.source = "nvidia-smi"
        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=max(2.0, 2 * self.period))

    def _keep(self, before: object, sample: Sample) -> None:
        if self.tag is None or self.tag() == before:
            self.samples.append(sample)

    def _nvml_loop(self, nvml: Any, handles: dict[GpuKey, Any]) -> None:
        last = {key: 0 for key in handles}  # process samples after this NVML timestamp
        while not self._halt.is_set():
            for key, h in handles.items():
                before = self.tag() if self.tag else None
                with contextlib.suppress(Exception):  # no clock: no sample
                    mhz = float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))
                    watts = _optional(lambda h=h: nvml.nvmlDeviceGetPowerUsage(h) / 1000)
                    util = math.nan
                    if self.util:
                        util = _optional(lambda h=h: nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                    self._keep(before, Sample(time.monotonic(), key, mhz, watts, util, before))
                if self.processes:
                    last[key] = self._process_utilisation(nvml, h, last[key])
            self._halt.wait(self.period)

    def _process_utilisation(self, nvml: Any, handle: Any, last: int) -> int:
        t0 = time.monotonic()
        try:
            got = nvml.nvmlDeviceGetProcessUtilization(handle, last)
        except nvml.NVMLError as exc:  # NOT_FOUND: no samples since `last`
            self.process_error = str(exc)
            return last
        finally:
            self.process_calls_s.append(time.monotonic() - t0)
        for s in got:
            self.process_samples.append((int(s.pid), s.timeStamp / 1e6, int(s.smUtil)))
            last = max(last, int(s.timeStamp))
        return last

    def _smi_loop(self) -> None:
        while not self._halt.is_set():
            before = self.tag() if self.tag else None
            for idx, uuid, mhz, watts, util in (
                r
                for r in nvidia_smi("index,uuid,clocks.sm,power.draw,utilization.gpu")
                if len(r) == 5
            ):
                key = next((k for k in self.gpus if str(k) in (idx, uuid)), None)
                with contextlib.suppress(ValueError):
                    if key is not None:
                        sample = Sample(time.monotonic(), key, float(mhz), _num(watts), _num(util))
                        self._keep(before, sample)
            self._halt.wait(self.period)

    def window(self, gpu: GpuKey, t0: float = -math.inf, t1: float = math.inf) -> list[Sample]:
        return [s for s in list(self.samples) if s.gpu == gpu and t0 <= s.t <= t1]

    def mean(
        self, gpu: GpuKey, t0: float = -math.inf, t1: float = math.inf
    ) -> dict[str, float] | None:
        """Mean SM MHz, W (and utilisation) of a GPU between t0 and t1 (monotonic)."""
        got = self.window(gpu, t0, t1)
        if not got:
            return None
        out = {
            "mhz": statistics.fmean(s.mhz for s in got),
            "watts": statistics.fmean(s.watts for s in got),
            "samples": len(got),
        }
        if self.util:
            out["util"] = statistics.fmean(s.util for s in got)
        return out

    def mean_mhz(self, gpu: GpuKey) -> float:
        """Mean SM clock over everything sampled so far; nan with no samples."""
        got = self.mean(gpu)
        return got["mhz"] if got else math.nan

    def drain(self) -> list[Sample]:
        """The samples taken since the last drain."""
        end = len(self.samples)
        got, self._drained = self.samples[self._drained : end], end
        return got
