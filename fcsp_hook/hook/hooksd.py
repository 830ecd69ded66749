"""The hooks.d entry (podman, CRI-O), generated here so it is never edited by hand.

    python -m fcsp_hook.hook.hooksd --python /usr/bin/python3 \
        [--client /usr/local/lib/fcsp/fcsp-hook] > /usr/share/containers/oci/hooks.d/fcsp.json

With --client the entry runs the native client (hookc/fcsp-hook.c), which hands the work
to fcsp-hookd and runs the Python hook itself only when fcsp-hookd cannot answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fcsp_hook import config
from fcsp_hook.errors import FcspError

HOOKS_VERSION = "1.0.0"
HOOKD_SOCKET = "hook.sock"  # fcsp-hookd's, under [paths] run_dir
# hooks.d regexes are unanchored: "fcsp\\." alone would also match "xfcsp.sm".
ANNOTATION_PATTERN = r"^fcsp\."
# The hook never inherits the container's (or the engine's) environment.
HOOK_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8")


# Where an interpreter imports fcsp_hook from (the directory holding the package).
_PACKAGE_QUERY = (
    "import os, fcsp_hook; print(os.path.dirname(os.path.dirname(os.path.abspath("
    "fcsp_hook.__file__))))"
)


def package_dir(python: str) -> str | None:
    """The directory `python` imports fcsp_hook from, or None when it cannot be asked
    (a package staged with DESTDIR, whose interpreter does not exist yet)."""
    if python == sys.executable:
        return str(Path(__file__).resolve().parents[2])
    import subprocess  # noqa: PLC0415  # install time only

    try:
        done = subprocess.run(  # the interpreter the operator named
            [python, "-I", "-c", _PACKAGE_QUERY],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = done.stdout.strip()
    return found if found.startswith("/") and "\n" not in found else None


_RUN = "from fcsp_hook.hook.oci_hook import main; sys.exit(main())"


def import_probe(args: list[str]) -> list[str]:
    """A hooks.d entry's command with the hook's work replaced by importing it: run by
    `fcspctl doctor` to prove the entry finds its package the way the hook will."""
    if "-c" in args[:-1]:
        at = args.index("-c")
        return [*args[: at + 1], args[at + 1].replace(_RUN, "import fcsp_hook.hook.oci_hook")]
    return [args[0], "-I", "-c", "import fcsp_hook.hook.oci_hook"]


def hook_command(python: str, package: str | None) -> list[str]:
    """The hook's argv up to its own arguments.

    argv[0] is the full path: Python finds its prefix from it.  -I: isolated mode, so
    PYTHONPATH, PYTHONHOME and user site-packages are ignored.  With the package's
    directory known, -S as well: `site` (and every .pth file of the environment) costs
    tens of milliseconds per start, twice per container; the hook needs only the
    standard library and its own package.
    """
    if package is None:
        return [python, "-I", "-m", "fcsp_hook.hook.oci_hook"]
    boot = f"import sys; sys.path.insert(0, {package!r}); {_RUN}"
    return [python, "-I", "-S", "-c", boot]


def hook_entry(
    python: str, config_path: Path, package: str | None = None, client: str | None = None
) -> dict[str, object]:
    arguments = ["--config", str(config_path), "oci"]
    command = [*hook_command(python, package), *arguments]
    if client is not None:
        socket = str(config.load(config_path).paths.run_dir / HOOKD_SOCKET)
        command = [client, "--socket", socket, *arguments, "--", *hook_command(python, package)]
    return {
        "version": HOOKS_VERSION,
        "hook": {
            "path": command[0],
            "args": command,
            "env": list(HOOK_ENV),
            "timeout": 10,
        },
        "when": {"annotations": {ANNOTATION_PATTERN: ".*"}},
        "stages": ["prestart", "poststop"],
    }


def render(python: str, config_path: Path, client: str | None = None) -> str:
    entry = hook_entry(python, config_path, package_dir(python), client)
    return json.dumps(entry, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcsp_hook.hook.hooksd", description=__doc__)
    parser.add_argument(
        "--python", default="/usr/bin/python3", help="interpreter that has fcsp_hook"
    )
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH, help="config.toml path")
    parser.add_argument("--client", help="the native client that asks fcsp-hookd first")
    args = parser.parse_args(argv)
    for name in ("python", "client"):
        value = getattr(args, name)
        if value is not None and not value.startswith("/"):
            print(f"fcsp: --{name} must be an absolute path", file=sys.stderr)
            return 2
    try:
        sys.stdout.write(render(args.python, args.config, args.client))
    except FcspError as exc:
        print(f"fcsp: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
