"""The hooks.d entry (podman, CRI-O), generated here so it is never edited by hand.

`python -m fcsp_hook.hooksd --python /usr/bin/python3 > /usr/share/containers/oci/hooks.d/fcsp.json`
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fcsp_hook import config

HOOKS_VERSION = "1.0.0"
# hooks.d regexes are unanchored: "fcsp\\." alone would also match "xfcsp.sm".
ANNOTATION_PATTERN = r"^fcsp\."
# The hook never inherits the container's (or the engine's) environment.
HOOK_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8")


def hook_entry(python: str, config_path: Path) -> dict[str, object]:
    return {
        "version": HOOKS_VERSION,
        "hook": {
            "path": python,
            # argv[0] is the full path: Python finds its prefix (and site-packages) from it.
            # -I: isolated mode, so PYTHONPATH, PYTHONHOME and user site-packages are ignored.
            "args": [
                python,
                "-I",
                "-m",
                "fcsp_hook.hook",
                "--config",
                str(config_path),
                "oci",
            ],
            "env": list(HOOK_ENV),
            "timeout": 10,
        },
        "when": {"annotations": {ANNOTATION_PATTERN: ".*"}},
        "stages": ["prestart", "poststop"],
    }


def render(python: str, config_path: Path) -> str:
    return json.dumps(hook_entry(python, config_path), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcsp_hook.hooksd", description=__doc__)
    parser.add_argument(
        "--python", default="/usr/bin/python3", help="interpreter that has fcsp_hook"
    )
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH, help="config.toml path")
    args = parser.parse_args(argv)
    if not args.python.startswith("/"):
        print("fcsp: --python must be an absolute path", file=sys.stderr)
        return 2
    sys.stdout.write(render(args.python, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
