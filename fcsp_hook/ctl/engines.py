"""`fcspctl install/uninstall --engine ...`: each engine's configuration, edited in place.

The writers are pure (old text -> new text) and keep everything they do not own:
- docker:     /etc/docker/daemon.json  runtimes.fcsp = {path: fcsp-runtime} (and, if asked,
              default-runtime = "fcsp"); JSON has no comments, every other key is kept.
- containerd: /etc/containerd/config.toml gets one marked block (a runtime named fcsp:
              runc's shim with BinaryName = fcsp-runtime, pod_annotations = ["fcsp.*"]),
              appended to the user's text, comments and all; uninstall removes the block.
- podman, crio: the hooks.d entry (both read /usr/share/containers/oci/hooks.d by default).
The I/O around them (plan, apply, diff) keeps a timestamped backup of any file it changes
and writes atomically.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcsp_hook.errors import FcspError
from fcsp_hook.hook import hooksd

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
CRI_PLUGINS = {1: "cri", 2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
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


# ---- containerd: config.toml (pure) -----------------------------------------------------------


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
        raise EngineError(f"containerd config version {version!r} is not 1, 2 or 3")
    return int(version)


def containerd_entry(doc: Mapping[str, Any], version: int, binary: str) -> dict[str, Any]:
    """The fcsp runtime: runc's shim running fcsp-runtime, with runc's own scalar options
    (SystemdCgroup above all: the kubelet's cgroup driver must match)."""
    runc_options = _dig(doc, (*runtimes_path(version), "runc", "options"))
    options: dict[str, Any] = {"BinaryName": binary}
    if isinstance(runc_options, dict):
        options.update(
            (k, v)
            for k, v in runc_options.items()
            if k != "BinaryName" and isinstance(v, (bool, int, str))
        )
    return {
        "runtime_type": CONTAINERD_SHIM,
        "pod_annotations": list(POD_ANNOTATIONS),
        "options": options,
    }


def containerd_block(version: int, entry: Mapping[str, Any]) -> str:
    table = ".".join(_toml_key(p) for p in (*runtimes_path(version), RUNTIME_NAME))
    lines = [BEGIN_MARK, f"[{table}]"]
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


def containerd_uninstall(text: str | None) -> tuple[str | None, tuple[str, ...]]:
    """The user's text without our block (and the blank line we put before it)."""
    notes = ("run `systemctl restart containerd`",)
    if text is None:
        return None, notes
    return _BLOCK_RE.sub("", text), notes


def containerd_install(
    text: str | None, binary: str, wanted_version: int | None = None
) -> tuple[str | None, tuple[str, ...]]:
    """The user's text with our block replaced in place, or appended; refuses a file that
    already defines runtimes.fcsp itself (that table can be defined only once)."""
    base = containerd_uninstall(text)[0] or ""
    doc = _parse_toml(base, "containerd config.toml")
    version = _version(doc, wanted_version)
    entry = containerd_entry(doc, version, binary)
    table = ".".join((*runtimes_path(version), RUNTIME_NAME))
    theirs = _dig(doc, (*runtimes_path(version), RUNTIME_NAME))
    if theirs is not None:
        if _dig(theirs, ("options", "BinaryName")) == binary:
            return text, ("containerd already has a runtime named fcsp running fcsp-runtime",)
        raise EngineError(
            f"containerd config.toml already defines {table} (not fcspctl's block): "
            f"remove it, or set its options.BinaryName = {binary!r} by hand"
        )
    block = containerd_block(version, entry)
    match = _BLOCK_RE.search(text or "")
    if text is not None and match:
        lead = "\n" if match.group(0).startswith("\n") else ""
        new = text[: match.start()] + lead + block + text[match.end() :]
    else:
        # An empty file (comments at most) has no table yet: a top-level version goes first.
        head = base + ("" if not base or base.endswith("\n") else "\n")
        new = head + (f"version = {version}\n" if not doc else "") + "\n" + block
    # The user's file may hold runtimes as an inline table or dotted keys, which a new
    # [..runtimes.fcsp] section cannot extend: check the result rather than guess.
    try:
        check = _dig(tomllib.loads(new), runtimes_path(version))
        problem = "" if isinstance(check, dict) and check.get(RUNTIME_NAME) == entry else "?"
    except tomllib.TOMLDecodeError as exc:
        problem = str(exc)
    if problem:
        raise EngineError(
            f"cannot add [{table}] safely (the result would not read back: {problem}); "
            "add it by hand"
        )
    notes = (
        "run `systemctl restart containerd`; Kubernetes: kubectl apply -f "
        "etc/kubernetes/runtimeclass.yaml, then runtimeClassName: fcsp in the pod",
    )
    return new, notes


# ---- I/O ----------------------------------------------------------------------------------------


def default_file(engine: str) -> Path:
    return {"docker": DOCKER_CONFIG, "containerd": CONTAINERD_CONFIG}.get(engine, HOOKS_FILE)


def target(engine: str, settings: Settings) -> Path:
    """The engine's file under settings.root."""
    path = settings.file or default_file(engine)
    return settings.root / path.relative_to("/") if path.is_absolute() else settings.root / path


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


def plan(engine: str, action: str, settings: Settings) -> Change:
    """What install or uninstall would do to the engine's file; nothing is written."""
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if settings.default_runtime and engine != "docker":
        raise EngineError("--default-runtime is for docker only (Kubernetes: a RuntimeClass)")
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
        elif engine == "containerd":
            if action == "install":
                wanted = settings.containerd_version
                if wanted is None and (old is None or not old.strip()):
                    wanted = containerd_config_version()
                new, notes = containerd_install(old, settings.runtime_path, wanted)
            else:
                new, notes = containerd_uninstall(old)
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
