"""Section 3 of bench/gpu_multigpu.py: NCCL all-reduce across both GPUs under limits.

torch.distributed (NCCL, file:// store), one rank per GPU, both in one slot (16 GiB and
sm 50 per GPU): a 256 MiB bf16 all-reduce, checked exactly, timed (bus bandwidth), and
the slot's memory charge per GPU against torch's own reservation (NCCL's cuMemCreate
buffers must be charged too); the same without the shim."""

from __future__ import annotations

import contextlib
import itertools
import re
import statistics
from pathlib import Path
from typing import Any

from lib.report import table
from lib.scene import ChildFailed, usage_snapshot
from multigpu_bench import (
    MIB,
    NCCL_BATCH,
    NCCL_BYTES,
    NCCL_QUOTA,
    NCCL_SM,
    SECONDS,
    Bench,
    gib,
    log,
    mib,
    reason,
    section_failure,
    shim_map,
)


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
        run["usage_after"] = usage_snapshot(slot)
        run["shim_log"] = [shim_map(c.err) for c in children]
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
            b.scene.kill_all()
            log(f"nccl: {name}: failed: {run['error']}")
        b.save()


# ---- report (pure: results -> markdown) ------------------------------------------------


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
