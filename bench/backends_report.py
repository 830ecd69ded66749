"""One table from observer_bench.py's two runs: time-sliced and MPS side by side.

python3 bench/backends_report.py DIR    (reads DIR/observer-{timeslice,mps}-raw.json)
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any


def _load(directory: Path, backend: str) -> dict[str, Any]:
    try:
        doc = json.loads((directory / f"observer-{backend}-raw.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _num(value: Any, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "n/a"
    return f"{value:.{digits}g}"


def _get(doc: dict[str, Any], *path: str) -> Any:
    for key in path:
        doc = doc.get(key, {}) if isinstance(doc, dict) else {}
    return doc if doc != {} else None


def _reclaim(doc: dict[str, Any]) -> str:
    values = _get(doc, "reclaim", "slot_share_s") or []
    got = [v for v in values if isinstance(v, (int, float))]
    if not got:
        return "n/a"
    tail = "" if len(got) == len(values) else f", {len(values) - len(got)} not reached"
    return f"median {statistics.median(got) * 1000:.0f} ms, max {max(got) * 1000:.0f} ms{tail}"


def _latency(doc: dict[str, Any], section: str, busy_key: str) -> str:
    busy = _get(doc, section, busy_key) or {}
    alone = _get(doc, section, "alone_us") or {}
    return (
        f"p99 {_num(busy.get('p99'))} us vs {_num(alone.get('p99'))} alone "
        f"(x{_num(_get(doc, section, 'p99_ratio'))})"
    )


def rows(ts: dict[str, Any], mp: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    out = []
    for share in ("10", "25", "50", "75"):
        cells = [f"{_num(_get(d, 'accuracy', share, 'achieved_pct'))} %" for d in (ts, mp)]
        out.append((f"share accuracy, one tenant strict at {share} %", *cells, f"{share} +- 3"))
    for mode in ("strict", "balanced"):
        cells = [
            f"{_num(_get(d, 'pair', mode, 'P30'))} / {_num(_get(d, 'pair', mode, 'P70'))} %"
            for d in (ts, mp)
        ]
        out.append((f"pair 30 / 70, both busy ({mode})", *cells, "30 / 70 +- 3"))
    out += [
        (
            "fairness, Jain's index (4 busy at 25 %)",
            *(_num(_get(d, "fairness", "jain"), 4) for d in (ts, mp)),
            ">= 0.995",
        ),
        (
            "GPU total with 4 busy (of alone)",
            *(_num(_get(d, "fairness", "sum_vs_alone")) for d in (ts, mp)),
            "~1",
        ),
        (
            "work conservation, 1 of 4 busy (of alone)",
            *(_num(_get(d, "work_conservation", "throughput_vs_alone")) for d in (ts, mp)),
            ">= 0.95",
        ),
        ("reclaim to 90 % of the share", _reclaim(ts), _reclaim(mp), "<= 100 ms"),
    ]
    for mode in ("balanced", "adaptive"):
        out.append(
            (
                f"noisy-neighbour drop vs guaranteed share ({mode})",
                *(_num(_get(d, "noisy_neighbour", mode, "drop_vs_guaranteed")) for d in (ts, mp)),
                "<= 0.03",
            )
        )
    out.append(
        (
            "latency, saturating neighbour (both balanced)",
            *(_latency(d, "latency_isolation", "with_saturating_neighbour_us") for d in (ts, mp)),
            "<= 2x",
        )
    )
    out.append(
        (
            "latency, priority-latency tenant (30 %) next to a saturating 70 % neighbour",
            *(_latency(d, "latency_capped", "with_neighbour_70_us") for d in (ts, mp)),
            "<= 2x",
        )
    )
    return out


def main(argv: list[str]) -> int:
    directory = Path(argv[0]) if argv else Path(".")
    ts, mp = _load(directory, "timeslice"), _load(directory, "mps")
    lines = [
        f"# Compute backends side by side on {ts.get('gpu') or mp.get('gpu') or 'the GPU'}",
        "",
        "`OUT=$OUT bash bench/gpu_backends.sh`: bench/observer_bench.py with `--backend "
        "timeslice`, then `--backend mps`; raw numbers in observer-*-raw.json.",
        "",
        "| measure | timeslice | mps | target |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(ts, mp)]
    fault = mp.get("fault", {})
    if fault:
        lines += [
            "",
            "## A fatal fault next to a busy MPS tenant",
            "",
            "```",
            json.dumps(fault, indent=2),
            "```",
        ]
    for backend, doc in (("timeslice", ts), ("mps", mp)):
        failed = {k: v["error"] for k, v in doc.items() if isinstance(v, dict) and "error" in v}
        if failed:
            lines += ["", f"Sections that failed ({backend}): {failed}"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
