"""fcspctl: look at and check an FCSP host.

fcspctl status [--json]     tenants, their GPUs, shares and memory (from /run/fcsp)
fcspctl top                 the same, refreshed live
fcspctl set CONTAINER ...   resize a running tenant (--sm, --mem, --mode, --priority)
fcspctl check-config [PATH] validate config.toml
fcspctl doctor              is this host set up right?
fcspctl install --engine E  configure docker|podman|containerd|crio for FCSP (--dry-run)
fcspctl uninstall --engine E
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fcsp_hook import annotations as ann
from fcsp_hook import config
from fcsp_hook.ctl.doctor import cmd_doctor
from fcsp_hook.ctl.resize import cmd_set
from fcsp_hook.ctl.status import cmd_status, cmd_top
from fcsp_hook.errors import FcspError, one_line


def cmd_check_config(cfg: config.Config, args: argparse.Namespace) -> int:
    if not args.config.is_file():
        print(f"fcspctl: {args.config} does not exist (the defaults apply)", file=sys.stderr)
        return 1
    print(f"{args.config}: ok")
    return 0


def _engine_change(args: argparse.Namespace, action: str) -> int:
    from fcsp_hook.ctl import engines  # noqa: PLC0415  # only install/uninstall need it

    settings = engines.Settings(
        root=args.root,
        runtime_path=args.runtime_path,
        config_path=args.config,
        default_runtime=getattr(args, "default_runtime", False),
        file=args.file,
        containerd_version=getattr(args, "containerd_version", None),
    )
    change = engines.plan(args.engine, action, settings)
    if not change.changed:
        print(f"{change.path}: already {'configured' if action == 'install' else 'clean'}")
    elif args.dry_run:
        sys.stdout.write(engines.diff(change))
        print(f"(dry run: {change.path} not written)")
    else:
        backup = engines.apply(change)
        verb = "removed" if change.new is None else "wrote"
        print(f"{verb} {change.path}" + (f" (backup: {backup})" if backup else ""))
    if change.changed and not args.dry_run:
        for note in change.notes:
            print(f"note: {note}")
    return 0


def cmd_install(cfg: config.Config, args: argparse.Namespace) -> int:
    return _engine_change(args, "install")


def cmd_uninstall(cfg: config.Config, args: argparse.Namespace) -> int:
    return _engine_change(args, "uninstall")


COMMANDS: dict[str, Callable[[config.Config, argparse.Namespace], int]] = {
    "status": cmd_status,
    "top": cmd_top,
    "set": cmd_set,
    "check-config": cmd_check_config,
    "doctor": cmd_doctor,
    "install": cmd_install,
    "uninstall": cmd_uninstall,
}


def _engine_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    parser.add_argument(
        "--engine", required=True, choices=("docker", "podman", "containerd", "crio")
    )
    parser.add_argument("--dry-run", action="store_true", help="print the change as a diff")
    parser.add_argument("--root", type=Path, default=Path("/"), help="prefix of every file")
    parser.add_argument("--file", type=Path, help="the engine's file, if not the usual one")
    parser.add_argument(
        "--runtime-path", default="/usr/local/bin/fcsp-runtime", help="fcsp-runtime's path"
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcspctl", description="Look at and check an FCSP host.")
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH, help="config.toml path")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="tenants, GPUs, shares and memory")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    top = sub.add_parser("top", help="status, refreshed live")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    top.add_argument("--count", type=int, default=None, help="stop after this many frames")
    resize = sub.add_parser("set", help="resize a running tenant (takes effect within a tick)")
    resize.add_argument("container", help="container id, unique id prefix, or tenant name")
    resize.add_argument("--sm", help=f"compute share: {ann.SM_FORM}")
    resize.add_argument("--mem", help=f"memory quota: {ann.MEM_FORM}")
    resize.add_argument("--mode", help=f"isolation mode: {ann.MODE_FORM}")
    resize.add_argument("--priority", help=f"priority: {ann.PRIORITY_FORM}")
    resize.add_argument("--device", type=int, help="only the i-th GPU the container sees")
    check = sub.add_parser("check-config", help="validate config.toml")
    check.add_argument("path", nargs="?", type=Path, help="file to check (default: --config)")
    sub.add_parser("doctor", help="is this host set up right?")
    install = _engine_parser(sub, "install", "configure a container engine for FCSP")
    install.add_argument(
        "--default-runtime", action="store_true", help="docker: make fcsp the default runtime"
    )
    install.add_argument(
        "--containerd-version",
        type=int,
        choices=(2, 3),
        help="config version for a new containerd file (default: from `containerd --version`)",
    )
    _engine_parser(sub, "uninstall", "undo `fcspctl install` for an engine")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "path", None):
        args.config = args.path
    try:
        cfg = config.load(args.config)
        return COMMANDS[args.command](cfg, args)
    except FcspError as exc:
        print(f"fcspctl: {one_line(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
