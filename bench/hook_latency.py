"""What FCSP adds to a container's start: paired runs of the same command with and without.

Each pair runs the two commands back to back, in alternating order, so that the machine's
drift hits both alike; the figure is the median of the per-pair differences, with its
spread.  Uses what `make install` installed (the hooks.d entry, fcsp-runtime, fcsp-hookd
when it runs).  Needs podman and runc, no GPU.

    python3 bench/hook_latency.py --pairs 30

Rows (the hook rows twice: with fcsp-hookd serving the hooks.d entry's client, which the
bench starts when it is not running, and without it, where the client runs the Python hook):
  podman run --rm        with fcsp annotations (prestart + poststop hooks) vs without
  podman run -d          the start alone (prestart hook) vs without; removal untimed
  each stage             the hooks.d entry's program at prestart and at poststop, whole,
                         timed inside real container starts
  fcsp-runtime           `podman run --rm` of a plain container through fcsp-runtime vs
                         runc (its pass-through on every runtime call); of an FCSP one
                         (its create, handed to fcsp-hookd); its launcher alone
                         (`--version`) vs runc's

Writes bench/results/hook-latency.md ($OUT/hook-latency.md where OUT is set).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lib
from lib.report import Report, collect_meta

from tests.containers import build_base_rootfs  # the repo's own helper

HOOKS_ENTRY = Path("/usr/share/containers/oci/hooks.d/fcsp.json")
RUNTIME = Path("/usr/local/bin/fcsp-runtime")
HOOKD = Path("/opt/fcsp/venv/bin/fcsp-hookd")
HOOKD_SOCKET = Path("/run/fcsp/hook.sock")
ANNOTATIONS = [
    "--annotation",
    "fcsp.sm=40",
    "--annotation",
    "fcsp.mem=8G",
    "-e",
    "NVIDIA_VISIBLE_DEVICES=0",
]


def _ulimits() -> list[str]:
    # podman's defaults exceed some hosts' hard limits (20000 open files on some).
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


def timed(argv: list[str], stdin: bytes = b"") -> float:
    """Milliseconds the command took; it must succeed."""
    start = time.perf_counter()
    done = subprocess.run(argv, input=stdin, capture_output=True, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {done.stderr.decode(errors='replace').strip()}")
    return elapsed


def pairs(
    n: int, a: Callable[[], float], b: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """n pairs of (with, without), the order alternating; one pair first to warm up."""
    a(), b()
    with_, without = [], []
    for i in range(n):
        if i % 2:
            without.append(b())
            with_.append(a())
        else:
            with_.append(a())
            without.append(b())
    return with_, without


def podman(
    rootfs: Path,
    *,
    annotated: bool,
    detach: bool = False,
    runtime: str = "runc",
    hooks_dir: Path | None = None,
) -> float:
    argv = ["podman", *(["--hooks-dir", str(hooks_dir)] if hooks_dir else [])]
    argv += ["run", "--runtime", runtime, *_ulimits()]
    argv += ["-d"] if detach else ["--rm"]
    argv += ANNOTATIONS if annotated else []
    argv += ["--rootfs", str(rootfs)]
    argv += ["/bin/sleep", "600"] if detach else ["/usr/bin/cat", "/etc/hostname"]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        raise SystemExit(f"podman run failed: {done.stderr.strip()}")
    if detach:
        subprocess.run(
            ["podman", "rm", "-f", "-t", "0", done.stdout.strip()], capture_output=True, check=False
        )
    return elapsed


@contextlib.contextmanager
def hookd(wanted: bool) -> Iterator[str]:
    """fcsp-hookd serving (started for the bench unless one runs), or not at all (its
    systemd units stopped for the bench, then started again); says which."""
    running = _answers(HOOKD_SOCKET)
    proc, stopped_units = None, False
    if wanted and not running:
        proc = subprocess.Popen([str(HOOKD), "--config", "/etc/fcsp/config.toml"])
        while not _answers(HOOKD_SOCKET):
            if proc.poll() is not None:
                raise SystemExit(f"{HOOKD} exited with {proc.returncode}")
            time.sleep(0.05)
    if not wanted and running:
        units = ["fcsp-hookd.socket", "fcsp-hookd.service"]
        subprocess.run(["systemctl", "stop", *units], capture_output=True, check=False)
        stopped_units = True
        if _answers(HOOKD_SOCKET):
            raise SystemExit("fcsp-hookd runs outside systemd: stop it for the bench")
    try:
        yield "fcsp-hookd" if wanted else "no fcsp-hookd: the Python hook"
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        if stopped_units:
            subprocess.run(
                ["systemctl", "start", "fcsp-hookd.socket"], capture_output=True, check=False
            )


def timed_hooks(entry: dict[str, Any], directory: Path, record: Path) -> Path:
    """A hooks.d directory whose entries run the installed hook once per stage, each inside
    a shell that records the hook's own wall time in ns ("<stage> <ns>" lines in record)."""
    directory.mkdir()
    hook = entry["hook"]
    for stage in ("prestart", "poststop"):
        wrapper = (
            's=$(date +%s%N); "$@"; rc=$?; e=$(date +%s%N); '
            f'echo "{stage} $((e - s))" >> {record}; exit $rc'
        )
        staged = {
            **entry,
            "hook": {**hook, "path": "/bin/sh", "args": ["sh", "-c", wrapper, "sh", *hook["args"]]},
            "stages": [stage],
        }
        (directory / f"fcsp-{stage}.json").write_text(json.dumps(staged))
    return directory


def stage_times(record: Path) -> dict[str, list[float]]:
    """Milliseconds per stage from timed_hooks' record."""
    out: dict[str, list[float]] = {}
    for line in record.read_text().splitlines():
        stage, ns = line.split()
        out.setdefault(stage, []).append(int(ns) / 1e6)
    return out


def _answers(path: Path) -> bool:
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def stats(values: list[float]) -> list[str]:
    q = statistics.quantiles(values, n=10)
    return [f"{statistics.median(values):.1f}", f"{q[0]:.1f}", f"{q[-1]:.1f}"]


Row = tuple[str, list[float], list[float]]


Stage = tuple[str, str, list[float]]  # stage, how it was served, ms


def measure(
    rootfs: Path, n: int, entry: dict[str, Any], tmp: Path
) -> tuple[list[Row], list[Stage]]:
    rows: list[Row] = []
    stages: list[Stage] = []

    def row(name: str, with_: Callable[[], float], without: Callable[[], float]) -> None:
        rows.append((name, *pairs(n, with_, without)))

    for served in (True, False):
        with hookd(served) as how:
            row(
                f"`podman run --rm` (start and removal), {how}",
                lambda: podman(rootfs, annotated=True),
                lambda: podman(rootfs, annotated=False),
            )
            row(
                f"`podman run -d` (start only), {how}",
                lambda: podman(rootfs, annotated=True, detach=True),
                lambda: podman(rootfs, annotated=False, detach=True),
            )
            record = tmp / f"stages-{served}"
            timed_dir = timed_hooks(entry, tmp / f"hooks-{served}", record)
            for _ in range(n):
                podman(rootfs, annotated=True, hooks_dir=timed_dir)
            stages += [(stage, how, ms) for stage, ms in stage_times(record).items()]
    if RUNTIME.exists():
        runc = shutil.which("runc") or "runc"
        row(
            "`podman run --rm` of a plain container via fcsp-runtime vs runc",
            lambda: podman(rootfs, annotated=False, runtime=str(RUNTIME)),
            lambda: podman(rootfs, annotated=False),
        )
        with hookd(True) as how:
            row(
                f"`podman run --rm` with FCSP via fcsp-runtime vs via runc, {how}",
                lambda: podman(rootfs, annotated=True, runtime=str(RUNTIME)),
                lambda: podman(rootfs, annotated=True),
            )
        row(
            "fcsp-runtime `--version` vs runc's",
            lambda: timed([str(RUNTIME), "--version"]),
            lambda: timed([runc, "--version"]),
        )
    return rows, stages


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="the document's directory")
    args = parser.parse_args()
    out = args.out or (
        Path(os.environ["OUT"]) if os.environ.get("OUT") else lib.REPO / "bench" / "results"
    )
    meta = collect_meta(with_gpu=False)
    entry = json.loads(HOOKS_ENTRY.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = build_base_rootfs(Path(tmp) / "rootfs")
        rows, stages = measure(rootfs, args.pairs, entry, Path(tmp))
    podman_version = subprocess.run(
        ["podman", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    doc = Report(
        "hook-latency",
        "Container start: what FCSP adds",
        "Paired runs of the same command with and without FCSP, alternating; the added time is "
        "the median of the per-pair differences (p10 and p90 beside it).",
        out,
        meta=meta,
        with_gpu=False,
        extra=[
            f"{podman_version}, runc; {platform.machine()}, {os.cpu_count()} cores, kernel "
            f"{platform.release()}; the hooks.d entry runs `{entry['hook']['path']}`",
            "container: `podman run --runtime runc --rootfs <busybox+glibc> cat /etc/hostname`"
            " (`-d`: `sleep 600`); with FCSP: `fcsp.sm=40 fcsp.mem=8G`, `NVIDIA_VISIBLE_DEVICES=0`",
        ],
    )
    doc.table(
        [
            "what",
            "pairs",
            "with, median ms",
            "without, median ms",
            "added, median ms",
            "p10",
            "p90",
        ],
        [
            [
                name,
                len(w),
                f"{statistics.median(w):.1f}",
                f"{statistics.median(wo):.1f}",
                *stats([a - b for a, b in zip(w, wo, strict=True)]),
            ]
            for name, w, wo in rows
        ],
    )
    doc.section(
        "Each hook stage",
        "The hooks.d entry's program, whole (client, fcsp-hookd's fork or the Python hook), "
        "timed inside the container starts of `podman run --rm` with FCSP, one entry per "
        "stage wrapped in a shell that reads the clock before and after it.",
    )
    doc.table(
        ["stage", "served by", "runs", "median ms", "p10", "p90"],
        [[stage, how, len(ms), *stats(ms)] for stage, how, ms in stages],
    )
    path = doc.write()
    print(path.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
