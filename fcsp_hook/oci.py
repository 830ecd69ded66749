"""The OCI state (hook stdin) and the few fields of the bundle's config.json we use.

Decoding only; the hook decides what to do with them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcsp_hook.errors import HookError

MAX_STATE_BYTES = 1 << 20
MAX_CONFIG_BYTES = 16 << 20
MAX_ID_CHARS = 1024


@dataclass(frozen=True)
class State:
    id: str
    status: str
    pid: int | None
    bundle: Path | None
    annotations: dict[str, str]


@dataclass(frozen=True)
class Device:
    path: str
    major: int | None
    minor: int | None


@dataclass(frozen=True)
class BundleConfig:
    """What config.json says; every field empty when it could not be read.

    malformed: config.json is there but is not a JSON object we can read (too large,
    not UTF-8, not JSON, nested too deeply); problem says which.
    """

    root: Path | None = None
    env: tuple[str, ...] = ()
    devices: tuple[Device, ...] = ()
    mounts: tuple[str, ...] = ()  # each mount's destination, in the spec's order
    readable: bool = True
    problem: str = ""
    malformed: bool = False


def _loads(raw: bytes, what: str) -> object:
    """json.loads with every way it fails turned into one HookError line naming `what`."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise HookError(
            f"{what} is not UTF-8: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
        ) from None
    except ValueError as exc:  # json.JSONDecodeError, and numbers too long to convert
        raise HookError(f"{what} is not JSON: {exc}") from None
    except RecursionError:  # json raises this, not ValueError, past ~1000 nested levels
        raise HookError(f"{what} is JSON nested too deeply to read") from None


def json_object(raw: bytes, limit: int, what: str) -> dict[str, Any]:
    """raw as a JSON object of at most `limit` bytes; HookError naming `what` otherwise."""
    if len(raw) > limit:
        raise HookError(f"{what} is larger than {limit} bytes")
    doc = _loads(raw, what)
    if not isinstance(doc, dict):
        raise HookError(f"{what} is not a JSON object")
    return doc


def parse_state(raw: bytes) -> State:
    doc = json_object(raw, MAX_STATE_BYTES, "OCI state on stdin")
    cid = doc.get("id")
    if not isinstance(cid, str) or not cid:
        raise HookError("OCI state has no container id")
    if not cid.isprintable() or len(cid) > MAX_ID_CHARS:
        shown = repr(cid) if len(cid) <= MAX_ID_CHARS else f"of {len(cid)} characters"
        raise HookError(f"OCI state id {shown} is not a container id")
    pid = doc.get("pid")
    bundle = doc.get("bundle")
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise HookError("OCI state annotations are not an object")
    return State(
        id=cid,
        status=str(doc.get("status", "")),
        pid=pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None,
        bundle=Path(bundle) if isinstance(bundle, str) and bundle.startswith("/") else None,
        annotations={str(k): str(v) for k, v in annotations.items()},
    )


def _devices(doc: dict[str, Any]) -> tuple[Device, ...]:
    linux = doc.get("linux")
    entries = linux.get("devices") if isinstance(linux, dict) else None
    if not isinstance(entries, list):
        return ()
    found = []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            major, minor = entry.get("major"), entry.get("minor")
            found.append(
                Device(
                    entry["path"],
                    major if isinstance(major, int) else None,
                    minor if isinstance(minor, int) else None,
                )
            )
    return tuple(found)


def _mount_destinations(doc: dict[str, Any]) -> tuple[str, ...]:
    entries = doc.get("mounts")
    if not isinstance(entries, list):
        return ()
    return tuple(
        e["destination"]
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("destination"), str)
    )


def decode_bundle_config(doc: object, bundle: Path) -> BundleConfig:
    if not isinstance(doc, dict):
        return BundleConfig(
            readable=False, problem=f"{bundle}/config.json is not a JSON object", malformed=True
        )
    root = doc.get("root")
    root_path = root.get("path") if isinstance(root, dict) else None
    process = doc.get("process")
    env = process.get("env") if isinstance(process, dict) else None
    return BundleConfig(
        root=(bundle / root_path) if isinstance(root_path, str) and root_path else None,
        env=tuple(e for e in env if isinstance(e, str)) if isinstance(env, list) else (),
        devices=_devices(doc),
        mounts=_mount_destinations(doc),
    )


def read_bundle_config(bundle: Path | None) -> BundleConfig:
    """Read <bundle>/config.json; a missing or malformed one is reported, never raised."""
    if bundle is None:
        return BundleConfig(readable=False, problem="the OCI state names no bundle")
    path = bundle / "config.json"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        return BundleConfig(readable=False, problem=f"cannot read {path}: {exc.strerror}")
    try:
        return decode_bundle_config(json_object(raw, MAX_CONFIG_BYTES, str(path)), bundle)
    except HookError as exc:
        return BundleConfig(readable=False, problem=str(exc), malformed=True)


def env_value(env: tuple[str, ...], name: str) -> str | None:
    """The value of name in an OCI env list; the last definition wins, as in a process's env."""
    value = None
    prefix = name + "="
    for entry in env:
        if entry.startswith(prefix):
            value = entry[len(prefix) :]
    return value
