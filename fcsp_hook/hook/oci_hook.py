"""fcsp-hook: the OCI hook.  `prestart` gives a container its slot and the shim;
`poststop` removes the slot; `oci` picks one of the two from the state's status (so
one hooks.d entry serves both stages).

    fcsp-hook [--config PATH] prestart|poststop|oci    (OCI state on stdin)

This runs on every container start, so it imports only what the stage needs: the
poststop path never loads the prestart machinery.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fcsp_hook import config, oci
from fcsp_hook.errors import FcspError, HookError, one_line
from fcsp_hook.log import HookLogger

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

STAGES = ("prestart", "poststop", "oci")
PRESTART_STATUSES = {"creating", "created"}
POSTSTOP_STATUSES = {"stopped"}
USAGE = "usage: fcsp-hook [--config PATH] prestart|poststop|oci  (OCI state on stdin)"


def poststop(state: oci.State, cfg: config.Config, log: HookLogger) -> None:
    from fcsp_hook.slot import files  # noqa: PLC0415  # keep the other stage's imports off this path

    removal = files.remove_if_gone(cfg.paths.run_dir, state.id)
    if removal is files.Removal.REMOVED:
        log.info("tenant slot removed")
    elif removal is files.Removal.RUNNING:
        log.info("tenant slot kept: its container runs again under the same id")
    elif removal is files.Removal.FAILED:
        log.warning("tenant slot could not be removed; the observer will reap it")
    else:
        log.info("no tenant slot to remove")


def _parse_args(argv: list[str]) -> tuple[Path, str] | None:
    """[--config PATH] STAGE; argparse alone would add a few ms to every container start."""
    config_path = config.DEFAULT_PATH
    if len(argv) == 3 and argv[0] == "--config":
        config_path, argv = Path(argv[1]), argv[2:]
    if len(argv) != 1 or argv[0] not in STAGES:
        return None
    return config_path, argv[0]


def _stage_for(requested: str, status: str) -> str:
    if requested != "oci":
        return requested
    if status in PRESTART_STATUSES:
        return "prestart"
    if status in POSTSTOP_STATUSES:
        return "poststop"
    raise HookError(f"OCI state status {status!r} is neither creating/created nor stopped")


def is_removal(argv: list[str], raw_state: bytes) -> bool:
    """These arguments and this state make a poststop: it never fails a container's
    removal, so fcsp-hookd can let the engine go on before the slot is removed."""
    args = _parse_args(argv)
    if args is None:
        return False
    try:
        status = oci.parse_state(raw_state).status
    except FcspError:
        return False
    return args[1] == "poststop" or (args[1] == "oci" and status in POSTSTOP_STATUSES)


def run(stage: str, raw_state: bytes, cfg: config.Config, log: HookLogger) -> int:
    state = oci.parse_state(raw_state)
    log.bind(container_id=state.id)
    stage = _stage_for(stage, state.status)
    log.bind(stage=stage)
    if stage == "poststop":
        try:
            poststop(state, cfg, log)
        except (FcspError, OSError) as exc:
            log.warning(
                "poststop could not remove the slot; the observer will reap it", error=str(exc)
            )
        return EXIT_OK  # poststop must never fail a container's removal
    from fcsp_hook.hook import prestart  # noqa: PLC0415  # the heavy stage, loaded only when run

    prestart.prestart(state, cfg, log)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if args is None:
        print(USAGE, file=sys.stderr)
        return EXIT_USAGE
    config_path, stage = args
    log = HookLogger(path=None)
    fail_open = False
    try:
        cfg = config.load(config_path)
        log = HookLogger(path=cfg.hook.log_file)
        fail_open = cfg.hook.failure_policy == config.FAIL_OPEN
        return run(stage, sys.stdin.buffer.read(oci.MAX_STATE_BYTES + 1), cfg, log)
    except FcspError as exc:
        log.error(one_line(str(exc)), failure_policy="fail-open" if fail_open else "fail-closed")
    except Exception as exc:  # a bug: say so in one line, keep the traceback in the log
        import traceback  # noqa: PLC0415  # only on this rare path

        log.error(
            one_line(f"internal error: {type(exc).__name__}: {exc}"),
            traceback=traceback.format_exc(),
        )
    # poststop must never fail a container's removal; the observer reaps what it missed.
    return EXIT_OK if fail_open or stage == "poststop" else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
