"""Results documents: $OUT/<name>.md with the standard header, tables and PNG plots.

<name> is one of NAMES, the living results files in bench/results/.  Every document
starts the same way, so that each figure can be traced to what produced it:

    # <title>

    <what it measures>

    - GPU: NVIDIA H200, driver 580.159.04, CUDA 13.0
    - commit: 1a2b3c4
    - command: `OUT=/some/dir bash bench/gpu_compute.sh`
    - date: <YYYY-MM-DD HH:MM> UTC
    - <lines the bench adds: torch, settings>

A bench that renders again from saved raw data keeps the header it ran under:
collect_meta() at run time, saved with the raw results, handed back to Report.  Several
probes may share one document, each owning a part of it (Report.part), which a new run of
the same probe replaces in place.  Plots need matplotlib; without it the document says so.

    python3 -m lib.report command WORD...       the command line, for a shell bench to
                                                export as BENCH_COMMAND before it changes
                                                its environment
    python3 -m lib.report header --name N --title T --measures M [--no-gpu] [--extra L]...
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib import REPO, gpu

NAMES = (
    "authority",
    "compute",
    "compute-diagnosis",
    "hook-latency",
    "memory",
    "mps",
    "mps-facts",
    "mps-namespaces",
    "multigpu",
    "observer",
    "overhead",
    "spill",
)
# Titles of documents made of parts, one per probe.
DOCUMENTS = {"compute-diagnosis": "What a tenant's throughput depends on, besides its share"}
# Variables that change what a bench does, shown in front of its command line.
SHOWN_ENV = ("OUT", "PYTHON", "FCSP_COMMIT", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF")


def out_dir() -> Path:
    """Where documents go: $OUT, else bench/results/out (beside the living files, not over
    them)."""
    return Path(os.environ.get("OUT") or REPO / "bench" / "results" / "out")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def commit() -> str:
    """`git rev-parse --short HEAD` of the checkout, marked if tracked files differ from it;
    a copy without .git (as carried to a GPU host) says FCSP_COMMIT instead."""
    head = _git("rev-parse", "--short", "HEAD")
    if head:
        changed = _git("status", "--porcelain", "--untracked-files=no")
        return f"{head} (with local changes)" if changed else head
    return os.environ.get("FCSP_COMMIT") or "unknown (not a git checkout; set FCSP_COMMIT)"


def _shown(name: str) -> bool:
    return name in SHOWN_ENV or (name.startswith("BENCH_") and name != "BENCH_COMMAND")


def shell_command(words: Sequence[str]) -> str:
    """`words` as a shell command line, with the bench variables that are set in front."""
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if _shown(k)]
    return " ".join([*env, shlex.join(words)])


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that made a document: BENCH_COMMAND where a shell bench set it (it knows
    what the operator typed), else this process's own."""
    if os.environ.get("BENCH_COMMAND"):
        return os.environ["BENCH_COMMAND"]
    words = list(sys.argv if argv is None else argv)
    script = Path(words[0]).resolve() if words else Path("?")
    shown = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else words[0]
    return shell_command(["python3", shown, *words[1:]])


def collect_meta(*, with_gpu: bool = True) -> dict[str, Any]:
    """What the standard header says, as of now; saved with raw results for re-rendering."""
    meta: dict[str, Any] = {"commit": commit(), "command": command_line(), "date": utc_now()}
    if with_gpu:
        meta["gpus"] = gpu.inventory()
    return meta


def gpu_line(inventory: dict[str, Any] | None) -> str:
    if inventory is None:
        return "- GPU: not used"
    gpus = inventory.get("gpus") or []
    if not gpus:
        return f"- GPU: none found ({inventory.get('error', 'no answer')})"
    names: dict[str, int] = {}
    for g in gpus:
        names[g["name"]] = names.get(g["name"], 0) + 1
    text = ", ".join(f"{n} x {name}" if n > 1 else name for name, n in names.items())
    driver = inventory.get("driver") or "?"
    return f"- GPU: {text}, driver {driver}, CUDA {inventory.get('cuda_driver') or '?'}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def save_json(path: Path, obj: Any) -> None:
    """Written whole or not at all: a bench killed while saving keeps the previous copy."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


_PART = re.compile(r"<!-- part: (\S+) -->\n.*?<!-- end of part: \1 -->\n", re.DOTALL)


@dataclass
class Report:
    """One results document.  meta: collect_meta() of the run (collected now if empty)."""

    name: str
    title: str
    measures: str
    out: Path
    meta: dict[str, Any] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    with_gpu: bool = True
    part: str = ""
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"{self.name!r} is not a results document ({', '.join(NAMES)})")
        if not self.meta:
            self.meta = collect_meta(with_gpu=self.with_gpu)

    @property
    def path(self) -> Path:
        return self.out / f"{self.name}.md"

    def header(self) -> list[str]:
        level = "##" if self.part else "#"
        return [
            f"{level} {self.title}",
            "",
            self.measures,
            "",
            gpu_line(self.meta.get("gpus") if self.with_gpu else None),
            f"- commit: {self.meta.get('commit') or '?'}",
            f"- command: `{self.meta.get('command') or '?'}`",
            f"- date: {self.meta.get('date') or '?'}",
            *[f"- {line}" for line in self.extra],
        ]

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def section(self, title: str, *paragraphs: str) -> None:
        self.add("", f"{'###' if self.part else '##'} {title}")
        for paragraph in paragraphs:
            self.add("", paragraph)
        self.add("")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.add(*table(header, rows))

    def plot_path(self, what: str = "") -> Path:
        return self.out / (f"{self.name}-{what}.png" if what else f"{self.name}.png")

    def plot(
        self, draw: Callable[[Any], Any], what: str = "", *, dpi: int = 120, link: bool = True
    ) -> Path | None:
        """draw(matplotlib.pyplot) returns a figure, saved as <name>.png (<name>-<what>.png)
        beside the document and, with link, linked from it here; None without matplotlib
        (the document says so)."""
        try:
            import matplotlib  # noqa: PLC0415  # optional: the tables do without it

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # noqa: PLC0415
        except ImportError:
            if link:
                self.add("", "(no plot: matplotlib is not installed)")
            return None
        fig = draw(plt)
        path = self.plot_path(what)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        if link:
            self.add("", f"![{what or self.name}]({path.name})")
        return path

    def render(self) -> str:
        body = self.lines if not self.lines or self.lines[0] == "" else ["", *self.lines]
        return "\n".join([*self.header(), *body]).rstrip("\n") + "\n"

    def write(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        text = self.render()
        if self.part:
            text = self._merged(text)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(self.path)
        return self.path

    def _merged(self, body: str) -> str:
        """The document with this part replaced, or added after the others."""
        block = f"<!-- part: {self.part} -->\n{body}<!-- end of part: {self.part} -->\n"
        try:
            old = self.path.read_text()
        except OSError:
            old = ""
        parts = {m.group(1): m.group(0) for m in _PART.finditer(old)}
        parts[self.part] = block
        title = f"# {DOCUMENTS.get(self.name, self.name)}\n"
        return title + "".join(f"\n{p}" for p in parts.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m lib.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("command", help="print WORDS as the command line of this run")
    c.add_argument("words", nargs=argparse.REMAINDER)
    h = sub.add_parser("header", help="print the standard header of a shell bench")
    h.add_argument("--name", required=True, choices=NAMES)
    h.add_argument("--title", required=True)
    h.add_argument("--measures", required=True, help="one paragraph: what the bench measures")
    h.add_argument("--no-gpu", action="store_true", help="a bench that uses no GPU")
    h.add_argument("--extra", action="append", default=[], help="one more header line")
    args = parser.parse_args(argv)
    if args.cmd == "command":
        print(shell_command(args.words))
        return 0
    report = Report(
        args.name, args.title, args.measures, Path("."), extra=args.extra, with_gpu=not args.no_gpu
    )
    print("\n".join(report.header()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
