"""bench/observer_bench.py's document: $OUT/observer.md and the workday plot
($OUT/observer-workday.png; without matplotlib, its data in RAW/workday.csv)."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from lib.report import Report, collect_meta
from observer_scene import Tenants, Worker

TITLE = "fcsp-observer on a real GPU"
MEASURES = (
    "What fcsp-observer makes of several tenants on one GPU: PyTorch matmul loops "
    "(bench/observer_worker.py) under libvgpu.so, one observer over their slots. Work "
    "conservation, reclaim of an idle tenant's share, fairness of four busy tenants, the "
    "impact of a noisy neighbour, latency next to a saturating tenant, share accuracy, a "
    "30/70 pair, shares over a workday, and resizing a running tenant; on the MPS backend, "
    "also a fatal fault in one tenant."
)


def document(args: argparse.Namespace) -> Report:
    """The run's document, its header taken as the run starts."""
    interval = f"{args.interval_ms} ms" if args.interval_ms else "the default"
    extra = [
        f"backend: {args.backend}",
        f"workload: bench/observer_worker.py, fp16 {args.size} x {args.size} matmuls, "
        f"{args.batch} per synchronize; observer interval {interval}; "
        f'clock_normalise = "{args.clock_normalise}"',
        "raw numbers: observer-raw/results.json",
    ]
    if args.fake:
        extra.append("**--fake: workers without CUDA; this checks the plumbing, not FCSP**")
    return Report("observer", TITLE, MEASURES, args.out, meta=collect_meta(), extra=extra)


def plot_workday(
    args: argparse.Namespace,
    s: Tenants,
    ws: dict[str, Worker],
    *,
    origin: float,
    marks: list[tuple[str, float]],
) -> None:
    """Shares and throughput over the workday: a PNG, or its data as CSV."""
    rows = [(t - origin, r) for t, r in s.shares if t >= origin]
    names = sorted(ws)

    def draw(plt: Any) -> Any:
        fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
        for n in names:
            top.plot([t for t, _ in rows], [r.get(n, 0) / 100 for _, r in rows], label=n)
            pts = [
                (t - origin, ws[n].rate(t - 0.1, t)) for t, _ in ws[n].samples if t >= origin + 0.1
            ]
            bottom.plot([p[0] for p in pts], [p[1] for p in pts], label=n)
        for text, offset in marks:
            for ax in (top, bottom):
                ax.axvline(offset, color="grey", linewidth=0.5)
            top.text(offset, 102, text, fontsize=7)
        top.set_ylabel("effective share (%)")
        bottom.set_ylabel("matmul/s (100 ms)")
        bottom.set_xlabel("seconds")
        top.legend()
        fig.tight_layout()
        return fig

    if args.doc.plot(draw, "workday", dpi=110, link=False) is None:
        with (args.raw / "workday.csv").open("w") as f:
            f.write("t_s," + ",".join(f"share_{n}_pct" for n in names) + "\n")
            for t, r in rows:
                f.write(f"{t:.4f}," + ",".join(str(r.get(n, 0) / 100) for n in names) + "\n")


def fmt(value: Any) -> str:
    if value is None:
        return "not reached"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def slowest(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    worst = "not reached" if len(got) < len(values) else f"{max(got) * 1000:.0f} ms"
    return f"median {statistics.median(got) * 1000:.0f} ms, max {worst}"


def main_rows(results: dict[str, Any]) -> list[str]:
    """The rows of the four-tenant and noisy-neighbour experiments."""
    wc = results.get("work_conservation", {})
    rc = results.get("reclaim", {})
    fa = results.get("fairness", {})
    nn = results.get("noisy_neighbour", {})
    li = results.get("latency_isolation", {})
    rs = results.get("resize", {})
    lines = [
        f"| work conservation (1 of 4 busy) | {fmt(wc.get('throughput_vs_alone'))} of alone "
        f"(share {fmt(wc.get('share_pct'))} %) | >= 0.95 (MIG 0.25) |",
        f"| reclaim, slot share >= 90 % | {slowest(rc.get('slot_share_s', []))} | <= 100 ms |",
        f"| reclaim, throughput >= 90 % of share | {slowest(rc.get('throughput_s', []))} | "
        "<= 100 ms |",
        f"| fairness, Jain (4 busy) | {fmt(fa.get('jain'))} | >= 0.995 |",
        f"| GPU total with 4 busy | {fmt(fa.get('sum_vs_alone'))} of alone | ~1 |",
    ]
    for mode in ("balanced", "adaptive"):
        drop = nn.get(mode, {}).get("drop")
        vs_share = nn.get(mode, {}).get("drop_vs_guaranteed")
        lines.append(
            f"| noisy neighbour drop vs its guaranteed share ({mode}) | {fmt(vs_share)} | <= 0.03 |"
        )
        lines.append(
            f"| victim drop vs light neighbour, borrowing included ({mode}) | {fmt(drop)} | |"
        )
    alone, busy = li.get("alone_us", {}), li.get("with_saturating_neighbour_us", {})
    return [
        *lines,
        f"| latency alone p50 / p99 (us) | {fmt(alone.get('p50'))} / {fmt(alone.get('p99'))} | |",
        f"| latency with saturating neighbour p50 / p99 (us) | {fmt(busy.get('p50'))} / "
        f"{fmt(busy.get('p99'))} (p99 x{fmt(li.get('p99_ratio'))}) | time-slicing 55x, MPS 4.4x |",
        f"| resize (fcspctl set --sm 60) to new share | "
        f"{fmt(rs.get('to_new_share_after_write_s'))} s after the write "
        f"(command {fmt(rs.get('fcspctl_set_command_s'))} s) | one tick |",
        f"| observer CPU during the run | {fmt(results.get('observer_cpu_pct_of_core'))} % "
        "of a core | < 2 % |",
    ]


def more_rows(results: dict[str, Any]) -> list[str]:
    """The rows of accuracy, the pair, capped latency, failures and the MPS fault."""
    rows: list[str] = []
    acc = results.get("accuracy", {})
    for share in ("10", "25", "50", "75"):
        row = acc.get(share, {})
        rows.append(
            f"| accuracy, one tenant strict at {share} % | {fmt(row.get('achieved_pct'))} % "
            f"(error {fmt(row.get('error_points'))} points; GPU time admitted "
            f"{fmt(row.get('shim_busy_per_s'))}/s, waited {fmt(row.get('shim_throttled_per_s'))}"
            f"/s, SM {fmt(row.get('sm_clock_mhz'))} MHz) | within 3 points |"
        )
    for label, got in results.get("pair", {}).items():
        if isinstance(got, dict):
            names = [n for n in got if n[0] in "PQ" and "_" not in n]
            measured = " / ".join(f"{fmt(got[n])}" for n in names)
            where = "; ".join(
                f"{n}: GPU time admitted {fmt(got[f'{n}_gpu_time_per_s'])} s/s, waited "
                f"{fmt(got[f'{n}_waited_per_s'])} s/s, charged "
                f"{fmt(got[f'{n}_charged_ms_per_matmul'])} ms/matmul"
                for n in names
                if f"{n}_gpu_time_per_s" in got
            )
            split = "two busy, no FCSP" if label == "plain" else " / ".join(n[1:] for n in names)
            rows.append(
                f"| pair {split} ({label}) | {measured} % "
                f"(sum {fmt(got.get('sum'))}; {where + '; ' if where else ''}alone "
                f"{fmt(got.get('solo_ms_per_matmul'))} ms/matmul; SM "
                f"{fmt(got.get('sm_clock_mhz'))} MHz) | each within 3 points |"
            )
    lc = results.get("latency_capped", {})
    if "alone_us" in lc:
        alone_c, busy_c = lc["alone_us"], lc["with_neighbour_70_us"]
        rows.append(
            "| latency (priority latency, 30 %) next to a saturating 70 % neighbour, p50 / p99 "
            f"(us) | "
            f"{fmt(busy_c.get('p50'))} / {fmt(busy_c.get('p99'))} (alone {fmt(alone_c.get('p99'))}"
            f", p99 x{fmt(lc.get('p99_ratio'))}; neighbour at "
            f"{fmt(lc.get('neighbour_throughput_vs_alone'))} of alone) | <= 2x |"
        )
    for name in ("four", "noisy", "accuracy", "pair", "latency_capped", "fault"):
        if "error" in results.get(name, {}):
            rows.append(f"| {name} | failed: {results[name]['error']} | |")
    if "fault" in results and "error" not in results["fault"]:
        f = results["fault"]
        rows.append(
            f"| MPS fault next to a busy tenant | neighbour still running: "
            f"{f['victim_still_running_after']}; observer noticed after "
            f"{fmt(f['detected_after_s'])} s, daemon restarted after "
            f"{fmt(f['restarted_after_s'])} s; new client runs: {f['new_client_runs']} | |"
        )
    return rows


def write_markdown(args: argparse.Namespace, results: dict[str, Any]) -> None:
    doc: Report = args.doc
    doc.add("", "| measure | result | target |", "|---|---|---|")
    doc.add(*main_rows(results), *more_rows(results))
    doc.section("Workday (shares in % at the end of each phase)")
    for label, row in results.get("workday", {}).get("shares", {}).items():
        doc.add(f"- {label}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(row.items())))
    if "workday" in results and doc.plot_path("workday").exists():
        doc.add("", f"![workday]({doc.plot_path('workday').name})")
    doc.add(
        "",
        "Latency isolation is bounded by time-slicing: without MPS the GPU runs one context "
        "at a time, so a neighbour's kernels delay a short kernel by up to a time slice "
        "however the neighbour's launches are throttled; throttling divides throughput.",
    )
    doc.write()
