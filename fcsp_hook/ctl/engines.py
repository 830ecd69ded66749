"""`fcspctl install/uninstall --engine ...`: each engine's configuration, edited in place.

The writers are pure (old text -> new text) and keep everything they do not own:
- docker:     /etc/docker/daemon.json  runtimes.fcsp = {path: fcsp-runtime} (and, if asked,
              default-runtime = "fcsp"); JSON has no comments, every other key is kept.
- containerd: one marked block defining a runtime named fcsp: runc's shim with
              BinaryName = fcsp-runtime, pod_annotations = ["fcsp.*"], and the settings of
              the runtime the node already runs GPU containers with (the NVIDIA runtime's
              options, else runc's).  Where it goes (containerd_layout): a drop-in of its
              own when containerd 2.x imports a conf.d directory; for 1.x, the file whose
              CRI plugin table containerd ends up with (an imported file's replaces the
              config's); on k3s and RKE2, the template they render config.toml from
              (config-v3.toml.tmpl or config.toml.tmpl, extending their base template);
              else /etc/containerd/config.toml.  The user's text, comments and all, is
              kept; uninstall removes the block (and a file of ours that is left empty).
- podman, crio: the hooks.d entry (both read /usr/share/containers/oci/hooks.d by default).
The I/O around them (plan, apply, diff) keeps a timestamped backup of any file it changes
and writes atomically.  Last, the node label the Kubernetes DaemonSet sets once FCSP is
installed (`python -m fcsp_hook.ctl.engines label-node set|remove`).
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcsp_hook.errors import FcspError
from fcsp_hook.hook import hooksd, next_runtime

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found]  # 3.10 only

ENGINES = ("docker", "podman", "containerd", "crio")
RUNTIME_NAME = "fcsp"
DEFAULT_RUNTIME_PATH = "/usr/local/bin/fcsp-runtime"
DOCKER_CONFIG = Path("/etc/docker/daemon.json")
CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
# podman 4 (Debian's containers.conf) and CRI-O (crio.conf hooks_dir) both read this one.
HOOKS_FILE = Path("/usr/share/containers/oci/hooks.d/fcsp.json")
BACKUP_INFIX = ".fcsp-backup-"

CONTAINERD_SHIM = "io.containerd.runc.v2"
POD_ANNOTATIONS = ("fcsp.*",)
# containerd's config version -> where the CRI plugin keeps its runtimes.
# (containerd 2.3's version 4 moved server settings, not the CRI plugin.)
CRI_PLUGINS = {
    1: "cri",
    2: "io.containerd.grpc.v1.cri",
    3: "io.containerd.cri.v1.runtime",
    4: "io.containerd.cri.v1.runtime",
}
# k3s and RKE2 render containerd's config.toml at every start from a template of the user's
# (config-v3.toml.tmpl for containerd 2.x, else config.toml.tmpl) or their own; a template
# extends theirs with this line.  The services that restart them (servers, then agents).
DISTROS = {
    "k3s": (Path("/var/lib/rancher/k3s/agent/etc/containerd"), "k3s|k3s-agent"),
    "rke2": (Path("/var/lib/rancher/rke2/agent/etc/containerd"), "rke2-server|rke2-agent"),
}
TEMPLATES = {3: "config-v3.toml.tmpl", 2: "config.toml.tmpl"}
BASE_TEMPLATE = '{{ template "base" . }}'
# Ours in a drop-in directory containerd 2.x imports (conf.d/*.toml).
DROP_IN = "fcsp.toml"
MAX_IMPORTS = 64
# The PATH engines and systemd units run with: where "auto" looks first.
DEFAULT_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BEGIN_MARK = "# BEGIN fcsp (managed by `fcspctl install --engine containerd`; do not edit)"
END_MARK = "# END fcsp (`fcspctl uninstall --engine containerd` removes this block)"


class EngineError(FcspError):
    """An engine's configuration cannot be read or changed safely."""


@dataclass(frozen=True)
class Settings:
    """What install writes, and where (root prefixes every file, for images and tests)."""

    root: Path = Path("/")
    runtime_path: str = DEFAULT_RUNTIME_PATH
    python: str = sys.executable
    config_path: Path = Path("/etc/fcsp/config.toml")
    default_runtime: bool = False
    file: Path | None = None  # the engine's file, if not the usual one (under root too)
    containerd_version: int | None = None  # config version for a new containerd file


@dataclass(frozen=True)
class Change:
    """One file's before and after (None: absent); notes say what the operator does next."""

    path: Path
    old: str | None
    new: str | None
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.old != self.new


# ---- docker: daemon.json (pure) ---------------------------------------------------------------


def _json_object(text: str | None, what: str) -> dict[str, Any]:
    if text is None or not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise EngineError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise EngineError(f"{what} is not a JSON object")
    return doc


def _runtimes(doc: Mapping[str, Any], what: str) -> dict[str, Any]:
    runtimes = doc.get("runtimes", {})
    if not isinstance(runtimes, dict):
        raise EngineError(f"{what}: runtimes is not an object")
    return runtimes


def _dump_json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=4) + "\n"


def docker_install(
    text: str | None, runtime_path: str, default_runtime: bool
) -> tuple[str | None, tuple[str, ...]]:
    """daemon.json with runtimes.fcsp (other runtimes, its other keys, every setting kept)."""
    doc = _json_object(text, "daemon.json")
    runtimes = _runtimes(doc, "daemon.json")
    current = runtimes.get(RUNTIME_NAME)
    entry = {**(current if isinstance(current, dict) else {}), "path": runtime_path}
    new = {**doc, "runtimes": {**runtimes, RUNTIME_NAME: entry}}
    notes = []
    if default_runtime:
        previous = doc.get("default-runtime")
        new["default-runtime"] = RUNTIME_NAME
        if previous not in (None, RUNTIME_NAME, "runc", "nvidia"):
            notes.append(
                f"default-runtime was {previous!r}: fcsp-runtime hands containers to "
                "[runtime] next in config.toml (auto: nvidia-container-runtime or runc); "
                "set it to that runtime's path"
            )
    notes.append(
        "run `systemctl reload docker`; then `docker run --runtime fcsp "
        "--annotation fcsp.sm=40 ...` (annotations need Docker 24+)"
    )
    return (text if new == doc else _dump_json(new)), tuple(notes)


def docker_uninstall(text: str | None) -> tuple[str | None, tuple[str, ...]]:
    """daemon.json without runtimes.fcsp (and without default-runtime if it was fcsp)."""
    doc = _json_object(text, "daemon.json")
    runtimes = _runtimes(doc, "daemon.json")
    new = dict(doc)
    notes = ["run `systemctl reload docker`"]
    if RUNTIME_NAME in runtimes:
        rest = {k: v for k, v in runtimes.items() if k != RUNTIME_NAME}
        if rest:
            new["runtimes"] = rest
        else:
            del new["runtimes"]
    if new.get("default-runtime") == RUNTIME_NAME:
        del new["default-runtime"]
        notes.append("default-runtime was fcsp and is removed: Docker's default (runc) applies")
    return (text if new == doc else _dump_json(new)), tuple(notes)


# ---- podman, CRI-O: the hooks.d entry (pure) --------------------------------------------------


def hooks_install(
    text: str | None, python: str, config_path: Path, engine: str
) -> tuple[str | None, tuple[str, ...]]:
    new = hooksd.render(python, config_path)
    if engine == "crio":
        notes = (
            f"CRI-O reads {HOOKS_FILE.parent} by default ([crio.runtime] hooks_dir in "
            "crio.conf); if yours names another directory, use --file DIR/fcsp.json",
        )
    else:
        notes = (f"podman reads {HOOKS_FILE.parent} on every run; no restart needed",)
    return new, notes


def hooks_uninstall(text: str | None) -> tuple[str | None, tuple[str, ...]]:
    return None, ()


# ---- containerd: config.toml, its imports, k3s/RKE2 templates (pure) ---------------------------


def _toml_key(part: str) -> str:
    return part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise EngineError(f"cannot write {value!r} as a TOML value")  # a bug: we choose the values


def _dig(doc: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = doc
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def runtimes_path(version: int) -> tuple[str, ...]:
    return ("plugins", CRI_PLUGINS[version], "containerd", "runtimes")


def _version(doc: Mapping[str, Any], wanted: int | None) -> int:
    """containerd's rule: no `version` key means version 1; an empty file gets `wanted`."""
    version = doc.get("version")
    if version is None:
        return (wanted or 2) if not doc else 1
    if version not in CRI_PLUGINS:
        raise EngineError(f"containerd config version {version!r} is not 1, 2, 3 or 4")
    return int(version)


@dataclass(frozen=True)
class CriView:
    """The CRI plugin's runtimes as containerd ends up with them (its config and every file
    that imports, merged as containerd merges them), and its default runtime's name."""

    runtimes: Mapping[str, Any]
    default: str = ""

    @classmethod
    def of(cls, section: Mapping[str, Any] | None) -> CriView:
        runtimes = _dig(section or {}, ("containerd", "runtimes"))
        default = _dig(section or {}, ("containerd", "default_runtime_name"))
        return cls(
            runtimes if isinstance(runtimes, dict) else {},
            default if isinstance(default, str) else "",
        )


def cri_section(doc: Mapping[str, Any], version: int) -> dict[str, Any] | None:
    """The CRI plugin's table in one file of that config version (None: the file has none)."""
    section = _dig(doc, ("plugins", CRI_PLUGINS[version]))
    return section if isinstance(section, dict) else None


def _deep_merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        mine = into.get(key)
        if isinstance(mine, dict) and isinstance(value, dict):
            _deep_merge(mine, value)
        else:
            into[key] = json.loads(json.dumps(value)) if isinstance(value, dict) else value


def merged_cri(docs: Sequence[Mapping[str, Any]], deep: bool) -> tuple[dict[str, Any], int]:
    """The CRI plugin's table over a config and its imports, in containerd's load order, and
    the index of the last file that defines it (-1: none does).  containerd 2.x merges plugin
    tables key by key (deep); 1.x replaces a plugin's whole table with the last file's."""
    merged: dict[str, Any] = {}
    winner = -1
    for i, doc in enumerate(docs):
        section = cri_section(doc, _version(doc, None) if doc else 2)
        if section is None:
            continue
        winner = i
        if deep:
            _deep_merge(merged, section)
        else:
            merged = json.loads(json.dumps(section))
    return merged, winner


def _binary(entry: object) -> str:
    name = _dig(entry, ("options", "BinaryName")) if isinstance(entry, dict) else None
    return name if isinstance(name, str) else ""


def _is_nvidia(entry: object) -> bool:
    return os.path.basename(_binary(entry)).startswith(next_runtime.NVIDIA_RUNTIME)


def gpu_runtime(view: CriView) -> str:
    """The runtime this node already runs GPU containers with ('' when none): the default
    runtime if it is NVIDIA's (the GPU Operator makes it so), else the one named nvidia,
    else any running nvidia-container-runtime itself, else any of its modes (.cdi, ...)."""
    runtimes = view.runtimes
    nvidia = sorted(n for n, e in runtimes.items() if n != RUNTIME_NAME and _is_nvidia(e))
    exact = [
        n for n in nvidia if os.path.basename(_binary(runtimes[n])) == next_runtime.NVIDIA_RUNTIME
    ]
    for name in (view.default, "nvidia", *exact, *nvidia):
        if name in nvidia and _dig(runtimes[name], ("runtime_type",)) in (None, CONTAINERD_SHIM):
            return name
    return ""


def _plain(value: object) -> bool:
    """A value the block can write: a scalar, or a list of scalars."""
    if isinstance(value, list):
        return all(isinstance(v, (bool, int, str)) for v in value)
    return isinstance(value, (bool, int, str))


def containerd_entry(view: CriView, gpu: str, binary: str) -> dict[str, Any]:
    """The fcsp runtime: runc's shim running fcsp-runtime, with the settings and options of
    the runtime it chains to (the GPU runtime, else runc) over runc's own options
    (SystemdCgroup above all: the kubelet's cgroup driver must match), and fcsp.* added to
    the pod annotations it passes."""
    runc = view.runtimes.get("runc")
    source = view.runtimes.get(gpu) if gpu else runc
    options: dict[str, Any] = {"BinaryName": binary}
    for entry in (runc, source):
        extra = _dig(entry, ("options",)) if isinstance(entry, dict) else None
        if isinstance(extra, dict):
            options.update((k, v) for k, v in extra.items() if k != "BinaryName" and _plain(v))
    out: dict[str, Any] = {"runtime_type": CONTAINERD_SHIM}
    if isinstance(source, dict):
        skip = {"runtime_type", "options", "pod_annotations"}
        out.update((k, v) for k, v in source.items() if k not in skip and _plain(v))
    theirs = _dig(source, ("pod_annotations",)) if isinstance(source, dict) else None
    kept = [a for a in theirs if isinstance(a, str)] if isinstance(theirs, list) else []
    out["pod_annotations"] = [*POD_ANNOTATIONS, *(a for a in kept if a not in POD_ANNOTATIONS)]
    out["options"] = options
    return out


def containerd_block(version: int, entry: Mapping[str, Any], comment: str = "") -> str:
    table = ".".join(_toml_key(p) for p in (*runtimes_path(version), RUNTIME_NAME))
    lines = [BEGIN_MARK, *(f"# {line}" for line in comment.splitlines()), f"[{table}]"]
    lines += [f"  {k} = {_toml_value(v)}" for k, v in entry.items() if k != "options"]
    lines += ["", f"[{table}.options]"]
    lines += [f"  {_toml_key(k)} = {_toml_value(v)}" for k, v in entry["options"].items()]
    return "\n".join([*lines, END_MARK]) + "\n"


_BLOCK_RE = re.compile(
    rf"(?:^\n)?^{re.escape(BEGIN_MARK)}\n.*?^{re.escape(END_MARK)}\n?", re.MULTILINE | re.DOTALL
)


def _parse_toml(text: str, what: str) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EngineError(f"{what} is not valid TOML: {exc}") from exc
    return doc


def without_block(text: str) -> str:
    """text without fcspctl's block (and the blank line put before it)."""
    return _BLOCK_RE.sub("", text)


def _restart_note(service: str) -> str:
    first, _, agents = service.partition("|")
    return f"run `systemctl restart {first}`" + (f" (`{agents}` on agents)" if agents else "")


def containerd_uninstall(
    text: str | None, service: str = "containerd"
) -> tuple[str | None, tuple[str, ...]]:
    """The user's text without our block (and the blank line we put before it)."""
    notes = (_restart_note(service),)
    if text is None:
        return None, notes
    return without_block(text), notes


def dropin_uninstall(text: str | None) -> tuple[str | None, tuple[str, ...]]:
    """A drop-in of ours: gone once it holds nothing but its version."""
    new, notes = containerd_uninstall(text)
    if new is not None and not set(_parse_toml(new, "the drop-in")) - {"version"}:
        return None, notes
    return new, notes


def template_uninstall(text: str | None, service: str) -> tuple[str | None, tuple[str, ...]]:
    """A k3s/RKE2 template without our block; gone when only the base template is left
    (what k3s and RKE2 render without a template of their own)."""
    new, notes = containerd_uninstall(text, service)
    if new is not None and new.strip() in ("", BASE_TEMPLATE):
        return None, notes
    return new, notes


def _fcsp_check(view: CriView, binary: str, where: str, version: int) -> bool:
    """True when the view already has fcspctl's runtime as asked; an error when it has
    someone else's runtime named fcsp (that table can be defined only once)."""
    theirs = view.runtimes.get(RUNTIME_NAME)
    if theirs is None:
        return False
    if _binary(theirs) == binary:
        return True
    table = ".".join((*runtimes_path(version), RUNTIME_NAME))
    raise EngineError(
        f"{where} already defines {table} (not fcspctl's block): "
        f"remove it, or set its options.BinaryName = {binary!r} by hand"
    )


def _splice(text: str | None, base: str, block: str, head: str) -> str:
    """Our block in place of the old one, else appended to base after head."""
    match = _BLOCK_RE.search(text or "")
    if text is not None and match:
        lead = "\n" if match.group(0).startswith("\n") else ""
        return text[: match.start()] + lead + block + text[match.end() :]
    base = base + ("" if not base or base.endswith("\n") else "\n")
    return base + head + "\n" + block


def _reads_back(text: str, version: int, entry: Mapping[str, Any], table: str) -> None:
    """The user's file may hold runtimes as an inline table or dotted keys, which a new
    [..runtimes.fcsp] section cannot extend: check the result rather than guess."""
    try:
        check = _dig(tomllib.loads(text), runtimes_path(version))
        problem = "" if isinstance(check, dict) and check.get(RUNTIME_NAME) == entry else "?"
    except tomllib.TOMLDecodeError as exc:
        problem = str(exc)
    if problem:
        raise EngineError(
            f"cannot add [{table}] safely (the result would not read back: {problem}); "
            "add it by hand"
        )


def containerd_install(
    text: str | None,
    binary: str,
    wanted_version: int | None = None,
    view: CriView | None = None,
    service: str = "containerd",
) -> tuple[str | None, tuple[str, ...]]:
    """The user's text with our block replaced in place, or appended.  view: what
    containerd reads over this file and its imports (default: this file alone), which the
    runtime chains to and which must not define runtimes.fcsp itself."""
    base = without_block(text or "")
    doc = _parse_toml(base, "containerd config.toml")
    version = _version(doc, wanted_version)
    view = view if view is not None else CriView.of(cri_section(doc, version))
    table = ".".join((*runtimes_path(version), RUNTIME_NAME))
    if _fcsp_check(view, binary, "containerd config.toml", version):
        return text, ("containerd already has a runtime named fcsp running fcsp-runtime",)
    gpu = gpu_runtime(view)
    entry = containerd_entry(view, gpu, binary)
    block = containerd_block(version, entry, chain_comment(view, gpu))
    # An empty file (comments at most) has no table yet: a top-level version goes first.
    new = _splice(text, base, block, f"version = {version}\n" if not doc else "")
    _reads_back(new, version, entry, table)
    return new, (*chain_notes(view, gpu), _install_note(service))


def template_install(
    text: str | None, binary: str, version: int, view: CriView, service: str
) -> tuple[str | None, tuple[str, ...]]:
    """A k3s/RKE2 containerd template (Go text/template, not TOML) with our block: the
    user's template, or the base template, which the distribution renders into
    config.toml at every start, so that the runtime survives that."""
    base = without_block(text or "")
    if not base.strip():
        base = BASE_TEMPLATE + "\n"
    if _fcsp_check(view, binary, "the rendered containerd config.toml", version):
        return text, ("containerd already has a runtime named fcsp running fcsp-runtime",)
    gpu = gpu_runtime(view)
    entry = containerd_entry(view, gpu, binary)
    block = containerd_block(version, entry, chain_comment(view, gpu))
    _reads_back(block, version, entry, ".".join((*runtimes_path(version), RUNTIME_NAME)))
    new = _splice(text if text and text.strip() else None, base, block, "")
    return new, (*chain_notes(view, gpu), _install_note(service))


def _install_note(service: str) -> str:
    return (
        f"{_restart_note(service)}; Kubernetes: kubectl apply -f "
        "etc/kubernetes/runtimeclass.yaml, then runtimeClassName: fcsp in the pod"
    )


def chain_comment(view: CriView, gpu: str) -> str:
    """The block's own word on what it chains to (shown by --dry-run too)."""
    if not gpu:
        return ""
    binary = _binary(view.runtimes[gpu])
    return (
        f'Chained to the GPU runtime "{gpu}" (its settings): fcsp-runtime hands containers to\n'
        f"{binary} ([runtime] next in /etc/fcsp/config.toml)"
    )


def chain_notes(view: CriView, gpu: str) -> tuple[str, ...]:
    """What the fcsp runtime chains to, and whether [runtime] next = "auto" gets there."""
    if not gpu:
        return ()
    binary = _binary(view.runtimes[gpu])
    line = (
        f'the fcsp runtime copies the settings of containerd\'s GPU runtime "{gpu}"; '
        f"fcsp-runtime must hand containers to {binary}"
    )
    if binary in next_runtime.NVIDIA_LOCATIONS or (
        os.path.basename(binary) == next_runtime.NVIDIA_RUNTIME
        and os.path.dirname(binary) in DEFAULT_SEARCH_PATH.split(os.pathsep)
    ):
        return (line + ', which [runtime] next = "auto" finds',)
    return (line + f': set [runtime] next = "{binary}" in /etc/fcsp/config.toml',)


# ---- I/O ----------------------------------------------------------------------------------------


def default_file(engine: str) -> Path:
    return {"docker": DOCKER_CONFIG, "containerd": CONTAINERD_CONFIG}.get(engine, HOOKS_FILE)


def _under(root: Path, path: Path) -> Path:
    return root / path.relative_to("/") if path.is_absolute() else root / path


def target(engine: str, settings: Settings) -> Path:
    """The engine's file under settings.root (containerd: see containerd_layout)."""
    return _under(settings.root, settings.file or default_file(engine))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path}: cannot read: {exc}") from exc


def containerd_config_version() -> int | None:
    """3 for an installed containerd 2.x, 2 for 1.x, None when there is none to ask."""
    try:
        out = subprocess.run(
            ["containerd", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\sv?(\d+)\.\d+", out)
    if not match:
        return None
    return 3 if int(match.group(1)) >= 2 else 2


@dataclass(frozen=True)
class Layout:
    """Where the fcsp runtime goes on this node's containerd, and what containerd reads.

    kind: "config" (a config file: ours is a block in it), "drop-in" (a file of ours that
    the config imports) or "template" (k3s/RKE2's template of config.toml).  view: the CRI
    runtimes over the config and its imports (None: the target file alone).  files: every
    file read (host paths), where an earlier install's block may be."""

    kind: str
    target: Path
    view: CriView | None = None
    version: int | None = None
    service: str = "containerd"
    files: tuple[Path, ...] = ()
    why: str = ""  # why the runtime goes there, when it is not the file named


def _imports(parent: Path, value: object, root: Path) -> list[Path]:
    """containerd's imports of one file, as host paths: relative ones beside the file,
    globs expanded (sorted, as containerd's filepath.Glob is)."""
    out: list[Path] = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, str) or not item:
            continue
        path = Path(os.path.normpath(item if item.startswith("/") else parent.parent / item))
        if "*" in str(path):
            found = sorted(glob.glob(str(_under(root, path))))
            out += [Path("/") / Path(f).relative_to(root) for f in found]
        else:
            out.append(path)
    return out


def config_chain(root: Path, main: Path) -> list[tuple[Path, dict[str, Any], str]]:
    """The config and every file it imports, in containerd's load order, each once: (host
    path, document without fcspctl's block, text).  A missing file is skipped."""
    out: list[tuple[Path, dict[str, Any], str]] = []
    seen: set[Path] = set()
    pending = [main]
    while pending and len(out) < MAX_IMPORTS:
        path = pending.pop(0)
        if path in seen:
            continue
        seen.add(path)
        text = _read(_under(root, path))
        if text is None:
            continue
        doc = _parse_toml(without_block(text), str(path))
        out.append((path, doc, text))
        pending += _imports(path, doc.get("imports"), root)
    return out


def _dropin_dir(doc: Mapping[str, Any], path: Path) -> Path | None:
    """The directory of the first `<dir>/*.toml` glob the config imports (conf.d)."""
    for item in doc.get("imports") or []:
        if isinstance(item, str) and item.endswith("*.toml") and "*" not in item[:-6]:
            return Path(
                os.path.normpath(item if item.startswith("/") else path.parent / item)
            ).parent
    return None


def _chain_layout(root: Path, main: Path, service: str, template_dir: Path | None = None) -> Layout:
    """The layout of a containerd whose config (or k3s/RKE2's rendered one) is main."""
    chain = config_chain(root, main)
    files = tuple(p for p, _, _ in chain)
    if not chain:
        return Layout("config", _under(root, main), service=service, files=files)
    docs = [d for _, d, _ in chain]
    top = _version(docs[0], None) if docs[0] else 2
    dropin = _dropin_dir(docs[0], main)
    # containerd 2.x (config version 3 or 4) merges plugin tables key by key: a drop-in of ours
    # in the directory it imports adds the runtime and touches nothing else.
    if top >= 3 and dropin is not None:
        section, _ = merged_cri(docs, deep=True)
        where = _under(root, dropin / DROP_IN)
        why = f"{main} imports {dropin}/*.toml: the runtime is a drop-in of its own there"
        return Layout("drop-in", where, CriView.of(section), 3, service, files, why)
    # Otherwise the runtime goes into the file whose CRI table containerd ends up with: 1.x
    # replaces a plugin's table with the last imported file's that has one.
    section, winner = merged_cri(docs, deep=top >= 3)
    view = CriView.of(section)
    if template_dir is not None and winner <= 0:
        existing = [n for n in TEMPLATES.values() if (_under(root, template_dir / n)).is_file()]
        name = existing[0] if existing else TEMPLATES[3 if top >= 3 else 2]
        why = (
            f"{service.partition('|')[0]} renders {main} from {template_dir / name} at every "
            "start: the runtime goes into that template"
        )
        where = _under(root, template_dir / name)
        return Layout("template", where, view, top, service, files, why)
    where = chain[max(winner, 0)][0]
    why = (
        f"containerd takes the CRI plugin's settings from {where}, the last file it imports "
        "that has them: the runtime goes there"
        if where != main
        else ""
    )
    return Layout("config", _under(root, where), view, None, service, files, why)


def containerd_layout(settings: Settings) -> Layout:
    """Where `install --engine containerd` writes on this node: --file if given; k3s or
    RKE2 when their rendered config is there; else /etc/containerd/config.toml."""
    root = settings.root
    if settings.file is not None:
        where = _under(root, settings.file)
        host = Path("/") / where.relative_to(root)
        service = next((s for _, (d, s) in DISTROS.items() if host.parent == d), "containerd")
        if where.name.endswith(".tmpl"):
            layout = _chain_layout(root, host.parent / "config.toml", service, host.parent)
            version = layout.version or (3 if where.name == TEMPLATES[3] else 2)
            return Layout("template", where, layout.view, version, service, layout.files)
        chain = _chain_layout(root, host, service)
        return Layout("config", where, chain.view, None, service, chain.files)
    for _, (directory, service) in DISTROS.items():
        if _under(root, directory / "config.toml").is_file():
            return _chain_layout(root, directory / "config.toml", service, directory)
    return _chain_layout(root, CONTAINERD_CONFIG, "containerd")


def _earlier_block(layout: Layout, root: Path) -> Path | None:
    """A file other than the target holding fcspctl's block (an install into another
    layout); a template's rendered config holds it by design."""
    for host in layout.files:
        path = _under(root, host)
        if path == layout.target or (layout.kind == "template" and path.name == "config.toml"):
            continue
        if BEGIN_MARK in (_read(path) or ""):
            return path
    return None


def _containerd_change(action: str, settings: Settings) -> Change:
    layout = containerd_layout(settings)
    path = layout.target
    if action == "uninstall" and BEGIN_MARK not in (_read(path) or ""):
        earlier = _earlier_block(layout, settings.root)
        if earlier is not None:
            path = earlier
            layout = Layout("config", earlier, service=layout.service)
    old = _read(path)
    new: str | None
    try:
        if action == "uninstall":
            if path.name.endswith(".tmpl"):
                new, notes = template_uninstall(old, layout.service)
            elif path.name == DROP_IN and layout.kind != "config":
                new, notes = dropin_uninstall(old)
            else:
                new, notes = containerd_uninstall(old, layout.service)
            return Change(path=path, old=old, new=new, notes=notes)
        earlier = _earlier_block(layout, settings.root)
        if earlier is not None:
            host = Path("/") / earlier.relative_to(settings.root)
            raise EngineError(
                f"{earlier} holds fcspctl's block from an earlier install: run "
                f"`fcspctl uninstall --engine containerd --file {host}` first"
            )
        binary = settings.runtime_path
        if layout.kind == "template":
            new, notes = template_install(
                old, binary, layout.version or 2, layout.view or CriView({}), layout.service
            )
        else:
            wanted = layout.version or settings.containerd_version
            if wanted is None and (old is None or not old.strip()):
                wanted = containerd_config_version()
            new, notes = containerd_install(old, binary, wanted, layout.view, layout.service)
    except EngineError as exc:
        raise EngineError(f"{path}: {exc}") from exc
    if layout.why and new != old:
        notes = (layout.why, *notes)
    return Change(path=path, old=old, new=new, notes=notes)


def plan(engine: str, action: str, settings: Settings) -> Change:
    """What install or uninstall would do to the engine's file; nothing is written."""
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if settings.default_runtime and engine != "docker":
        raise EngineError("--default-runtime is for docker only (Kubernetes: a RuntimeClass)")
    if engine == "containerd":
        return _containerd_change(action, settings)
    path = target(engine, settings)
    old = _read(path)
    what = str(path)
    new: str | None
    try:
        if engine == "docker":
            new, notes = (
                docker_install(old, settings.runtime_path, settings.default_runtime)
                if action == "install"
                else docker_uninstall(old)
            )
        elif action == "install":
            new, notes = hooks_install(old, settings.python, settings.config_path, engine)
        else:
            new, notes = hooks_uninstall(old)
    except EngineError as exc:
        raise EngineError(f"{what}: {exc}") from exc
    return Change(path=path, old=old, new=new, notes=notes)


def diff(change: Change) -> str:
    """A unified diff of the change (empty when there is none)."""
    name = str(change.path)
    return "".join(
        difflib.unified_diff(
            (change.old or "").splitlines(keepends=True),
            (change.new or "").splitlines(keepends=True),
            fromfile=name if change.old is not None else "/dev/null",
            tofile=name if change.new is not None else "/dev/null",
        )
    )


def backup_path(path: Path, now: float) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    candidate = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}.{n}")
        n += 1
    return candidate


def _write_atomically(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.fcsp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def apply(change: Change) -> Path | None:
    """Write the change; returns the backup of the old file (None if there was none)."""
    if not change.changed:
        return None
    path = change.path
    backup = None
    try:
        mode = path.stat().st_mode & 0o7777 if change.old is not None else 0o644
        if change.old is not None:
            backup = backup_path(path, time.time())
            _write_atomically(backup, change.old, mode)
        if change.new is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, change.new, mode)
    except OSError as exc:
        raise EngineError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    return backup


# ---- Kubernetes: the node label the DaemonSet sets ----------------------------------------------

# A node whose container runtime runs FCSP: the RuntimeClass schedules pods only there.
READY_LABEL = "fcsp.io/ready"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_API_TIMEOUT_S = 15


@dataclass(frozen=True)
class KubeApi:
    """The API server as a pod reaches it: its service account's token and CA."""

    server: str  # https://host:port
    token: str
    namespace: str
    ca_file: str | None = None

    @classmethod
    def in_cluster(cls, env: Mapping[str, str], account: Path = SERVICE_ACCOUNT) -> KubeApi | None:
        """None outside a pod (no service host in the environment, or no token)."""
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        try:
            token = (account / "token").read_text().strip()
            namespace = (account / "namespace").read_text().strip()
        except OSError:
            return None
        if not host or not port or not token:
            return None
        host = f"[{host}]" if ":" in host else host
        ca = account / "ca.crt"
        return cls(f"https://{host}:{port}", token, namespace, str(ca) if ca.is_file() else None)

    def call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        import ssl  # noqa: PLC0415  # only the DaemonSet's label step talks to the API
        import urllib.error  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method)  # noqa: S310  # the API server's own URL
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/merge-patch+json")
        context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
        try:
            with urllib.request.urlopen(request, timeout=_API_TIMEOUT_S, context=context) as got:  # noqa: S310
                doc = json.loads(got.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read(2000).decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                detail = str(json.loads(detail).get("message", detail))
            raise EngineError(f"{method} {path}: {exc.code} {detail}") from exc
        except (OSError, ValueError) as exc:
            raise EngineError(f"{method} {path}: {exc}") from exc
        return doc if isinstance(doc, dict) else {}


def pod_node(api: KubeApi, pod: str) -> str:
    """The node a pod of api's namespace runs on."""
    doc = api.call("GET", f"/api/v1/namespaces/{api.namespace}/pods/{pod}")
    node = _dig(doc, ("spec", "nodeName"))
    if not isinstance(node, str) or not node:
        raise EngineError(f"pod {api.namespace}/{pod} has no spec.nodeName")
    return node


def label_node(api: KubeApi, node: str, ready: bool) -> None:
    """Set fcsp.io/ready=true on the node, or remove it (a JSON merge patch)."""
    value = "true" if ready else None
    api.call("PATCH", f"/api/v1/nodes/{node}", {"metadata": {"labels": {READY_LABEL: value}}})


def node_engine(api: KubeApi, node: str) -> str:
    """crio when the node's kubelet reports CRI-O as its runtime, else containerd."""
    doc = api.call("GET", f"/api/v1/nodes/{node}")
    version = _dig(doc, ("status", "nodeInfo", "containerRuntimeVersion"))
    return "crio" if isinstance(version, str) and version.startswith("cri-o://") else "containerd"


NODE_USAGE = (
    "usage: python -m fcsp_hook.ctl.engines label-node set|remove [NODE] | node-engine [NODE]"
)


def node_main(argv: list[str], env: Mapping[str, str], account: Path = SERVICE_ACCOUNT) -> int:
    """The DaemonSet's steps that ask the API server, from inside its pod:
    `label-node set|remove [NODE]` sets or removes fcsp.io/ready; `node-engine [NODE]`
    prints the engine to install for (crio or containerd).  NODE defaults to the node this
    pod ($HOSTNAME) runs on.  Outside a pod nothing is labelled (said, exit 0) and the
    engine is containerd."""
    labelling = argv[:1] == ["label-node"] and argv[1:2] in (["set"], ["remove"])
    rest = argv[2:] if labelling else argv[1:]
    if not (labelling or argv[:1] == ["node-engine"]) or len(rest) > 1:
        print(NODE_USAGE, file=sys.stderr)
        return 2
    api = KubeApi.in_cluster(env, account)
    if api is None:
        if labelling:
            print(f"not in a Kubernetes pod (no service account): {READY_LABEL} not changed")
        else:
            print("containerd")
        return 0
    try:
        node = rest[0] if rest else pod_node(api, env.get("HOSTNAME", ""))
        if not labelling:
            print(node_engine(api, node))
            return 0
        label_node(api, node, argv[1] == "set")
    except EngineError as exc:
        print(f"fcsp {argv[0]}: {exc}", file=sys.stderr)
        return 1
    done = f"{READY_LABEL}=true" if argv[1] == "set" else f"{READY_LABEL} removed"
    print(f"node {node}: {done}")
    return 0


if __name__ == "__main__":
    sys.exit(node_main(sys.argv[1:], os.environ))
