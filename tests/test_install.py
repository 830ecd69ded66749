"""`make install` / `make uninstall` with DESTDIR: what lands where, and that uninstall takes
it all back but the operator's config.toml.  DESTDIR stages files only, so this runs
without touching the machine's own installation."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _make(target: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "-C", str(REPO), target, f"DESTDIR={dest}", "PREFIX=/usr/local"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _files(root: Path) -> set[str]:
    return {
        "/" + str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()
    }


def test_install_and_uninstall_with_destdir(tmp_path: Path) -> None:
    """install stages the library, the commands, config.toml, the hooks.d entry (the native
    client, naming FCSP's venv interpreter, isolated, for when fcsp-hookd cannot answer)
    and the systemd units; uninstall removes all of it except config.toml, which holds the
    operator's settings."""
    dest = tmp_path / "dest"
    installed = _make("install", dest)
    assert installed.returncode == 0, installed.stderr
    assert _files(dest) == {
        "/usr/local/lib/fcsp/libvgpu.so",
        "/usr/local/lib/fcsp/fcsp-hook",
        "/usr/local/lib/fcsp/fcsp-runtime.py",
        "/usr/local/bin/fcsp-hook",
        "/usr/local/bin/fcspctl",
        "/usr/local/bin/fcsp-runtime",
        "/etc/fcsp/config.toml",
        "/usr/share/containers/oci/hooks.d/fcsp.json",
        "/etc/systemd/system/fcsp-observer.service",
        "/etc/systemd/system/fcsp-hookd.service",
        "/etc/systemd/system/fcsp-hookd.socket",
    }
    entry = json.loads((dest / "usr/share/containers/oci/hooks.d/fcsp.json").read_text())
    args = entry["hook"]["args"]
    assert entry["hook"]["path"] == args[0] == "/usr/local/lib/fcsp/fcsp-hook"
    assert args[args.index("--") + 1 :][:2] == ["/opt/fcsp/venv/bin/python3", "-I"]
    assert (dest / "etc/fcsp/config.toml").read_text() == (REPO / "etc/config.toml").read_text()

    removed = _make("uninstall", dest)
    assert removed.returncode == 0, removed.stderr
    assert _files(dest) == {"/etc/fcsp/config.toml"}


def test_install_keeps_an_existing_config(tmp_path: Path) -> None:
    """An operator's config.toml is never overwritten by a later install."""
    dest = tmp_path / "dest"
    mine = dest / "etc/fcsp/config.toml"
    mine.parent.mkdir(parents=True)
    mine.write_text('[defaults]\nmode = "strict"\n')
    assert _make("install", dest).returncode == 0
    assert mine.read_text() == '[defaults]\nmode = "strict"\n'
