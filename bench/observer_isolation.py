"""The experiments of bench/observer_bench.py about isolation and accuracy: a noisy
neighbour and latency next to it, one strict tenant's accuracy, a 30/70 pair, a
latency-priority tenant next to a saturating one, and (MPS only) a fatal fault."""

from __future__ import annotations

import argparse
import math
import subprocess
import time
from typing import Any

from lib import BENCH
from lib.gpu import Sampler
from lib.scene import Device
from observer_scene import (
    WHOLE,
    Tenants,
    Worker,
    log,
    percentiles,
    scene,
    settle,
    wait_until,
    window,
)

from fcsp_hook.slot import abi, files


def clock_sampler(args: argparse.Namespace) -> Sampler:
    """The GPU's SM clock at 20 Hz from now on; nothing without a GPU UUID."""
    return Sampler([args.gpu_uuid] if args.gpu_uuid else [], period=0.05).start()


def stop_mhz(clocks: Sampler, args: argparse.Namespace) -> float:
    """The mean SM clock since the sampler started; nan without readings."""
    clocks.stop()
    return clocks.mean_mhz(args.gpu_uuid)


def noisy_neighbour(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Victim V at 50 % busy; neighbour N at 50 % light, then saturating; both modes.

    Two drops are reported.  Against V's throughput with a light neighbour, the drop also
    counts the idle capacity V borrowed while N was light (work conservation giving it
    back).  Against V's guaranteed share (V alone, strict at 50 %), it is what the
    neighbour takes from what V was promised: the noisy-neighbour impact proper.
    """
    with scene(args, "noisy") as s:
        v, n = s.add_tenant("V", 5000), s.add_tenant("N", 5000)
        s.wait_ready()
        s.start_observer()
        out: dict[str, Any] = {}
        s.set_limits("V", isolation_mode=abi.IsolationMode.STRICT)
        n.send("idle")
        v.send("run")
        settle(args.warmup)
        guaranteed = window(v, args.measure)
        out["victim_guaranteed_share_alone"] = guaranteed
        for mode in (abi.IsolationMode.BALANCED, abi.IsolationMode.ADAPTIVE):
            for name in ("V", "N"):
                s.set_limits(name, isolation_mode=mode)
            v.send("run")
            n.send("light")
            settle(args.warmup)
            light = window(v, args.measure)
            n.send("run")
            settle(args.warmup)
            heavy = window(v, args.measure)
            out[mode.name.lower()] = {
                "victim_light_neighbour": light,
                "victim_saturating_neighbour": heavy,
                "drop": 1 - heavy / light if light else math.nan,
                "drop_vs_guaranteed": 1 - heavy / guaranteed if guaranteed else math.nan,
            }
            log(
                f"noisy neighbour ({mode.name.lower()}): drop {out[mode.name.lower()]['drop']:.3%}"
                f" vs light, {out[mode.name.lower()]['drop_vs_guaranteed']:.3%} vs guaranteed"
            )
        results["noisy_neighbour"] = {**out, "target": "drop <= 0.03 (article: 4.66% / 11.5%)"}

        # Latency isolation: V becomes latency-sensitive and launches short kernels.
        s.set_limits("V", isolation_mode=abi.IsolationMode.BALANCED, priority=abi.Priority.LATENCY)
        s.set_limits("N", isolation_mode=abi.IsolationMode.BALANCED)
        alone, busy, _ = latency_alone_then_busy(args, v, n)
        results["latency_isolation"] = {
            "alone_us": alone,
            "with_saturating_neighbour_us": busy,
            "p99_ratio": busy["p99"] / alone["p99"] if alone["p99"] else math.nan,
            "reference": "H200 time-slicing 25 -> 1364 us p99 (55x); MPS 4.4x",
        }
        log(f"latency: alone {alone}, with neighbour {busy}")


def accuracy(args: argparse.Namespace, results: dict[str, Any], solo: float) -> None:
    """One tenant alone, strict at sm = 10, 25, 50, 75: its throughput over alone's.

    Under MPS strict is the client's thread percentage (a fresh process per share: MPS
    reads it when the client connects); time-sliced, it is the launch limiter."""
    out: dict[str, Any] = {}
    with scene(args, "accuracy") as s:
        s.start_observer()
        for share in (int(x) for x in args.accuracy_shares.split(",")):
            w = s.add_tenant(f"S{share}", share * 100, mode=abi.IsolationMode.STRICT)
            s.wait_ready()
            w.send("run")
            settle(args.warmup)
            before, clocks = s.usage(w.name), clock_sampler(args)
            achieved = window(w, args.measure) / solo * 100
            spent = s.usage(w.name) - before
            limits = files.read_limits(s.slot_dir(w.name) / abi.LIMITS_FILE)
            w.send("idle")
            # Gone, as after its container's poststop: a slot left behind would keep its
            # strict share, and the observer scales strict shares that add up past 100 %.
            s.drop(w.name)
            # Where the time went, to tell the limiter from the clock: the GPU time the shim
            # admitted and the time its launches waited, per second, and the SM clock.
            out[str(share)] = {
                "achieved_pct": achieved,
                "error_points": achieved - share,
                "shim_busy_per_s": spent.busy_ns / 1e9 / spent.seconds,
                "shim_throttled_per_s": spent.throttled_ns / 1e9 / spent.seconds,
                "sm_clock_mhz": stop_mhz(clocks, args),
                "clock_scale": limits.device[0].clock_scale_centi / 10000,
            }
            log(f"accuracy: sm {share} -> {achieved:.1f} % {out[str(share)]}")
    results["accuracy"] = {**out, "target": "|error| <= 3 points"}


def pair_rates(
    s: Tenants, ws: dict[str, Worker], args: argparse.Namespace, solo: float, *, shimmed: bool
) -> dict[str, Any]:
    """Both busy: each one's throughput over alone's, and where its time went."""
    for w in ws.values():
        w.send("run")
    settle(args.warmup)
    before, clocks = {n: s.usage(n) for n in ws}, clock_sampler(args)
    t0 = time.monotonic()
    settle(args.measure)
    t1 = time.monotonic()
    got: dict[str, Any] = {n: ws[n].rate(t0, t1) / solo * 100 for n in ws}
    got["sum"] = sum(got[n] for n in ws)
    # Is a tenant charged more per matmul than a matmul takes alone?  Kernel times measured
    # while the other tenant's time slice runs would inflate its costs.  Did its launches
    # wait for their share, or for a GPU that had no room left?
    for n, w in ws.items():
        if not shimmed:
            break
        spent, ops = s.usage(n) - before[n], w.rate(t0, t1) * (t1 - t0)
        got[f"{n}_gpu_time_per_s"] = spent.busy_ns / 1e9 / spent.seconds
        got[f"{n}_waited_per_s"] = spent.throttled_ns / 1e9 / spent.seconds
        got[f"{n}_charged_ms_per_matmul"] = spent.busy_ns / 1e6 / max(ops, 1)
    got["solo_ms_per_matmul"] = 1000 / solo
    got["sm_clock_mhz"] = stop_mhz(clocks, args)
    return got


def pair(args: argparse.Namespace, results: dict[str, Any], solo: float) -> None:
    """Two busy tenants (30 / 70 by default), strict then balanced: each over alone's.

    First the same two workers without FCSP: what plain time-slicing leaves of the GPU when
    two contexts share it, the most any split of it can add up to."""
    out: dict[str, Any] = {}
    with scene(args, "pair-plain") as s:
        ws = {n: s.add_tenant(n, WHOLE, shim=False) for n in ("Q1", "Q2")}
        s.wait_ready()
        out["plain"] = pair_rates(s, ws, args, solo, shimmed=False)
        log(f"pair (no FCSP): {out['plain']}")
    for shares in args.pair_shares.split(","):
        small, large = (int(x) for x in shares.split("/"))
        for mode in (abi.IsolationMode[m.upper()] for m in args.pair_modes.split(",")):
            label = f"{small}-{large}-{mode.name.lower()}"
            with scene(args, f"pair-{label}") as s:
                s.start_observer()
                names = (f"P{small}", f"P{large}")
                ws = {n: s.add_tenant(n, int(n[1:]) * 100, mode=mode) for n in names}
                s.wait_ready()
                got = pair_rates(s, ws, args, solo, shimmed=True)
            out[label if shares != "30/70" else mode.name.lower()] = got
            log(f"pair ({label}): {got}")
    results["pair"] = {**out, "target": "30 / 70 within 3 points (HAMi-core 46 / 54)"}


def latency_alone_then_busy(
    args: argparse.Namespace, v: Worker, n: Worker
) -> tuple[dict[str, float], dict[str, float], float]:
    """V's latency percentiles with N idle, then with N saturating; and N's rate meanwhile."""
    n.send("idle")
    v.send("latency")
    settle(args.warmup)
    v.latency_stats()
    settle(args.measure)
    alone = percentiles(v.latency_stats())
    n.send("run")
    settle(args.warmup)
    v.latency_stats()
    t0 = time.monotonic()
    settle(args.measure)
    busy = percentiles(v.latency_stats())
    return alone, busy, n.rate(t0, time.monotonic())


def latency_capped(args: argparse.Namespace, results: dict[str, Any], solo: float) -> None:
    """Latency of V (fcsp.priority=latency, 30 %) next to a saturating best-effort N (70 %,
    balanced) that started after it.  Under MPS V's clients get 30 % of the SMs and N's the
    other 70 % (what the hook grants), so V's kernels never wait for a neighbour's."""
    with scene(args, "latency-capped") as s:
        v = s.add_tenant("V", 3000, priority=abi.Priority.LATENCY)
        n = s.add_tenant("N", 7000)
        s.wait_ready()
        s.start_observer()
        alone, busy, neighbour_rate = latency_alone_then_busy(args, v, n)
        neighbour = neighbour_rate / solo
    results["latency_capped"] = {
        "alone_us": alone,
        "with_neighbour_70_us": busy,
        "p99_ratio": busy["p99"] / alone["p99"] if alone["p99"] else math.nan,
        "neighbour_throughput_vs_alone": neighbour,
    }
    log(f"latency, priority tenant next to a 70 % neighbour: {results['latency_capped']}")


def fault(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """MPS only: a tenant's kernel faults next to a busy tenant.  What the neighbour sees,
    when the observer notices, whether it restarts the daemon and a new client runs."""
    faulty = args.raw / "fault_client"
    build = subprocess.run(
        ["nvcc", "-o", str(faulty), str(BENCH / "mps_fault.cu")],
        capture_output=True,
        text=True,
        check=False,
    )
    if build.returncode != 0:
        results["fault"] = {"error": f"nvcc: {build.stderr[-300:]}"}
        return
    uuid = args.gpu_uuid
    with scene(args, "fault") as s:
        victim = s.add_tenant("V", 5000)
        s.wait_ready()
        victim.send("run")
        settle(args.warmup)
        before = victim.rate(time.monotonic() - 1, time.monotonic())
        first_pid = s.scene.mps_state(uuid).get("pid")
        slot = s.scene.slot("F", [Device(uuid=uuid, backend=abi.Backend.MPS)])
        s.scene.link_mps(slot, uuid)
        env = s.scene.env(slot, visible=uuid)
        t_fault = time.monotonic()
        ran = subprocess.run(
            [str(faulty)], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        detected = wait_until(lambda: int(s.scene.mps_state(uuid).get("faults", 0)) >= 1, 30)
        t_detect = time.monotonic() - t_fault
        restarted = wait_until(
            lambda: (
                s.scene.mps_state(uuid).get("pid") not in (None, 0, first_pid)
                and s.scene.mps_ready(uuid)
            ),
            60,
        )
        t_restart = time.monotonic() - t_fault
        settle(1.0)
        now = time.monotonic()
        victim_alive = victim.proc.poll() is None and victim.rate(now - 1, now) > 0
        after = s.add_tenant("W", 5000)
        new_ok = after.ready.wait(120)
        if new_ok:
            after.send("run")
            settle(args.warmup)
        now = time.monotonic()
        results["fault"] = {
            "faulting_client_output": ran.stdout.strip()[-200:],
            "victim_rate_before": before,
            "victim_still_running_after": victim_alive,
            "victim_returncode": victim.proc.poll(),
            "observer_detected": detected,
            "detected_after_s": t_detect if detected else None,
            "daemon_restarted": restarted,
            "restarted_after_s": t_restart if restarted else None,
            "new_client_runs": bool(new_ok and after.rate(now - 1, now) > 0),
            "state": s.scene.mps_state(uuid),
        }
        log(f"fault: {results['fault']}")
