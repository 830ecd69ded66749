"""What the parts of bench/gpu_multigpu.py share: its settings, its wall-clock budget, and
the two-GPU scene (slots whose entries name the pair's GPUs by UUID, children of
gpu_multigpu.py under the shim, both GPUs visible in host order)."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.gpu import Sampler
from lib.report import save_json, table
from lib.scene import Child, ChildFailed, Device, Scene, python

from fcsp_hook.slot import abi

SCRIPT = Path(__file__).resolve().parent / "gpu_multigpu.py"  # the children's entry point
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
FALLBACK_N = 6144  # about 0.6 ms on an H200 (bench/results/compute.md)
SHARES = {"X": (30, 70), "Y": (70, 30)}
THROTTLED = {"Z": (10, 100)}
NCCL_BYTES = 256 * MIB
NCCL_QUOTA = 16 * GIB
NCCL_SM = 50
NCCL_BATCH = 50  # in-place sums per timed batch: 3 * 2**49 is still exact in bf16
CLOCK_PERIOD_S = 0.1


def stamp() -> str:
    return time.strftime("%H:%M:%S")


def log(msg: str) -> None:
    print(f"[{stamp()}] {msg}", flush=True)


class Skipped(Exception):
    """Not run: the wall-clock budget is spent (or a precondition is missing)."""


def reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, Skipped | ChildFailed) else f"{type(exc).__name__}: {text}"


def shim_map(path: Path) -> list[str]:
    """The shim's own account of its devices (BUD_LOG_LEVEL=info)."""
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace")
        return re.findall(r"device \d+: slot entry -?\d+, quota \d+ bytes \(\w+\)", text)
    return []


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


@dataclass
class Bench:
    """The run: its scene, its budget, its results (saved, and rendered by `render`, after
    every step, so that a run cut short still leaves its report)."""

    scene: Scene
    out: Path
    build_ok: bool
    deadline: float  # time.monotonic()
    results: dict[str, Any]
    render: Callable[[dict[str, Any]], str]
    pair: list[dict[str, Any]] = field(default_factory=list)
    clocks: Sampler | None = None

    @property
    def raw(self) -> Path:
        return self.scene.raw

    @property
    def work(self) -> Path:
        return self.scene.work

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
        if not self.build_ok or not self.scene.shim.is_file():
            raise Skipped("libvgpu.so did not build (see multigpu-raw/build.log)")
        if Path("/run/fcsp/limits").exists():
            raise Skipped("/run/fcsp/limits exists: the shim would use it, not FCSP_SLOT_DIR")

    @property
    def visible(self) -> str:
        """Both GPUs, in host (NVML) order: CUDA ordinal i is pair[i]."""
        return ",".join(g["uuid"] for g in self.pair)

    def slot(self, name: str, entries: list[tuple[int, int, int]], observed: bool = False) -> Path:
        """A fresh strict slot; entries are (position in the pair, sm %, quota bytes), host
        order.  observed: where the observer looks (only the shares section's: slots of the
        other sections left there would add up past 100 % and have every tenant scaled
        down)."""
        devices = [
            Device(
                host_index=int(self.pair[pos]["index"]),
                uuid=str(self.pair[pos]["uuid"]),
                mem_bytes=mem,
                sm_centi=sm * 100,
            )
            for pos, sm, mem in entries
        ]
        return self.scene.slot(name, devices, mode=abi.IsolationMode.STRICT, observed=observed)

    def spawn(
        self,
        tag: str,
        args: list[str],
        slot: Path | None,
        visible: str,
        extra: dict[str, str] | None = None,
    ) -> Child:
        """A child of gpu_multigpu.py; under the shim it logs its ordinal -> entry -> quota
        map; NVLink multicast stays off on the bench machine."""
        env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "NCCL_NVLS_ENABLE": "0"}
        if slot is not None:
            env["BUD_LOG_LEVEL"] = "info"
        env.update(extra or {})
        return self.scene.spawn(
            tag, python(SCRIPT, *args), env=self.scene.env(slot, visible=visible, extra=env)
        )

    def collect(self, children: list[Child], timeout: float) -> list[dict[str, Any] | Exception]:
        return self.scene.collect(children, min(timeout, self.remaining()))

    def save(self) -> None:
        save_json(self.raw / "results.json", self.results)
        (self.out / "multigpu.md").write_text(self.render(self.results))


# ---- what the sections' renderers share (pure: results -> markdown) -------------------


def gib(v: float | None) -> str:
    return "-" if v is None else f"{v / GIB:.2f} GiB"


def mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:.0f} MiB"


def short(uuid: str) -> str:
    return uuid[:12] if uuid else "?"


def section_failure(sec: dict[str, Any]) -> list[str]:
    """A section that broke outside its own rows (or never ran) still gets a row."""
    if not sec.get("error"):
        return []
    return ["", *table(["section", "result"], [["whole section", f"failed: {sec['error']}"]])]
