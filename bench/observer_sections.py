"""The four-tenant experiments of bench/observer_bench.py, against the solo baseline.

Four tenants at 25 % (balanced) in one scene, one after the other: work conservation
(only A busy), reclaim (B idle, then busy again), fairness (all four busy), the workday
(tenants leave and come back) and resize (fcspctl set on a running tenant).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from typing import Any

from lib import REPO
from lib.scene import pythonpath
from observer_report import plot_workday
from observer_scene import WHOLE, Tenants, Worker, log, percentiles, scene, settle, window


def solo_baseline(args: argparse.Namespace, results: dict[str, Any]) -> float:
    """One worker, no shim: the throughput every ratio is against.  With clock
    normalisation an observer watches, as it would on a host: it learns the GPU's
    full-load clock from this saturating run and keeps it (state_dir) for the next."""
    with scene(args, "solo") as s:
        w = s.add_tenant("solo", WHOLE, shim=False)
        s.wait_ready()
        if args.clock_normalise != "off":
            s.start_observer()
        w.send("run")
        settle(args.warmup)
        rate = window(w, args.measure)
        w.send("latency")
        settle(args.measure)
        lat = w.latency_stats()
    results["solo"] = {"matmul_per_s": rate, "latency_us": percentiles(lat)}
    log(f"solo: {rate:.1f} matmul/s, latency {percentiles(lat)}")
    return rate


def four_tenants(args: argparse.Namespace, results: dict[str, Any], solo: float) -> None:
    """Work conservation, reclaim, fairness, the workday and resize on 4 tenants at 25 %."""
    with scene(args, "four") as s:
        ws = {n: s.add_tenant(n, 2500) for n in ("A", "B", "C", "D")}
        s.wait_ready()
        s.start_observer()
        cpu0, t_cpu0 = s.observer_cpu(), time.monotonic()
        work_conservation(args, s, ws, solo, results)
        reclaim(args, s, ws, solo, results)
        fairness(args, ws, solo, results)
        workday(args, s, ws, results)
        resize(args, s, ws, solo, results)
        wall = time.monotonic() - t_cpu0
        results["observer_cpu_pct_of_core"] = (s.observer_cpu() - cpu0) / wall * 100


def work_conservation(
    args: argparse.Namespace,
    s: Tenants,
    ws: dict[str, Worker],
    solo: float,
    results: dict[str, Any],
) -> None:
    """Only A busy: its throughput against running alone without FCSP."""
    ws["A"].send("run")
    settle(args.warmup)
    rate = window(ws["A"], args.measure)
    results["work_conservation"] = {
        "share_pct": s.share_of("A") / 100,
        "throughput_vs_alone": rate / solo,
        "target": ">= 0.95 (MIG: 0.25)",
    }
    log(f"work conservation: {rate / solo:.3f} of alone, share {s.share_of('A') / 100}%")


def reclaim(
    args: argparse.Namespace,
    s: Tenants,
    ws: dict[str, Worker],
    solo: float,
    results: dict[str, Any],
) -> None:
    """B goes idle, then busy again, repeatedly, while A stays busy."""
    by_slot: list[float | None] = []
    by_throughput: list[float | None] = []
    for _ in range(args.repeats):
        ws["B"].send("idle")
        s.wait_share("B", lambda v: v <= 200, time.monotonic(), timeout=10)
        settle(0.5)
        start = time.monotonic()
        ws["B"].send("run")
        by_slot.append(s.wait_share("B", lambda v: v >= 0.9 * 2500, start))
        settle(1.0)
        by_throughput.append(first_time_at(ws["B"], start, 0.9 * 0.25 * solo))
    results["reclaim"] = {
        "slot_share_s": by_slot,
        "throughput_s": by_throughput,
        "target": "<= 0.100 s",
    }
    log(f"reclaim (slot): {by_slot}; (throughput): {by_throughput}")


def fairness(
    args: argparse.Namespace, ws: dict[str, Worker], solo: float, results: dict[str, Any]
) -> None:
    """All four busy: Jain's index over throughput normalised to a quarter of alone."""
    names = sorted(ws)
    for n in names:
        ws[n].send("run")
    settle(args.warmup)
    t0 = time.monotonic()
    settle(args.measure * 2)
    t1 = time.monotonic()
    rates = {n: ws[n].rate(t0, t1) for n in names}
    norm = [rates[n] / (0.25 * solo) for n in names]
    jain = sum(norm) ** 2 / (len(norm) * sum(x * x for x in norm)) if any(norm) else math.nan
    results["fairness"] = {
        "normalised_throughput": dict(zip(names, norm, strict=True)),
        "jain": jain,
        "sum_vs_alone": sum(rates.values()) / solo,
        "target": ">= 0.995",
    }
    log(f"fairness: Jain {jain:.4f}, normalised {norm}")


def workday(
    args: argparse.Namespace, s: Tenants, ws: dict[str, Worker], results: dict[str, Any]
) -> None:
    """The article's day: all four busy, B at lunch, D in a meeting, only A, all back."""
    names = sorted(ws)
    origin = time.monotonic()
    phases = [
        ("all four", set(names)),
        ("B at lunch", {"A", "C", "D"}),
        ("D in a meeting", {"A", "C"}),
        ("only A", {"A"}),
        ("all back", set(names)),
    ]
    marks = []
    for label, busy in phases:
        at = time.monotonic()
        for n in names:
            ws[n].send("run" if n in busy else "idle")
        marks.append((label, at - origin))
        settle(args.phase)
    results["workday"] = {
        "phases": marks,
        "phase_s": args.phase,
        "shares": phase_shares(s, origin, marks, args.phase),
        # Returning tenants: time from "all back" until each holds >= 90 % of 25 %.
        "all_back_reclaim_s": {
            n: s.wait_share(n, lambda v: v >= 2250, origin + marks[-1][1], timeout=0.1)
            for n in names
        },
    }
    plot_workday(args, s, ws, origin=origin, marks=marks)
    log(f"workday: {results['workday']['shares']}")


def resize(
    args: argparse.Namespace,
    s: Tenants,
    ws: dict[str, Worker],
    solo: float,
    results: dict[str, Any],
) -> None:
    """A and B busy at 25 %; `fcspctl set A --sm 60 --mode strict`: time to the new share."""
    for n, w in ws.items():
        w.send("run" if n in {"A", "B"} else "idle")
    settle(args.warmup)
    cmd = [sys.executable, "-m", "fcsp_hook.ctl.main", "--config", str(s.scene.config_path)]
    invoked = time.monotonic()
    subprocess.run(
        [*cmd, "set", "A", "--sm", "60", "--mode", "strict"],
        check=True,
        env={**os.environ, "PYTHONPATH": pythonpath()},
        capture_output=True,
        cwd=REPO,  # python -m looks in the working directory first
    )
    written = time.monotonic()
    to_share = s.wait_share("A", lambda v: v == 6000, written)
    settle(1.0)
    results["resize"] = {
        "fcspctl_set_command_s": written - invoked,
        "to_new_share_after_write_s": to_share,
        "throughput_reaches_90pct_s": first_time_at(ws["A"], written, 0.9 * 0.6 * solo),
    }
    log(f"resize: {results['resize']}")


def first_time_at(w: Worker, start: float, target_rate: float, span: float = 0.05) -> float | None:
    """Seconds after start at which the throughput over `span` first reaches target_rate."""
    for t, _ in w.samples:
        if t < start + span:
            continue
        if w.rate(t - span, t) >= target_rate:
            return t - start
    return None


def phase_shares(
    s: Tenants, origin: float, marks: list[tuple[str, float]], phase: float
) -> dict[str, dict[str, float]]:
    """Each tenant's share at the end of each phase, in percent."""
    out = {}
    for label, offset in marks:
        end = origin + offset + phase - 0.05
        row = next((r for t, r in reversed(s.shares) if t <= end), {})
        out[label] = {k: v / 100 for k, v in row.items()}
    return out
