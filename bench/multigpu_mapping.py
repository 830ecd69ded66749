"""Section 1 of bench/gpu_multigpu.py: slot entries follow GPU UUIDs, whatever the CUDA
ordinals.  One slot names GPU A (4 GiB) and GPU B (8 GiB) by UUID, in host order; one
process under the shim per CUDA_VISIBLE_DEVICES order (B,A; A,B; B alone) reports what
every ordinal shows and allocates 6 GiB on each: it must pass on B and fail on A."""

from __future__ import annotations

from typing import Any

from lib.report import table
from lib.scene import usage_snapshot
from multigpu_bench import (
    GIB,
    PROBE_ALLOC,
    QUOTA_A,
    QUOTA_B,
    Bench,
    gib,
    log,
    reason,
    section_failure,
    shim_map,
    short,
)


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
            run["shim_log"] = shim_map(child.err)
            if isinstance(res, Exception):
                raise res
            run["result"] = res
            run["usage_after"] = usage_snapshot(slot)
            for row in mapping_rows(b.results, run):
                log(f"mapping: {name}: ordinal {row[2]} -> {row[3]}, {row[4]}: {row[-1]}")
        except Exception as exc:
            run["error"] = reason(exc)
            b.scene.kill_all()
            log(f"mapping: {name}: failed: {run['error']}")
        b.save()


# ---- report (pure: results -> markdown) ------------------------------------------------


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
