"""Two-GPU benchmark of libvgpu.so, driven by bench/gpu_multigpu.sh.

    python3 bench/gpu_multigpu.py run --out DIR --raw DIR --work DIR --shim PATH ...
    python3 bench/gpu_multigpu.py report --raw DIR --out DIR    (re-render multigpu.md)
    python3 bench/gpu_multigpu.py probe-mem|calibrate|worker|nccl-rank ...   (internal)

Sections (each on its own: a failure is a row "failed: <reason>", never an abort):
  1. mapping (multigpu_mapping.py): slot entries follow GPU UUIDs, whatever the CUDA
     ordinals: per ordinal, the quota of the physical GPU behind it;
  2. shares (multigpu_shares.py): two tenants with per-device shares on two GPUs, and a
     tenant throttled on one GPU not slowed on the other;
  3. nccl (multigpu_nccl.py): an all-reduce across both GPUs under quotas and shares.

The orchestrator never imports torch; its children (multigpu_children.py) do.  Results go
to RAW/results.json (rendered by `report` as well as after every step of `run`),
children's outputs to RAW/<tag>.out and .err.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import multigpu_children as children
from lib import gpu
from lib.report import Report, collect_meta
from lib.scene import Scene
from multigpu_bench import (
    BUDGET_S,
    CLOCK_PERIOD_S,
    MIB,
    NCCL_BATCH,
    NCCL_BYTES,
    PROBE_ALLOC,
    SECONDS,
    Bench,
    choose_pair,
    log,
    reason,
)
from multigpu_mapping import render_mapping, section_mapping
from multigpu_nccl import render_nccl, section_nccl
from multigpu_shares import render_shares, section_shares

SECTIONS = {"mapping": section_mapping, "shares": section_shares, "nccl": section_nccl}
TITLE = "FCSP on two GPUs: UUID mapping, per-device shares, NCCL under limits"
MEASURES = (
    "Whether libvgpu.so keeps each GPU's limits apart on a host with two GPUs: a slot's "
    "entries name GPUs by UUID, so each CUDA ordinal must show the quota of the physical GPU "
    "behind it whatever CUDA_VISIBLE_DEVICES says; two tenants with different shares on each "
    "GPU must each get their share of that GPU; and an NCCL all-reduce across both GPUs must "
    "run correctly under quotas, with NCCL's own buffers charged."
)


def observer_note(results: dict[str, Any]) -> str:
    normalise = (results.get("shares") or {}).get("clock_normalise", "")
    if normalise:
        return (
            f'shares section under fcsp-observer with clock_normalise = "{normalise}" '
            "(strict tenants: each held to its requested share); mapping and NCCL without"
        )
    return "no observer (each tenant held to its requested share, strict)"


def header_lines(results: dict[str, Any]) -> list[str]:
    """What the standard header does not say: each GPU, the pair used, the software."""
    meta = results.get("meta", {})
    torch = results.get("torch") or {}
    lines = []
    for g in (results.get("gpus") or {}).get("gpus", []):
        extra = f", {g['power_limit_w']:.0f} W limit" if g.get("power_limit_w") else ""
        lines.append(
            f"GPU {g['index']}: {g['name']}, {g['uuid']}, {g.get('pci', '?')}, "
            f"{g['memory_total'] // MIB} MiB{extra}"
        )
    pair = results.get("pair") or []
    if len(pair) == 2:
        lines.append(
            f"used: GPU0 = A = host {pair[0]['index']}, GPU1 = B = host {pair[1]['index']}"
        )
    lines += [
        f"torch {torch.get('torch', '?')} (CUDA {torch.get('cuda', '?')}), "
        f"NCCL {torch.get('nccl', '?')}",
        f"{meta.get('seconds', SECONDS):g} s per measurement; total bench time "
        f"{meta.get('elapsed_s', 0):.0f} s of a {meta.get('budget_s', 0):.0f} s budget; "
        f"{observer_note(results)}; no MPS",
        "libvgpu.so build: "
        + ("ok" if meta.get("build_ok") else "FAILED (see multigpu-raw/build.log)"),
    ]
    if meta.get("alloc_conf"):
        lines.append(f"PYTORCH_CUDA_ALLOC_CONF={meta['alloc_conf']}")
    return [*lines, *[f"**{w}**" for w in meta.get("warnings", [])]]


def render(results: dict[str, Any]) -> str:
    meta = {**results.get("meta", {}), "gpus": results.get("gpus") or {}}
    doc = Report("multigpu", TITLE, MEASURES, Path("."), meta=meta)
    for fn in (header_lines, render_mapping, render_shares, render_nccl):
        try:
            lines = fn(results)
        except Exception as exc:  # a report with one broken table is still a report
            lines = ["", f"({fn.__name__} failed: {type(exc).__name__}: {exc})"]
        if fn is header_lines:
            doc.extra = lines
        else:
            doc.add(*lines)
    return doc.render()


def first_torch_info(results: dict[str, Any]) -> dict[str, Any]:
    """The versions a child reported, preferring one that names NCCL's."""
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
    meta = collect_meta(with_gpu=False)  # the GPUs: results["gpus"]
    results: dict[str, Any] = {
        "meta": {
            **meta,
            "budget_s": BUDGET_S,
            "seconds": SECONDS,
            "build_ok": args.build_ok == "1",
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "warnings": [],
        }
    }
    scene = Scene(Path(args.work), Path(args.raw), shim=Path(args.shim))
    b = Bench(scene, Path(args.out), args.build_ok == "1", deadline, results, render)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        log("discovering GPUs")
        results["gpus"] = gpu.inventory()
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
        b.clocks = gpu.Sampler([int(g["index"]) for g in b.pair], period=CLOCK_PERIOD_S).start()
        results["clocks"] = {"source": b.clocks.source, "error": b.clocks.error}
        b.save()
        for name, fn in SECTIONS.items():
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
        scene.close()
        if b.clocks is not None:
            b.clocks.stop()
        results["meta"]["elapsed_s"] = time.time() - started_wall
        results["torch"] = first_torch_info(results)
        b.save()
        log("report saved")


def report(args: argparse.Namespace) -> int:
    results = json.loads((Path(args.raw) / "results.json").read_text())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "multigpu.md").write_text(render(results))
    return 0


def child(args: argparse.Namespace) -> int:
    if args.cmd == "probe-mem":
        result = children.probe_mem(args.alloc)
    elif args.cmd == "calibrate":
        result = children.calibrate(args.device)
    elif args.cmd == "worker":
        result = children.worker(args.device, args.n, args.seconds, args.barrier, args.tag)
    else:
        result = children.nccl_rank(
            args.rank, args.world, args.init,
            nbytes=args.bytes, seconds=args.seconds, batch=args.batch,
        )  # fmt: skip
    print(json.dumps(result), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the benchmark (gpu_multigpu.sh passes these)")
    for name in ("--out", "--raw", "--work", "--shim", "--build-ok", "--started"):
        r.add_argument(name, default="")
    r.add_argument("--sections", default=os.environ.get("BENCH_SECTIONS", "mapping,shares,nccl"))
    rep = sub.add_parser("report", help="render OUT/multigpu.md from RAW/results.json")
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
    args = parser.parse_args()
    if args.cmd == "run":
        return run(args)
    if args.cmd == "report":
        return report(args)
    return child(args)


if __name__ == "__main__":
    sys.exit(main())
