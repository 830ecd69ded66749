"""One table from observer_bench.py's two runs: time-sliced and MPS side by side.

    python3 bench/backends_report.py DIR

Reads DIR/mps-raw/<backend>/observer-raw/results.json (gpu_backends.sh runs the observer
bench with OUT=DIR/mps-raw/<backend>), writes DIR/mps.md and copies each run's workday plot
to DIR/mps-<backend>-workday.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from lib.report import Report

BACKENDS = ("timeslice", "mps")


def run_dir(directory: Path, backend: str) -> Path:
    return directory / "mps-raw" / backend


def _load(directory: Path, backend: str) -> dict[str, Any]:
    try:
        path = run_dir(directory, backend) / "observer-raw" / "results.json"
        doc = json.loads(path.read_text())
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


def document(directory: Path, ts: dict[str, Any], mp: dict[str, Any]) -> Report:
    meta = (ts or mp).get("meta") or {}
    doc = Report(
        "mps",
        f"Compute backends side by side on {ts.get('gpu') or mp.get('gpu') or 'the GPU'}",
        "bench/observer_bench.py with the GPU time-sliced (`--backend timeslice`), then over "
        "FCSP's MPS daemon (`--backend mps`), on the same machine: share accuracy, a 30/70 "
        "pair, fairness, work conservation, reclaim, the noisy neighbour, latency next to a "
        "saturating tenant, and a fatal fault in one MPS tenant.",
        directory,
        meta=meta,
        extra=["raw numbers: mps-raw/<backend>/observer-raw/results.json"],
    )
    doc.table(["measure", "timeslice", "mps", "target"], rows(ts, mp))
    for backend in BACKENDS:
        plot = run_dir(directory, backend) / "observer-workday.png"
        if plot.exists():
            shutil.copy(plot, doc.plot_path(f"{backend}-workday"))
            doc.add("", f"![workday, {backend}]({doc.plot_path(f'{backend}-workday').name})")
    fault = mp.get("fault", {})
    if fault:
        doc.section(
            "A fatal fault next to a busy MPS tenant",
            "```\n" + json.dumps(fault, indent=2) + "\n```",
        )
    for backend, raw in (("timeslice", ts), ("mps", mp)):
        failed = {k: v["error"] for k, v in raw.items() if isinstance(v, dict) and "error" in v}
        if failed:
            doc.add("", f"Sections that failed ({backend}): {failed}")
    return doc


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dir", type=Path, help="gpu_backends.sh's $OUT")
    directory = parser.parse_args(argv).dir
    ts, mp = (_load(directory, backend) for backend in BACKENDS)
    print(f"wrote {document(directory, ts, mp).write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
