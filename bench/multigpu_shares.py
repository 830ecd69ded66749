"""Section 2 of bench/gpu_multigpu.py: per-device shares of two tenants on two GPUs.

Tenants X (sm 30 on GPU0, 70 on GPU1) and Y (70 / 30), one bf16 matmul worker (kernels of
about 500 us) per tenant and GPU, all four at once; achieved = throughput / the solo
(slot at 100) throughput on that GPU, raw and normalised by the mean SM clock (NVML at
10 Hz), under fcsp-observer (BENCH_CLOCK_NORMALISE, default full-load, as on a host).
Then tenant Z at sm 10 on GPU0, 100 on GPU1: GPU1 must run at its solo speed (a tenant
throttled on one GPU is not slowed on another)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from lib.report import table
from lib.scene import Barrier, usage_snapshot
from multigpu_bench import (
    CLOCK_NORMALISE,
    FALLBACK_N,
    SECONDS,
    SHARES,
    THROTTLED,
    TOLERANCE_POINTS,
    WARMUP_S,
    Bench,
    log,
    reason,
    section_failure,
)


def run_group(b: Bench, name: str, tenants: dict[str, tuple[int, int]], n: int) -> dict[str, Any]:
    """One worker per tenant and GPU, all started together behind a file barrier."""
    group: dict[str, Any] = {"name": name, "tenants": tenants, "workers": [], "clock": {}}
    barrier = Barrier(b.work / f"barrier-{name}")
    slots = {
        t: b.slot(f"shares-{name}-{t}", [(0, s[0], 0), (1, s[1], 0)], observed=True)
        for t, s in tenants.items()
    }
    children, meta = [], []
    for tenant, shares in tenants.items():
        for pos in (0, 1):
            tag = f"shares-{name}-{tenant}-gpu{pos}"
            args = ["worker", "--device", str(pos), "--n", str(n), "--seconds", str(SECONDS)]
            args += ["--barrier", str(barrier.directory), "--tag", tag]
            children.append(b.spawn(tag, args, slots[tenant], b.visible))
            meta.append({"tenant": tenant, "gpu": pos, "sm": shares[pos], "tag": tag})
    barrier.wait(children, timeout=min(60.0, max(b.remaining() - SECONDS - 15, 5.0)))
    group["t_go"] = barrier.go()
    results = b.collect(children, timeout=SECONDS + 30)  # all were ready: measure and exit
    for m, r in zip(meta, results, strict=True):
        if isinstance(r, Exception):
            m["error"] = reason(r)
        else:
            m["result"] = r
        group["workers"].append(m)
    group["usage_after"] = {t: usage_snapshot(s) for t, s in slots.items()}
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
        # Strict tenants keep their requests; it learns each GPU's full-load clock from the
        # solo run.
        b.scene.start_observer(clock_normalise=CLOCK_NORMALISE)
    b.save()
    try:
        run_plan(b, sec, n)
    finally:
        b.scene.stop_observer()


def run_plan(b: Bench, sec: dict[str, Any], n: int) -> None:
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
            b.scene.kill_all()
            log(f"shares: {name}: failed: {reason(exc)}")
        for tenant in tenants:  # gone, as after poststop: the observer must not count them
            b.scene.drop_slot(f"shares-{name}-{tenant}")
        b.save()


# ---- report (pure: results -> markdown) ------------------------------------------------


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


def elsewhere_verdict(groups: list[dict[str, Any]], solo: dict[int, tuple[float, float]]) -> str:
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
        f"- Not slowed on GPU1 while throttled on GPU0: {elsewhere_verdict(groups, solo)}",
    ]
    clock = results.get("clocks") or {}
    lines.append(
        f"- Clocks sampled by {clock.get('source', '?')} {clock.get('error', '')}".rstrip()
    )
    return lines
