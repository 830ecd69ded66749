"""fcsp-runtime: an OCI runtime wrapper, FCSP's way into Docker and containerd.

    fcsp-runtime [global flags] COMMAND [flags] [ARGS]     (the runc command line)

Every command goes, unchanged, to the next runtime ([runtime] next in config.toml:
nvidia-container-runtime when it is on PATH, else runc).  Only `create` and `run` of a
bundle whose config.json carries fcsp.* annotations do more first: the annotations are
validated exactly as the hook validates them (a bad one fails `create` with the hook's
one-line message), and FCSP's hook entries (createRuntime and poststop, explicit env,
isolated Python) are added to config.json, atomically, keeping everything else.

This runs on every container start of a Docker host, so the common case (no fcsp.*
annotation) imports os and sys only and never parses JSON or writes anything:
config.json is searched for the bytes `"fcsp.` first.  Everything else is imported on
the FCSP path, inside the functions that need it.
"""

from __future__ import annotations

import os
import sys

from fcsp_hook.errors import ConfigError, FcspError, HookError, one_line
from fcsp_hook.hook.next_runtime import NEXT_AUTO, auto_candidates, parse_next, resolve_next

# Not typing.TYPE_CHECKING: importing typing (15 ms) or json (11 ms, it pulls in re) would
# cost every container start on this path; mypy treats this name the same way.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from fcsp_hook import config as config_mod
    from fcsp_hook.log import HookLogger

CONFIG_ENV = "FCSP_CONFIG"
DEFAULT_CONFIG = "/etc/fcsp/config.toml"
# What the engines' (and systemd's) default PATH holds; used when PATH is unset.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_CONFIG_BYTES = 16 << 20
# Where the native launcher finds the next runtime's candidates (remember_next).
NEXT_RECORDS = "/run/fcsp-runtime"

EXIT_FAILED = 1
EXIT_NOT_FOUND = 127

# The runc/crun command line.  Global flags come before the command; these take a value
# (as "--flag value" or "--flag=value"; Go's flag package accepts one or two dashes).
_GLOBAL_VALUE_FLAGS = frozenset(
    {"root", "log", "log-format", "log-level", "criu", "rootless", "cgroup-manager"}
)
# `create`/`run` flags that take a value; everything else there is boolean.
_CREATE_VALUE_FLAGS = frozenset({"bundle", "b", "console-socket", "pid-file", "preserve-fds"})
_BUNDLE_FLAGS = frozenset({"bundle", "b"})
END_OF_FLAGS = "--"
CREATE_COMMANDS = frozenset({"create", "run"})
# The bytes every fcsp.* annotation key has in config.json (engines never escape ASCII).
_FCSP_KEY_BYTES = b'"fcsp.'
_SCAN_CHUNK = 1 << 20

# Where fcsp-runtime puts the hook: createRuntime runs at prestart's point (namespaces
# made, before pivot_root) and is what podman's hooks.d uses too; prestart is deprecated.
CREATE_STAGE = "createRuntime"
STOP_STAGE = "poststop"
# A hook entry already in config.json counts as FCSP's in either create-time stage.
_CREATE_STAGES = ("prestart", CREATE_STAGE)
# Both the module path hooks.d and this wrapper write now and the one they wrote before
# the hook was a package contain it.
_HOOK_MODULE = "fcsp_hook.hook"


# ---- the command line (pure) ----------------------------------------------------------------


def _flag_name(arg: str) -> tuple[str, bool]:
    """'--bundle=x' -> ('bundle', True): the name, and whether the value is attached."""
    name, sep, _ = arg.lstrip("-").partition("=")
    return name, bool(sep)


def split_command(args: list[str]) -> tuple[str | None, int]:
    """The command and its index in args (None, len(args) when there is none)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == END_OF_FLAGS or not arg.startswith("-"):
            index = i + 1 if arg == END_OF_FLAGS else i
            return (args[index], index) if index < len(args) else (None, len(args))
        name, attached = _flag_name(arg)
        i += 1 if attached or name not in _GLOBAL_VALUE_FLAGS else 2
    return None, len(args)


def global_flag(args: list[str], wanted: str) -> str | None:
    """A global flag's value (before the command), e.g. global_flag(args, 'log')."""
    _, end = split_command(args)
    i = 0
    while i < end:
        name, attached = _flag_name(args[i])
        if name in _GLOBAL_VALUE_FLAGS and not attached and i + 1 < end:
            if name == wanted:
                return args[i + 1]
            i += 2
            continue
        if name == wanted and attached:
            return args[i].partition("=")[2]
        i += 1
    return None


def bundle_of(args: list[str]) -> str | None:
    """The bundle directory of a `create`/`run` (the cwd when not given), else None."""
    command, index = split_command(args)
    if command not in CREATE_COMMANDS:
        return None
    i = index + 1
    while i < len(args) and args[i] != END_OF_FLAGS:
        arg = args[i]
        if not arg.startswith("-"):
            i += 1
            continue
        name, attached = _flag_name(arg)
        if name in _BUNDLE_FLAGS:
            if attached:
                return arg.partition("=")[2]
            return args[i + 1] if i + 1 < len(args) else None
        i += 1 if attached or name not in _CREATE_VALUE_FLAGS else 2
    return "."


def container_id_of(args: list[str]) -> str:
    """The last positional argument of `create`/`run`: the container id ('' if none)."""
    _, index = split_command(args)
    found, i = "", index + 1
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and arg != END_OF_FLAGS:
            name, attached = _flag_name(arg)
            i += 1 if attached or name not in _CREATE_VALUE_FLAGS else 2
            continue
        if arg != END_OF_FLAGS:
            found = arg
        i += 1
    return found


def _quoted(value: str) -> str | None:
    """The text of a plain one-line TOML basic string ("..." without escapes), else None."""
    end = value.find('"', 1)
    if not value.startswith('"') or end < 0 or "\\" in value[:end]:
        return None
    rest = value[end + 1 :].strip()
    return value[1:end] if not rest or rest.startswith("#") else None


def quick_next(text: str) -> str | None:
    """[runtime] next from a config.toml laid out like the shipped one, without the TOML
    parser (its import costs ~20 ms, and the runtime runs 3-4 times per container);
    None when the file is laid out any other way, and tomllib decides."""
    table, found = "", NEXT_AUTO
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if '"""' in line or "'''" in line:
            return None  # a multi-line string could hold a line that looks like a header
        if line.startswith("["):
            table = line.partition("#")[0].strip()
            if "runtime" in table and table != "[runtime]":
                return None  # [[runtime]], [runtime.x], quoted forms
            continue
        key, sep, value = line.partition("=")
        if table != "[runtime]":
            if "runtime" in key:
                return None  # a dotted key (runtime.next = ...) or an inline table
            continue
        if key.strip() != "next" or not sep:
            return None
        value_text = _quoted(value.strip())
        if value_text is None:
            return None
        found = value_text
    return found


def next_setting(config_path: str) -> str:
    """[runtime] next, read without loading (or validating) the rest of config.toml.

    A container without FCSP must not fail because an unrelated key is wrong, so only
    this value is checked here; a missing or unreadable file means "auto".
    """
    try:
        with open(config_path, "rb") as f:
            raw = f.read()
    except OSError:
        return NEXT_AUTO
    if b"runtime" not in raw:
        return NEXT_AUTO
    try:
        quick = quick_next(raw.decode("utf-8"))
    except UnicodeDecodeError:
        quick = None
    if quick is not None:
        return parse_next(quick)
    if sys.version_info >= (3, 11):
        import tomllib  # noqa: PLC0415  # only when the file can name a runtime
    else:  # pragma: no cover - Python 3.10 only
        import tomli as tomllib  # type: ignore[import-not-found]  # noqa: PLC0415

    try:
        table = tomllib.loads(raw.decode("utf-8")).get("runtime", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path}: not valid TOML: {exc}") from exc
    return parse_next(table.get("next", NEXT_AUTO) if isinstance(table, dict) else None)


# ---- config.json: does it ask for FCSP, and adding the hooks (pure) ------------------------


def fcsp_annotations(doc: object) -> dict[str, str]:
    """The spec's annotations when any key is under fcsp., else {}."""
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(annotations, dict):
        return {}
    if not any(isinstance(k, str) and k.startswith("fcsp.") for k in annotations):
        return {}
    return {str(k): str(v) for k, v in annotations.items()}


def is_fcsp_hook(entry: object) -> bool:
    """A hook entry that runs FCSP's hook (ours, or one podman merged from hooks.d)."""
    if not isinstance(entry, dict):
        return False
    path, args = entry.get("path"), entry.get("args")
    if isinstance(path, str) and os.path.basename(path) == "fcsp-hook":
        return True
    # `-m fcsp_hook.hook.oci_hook`, or `-S -c "...from fcsp_hook.hook.oci_hook import main..."`
    return isinstance(args, list) and any(isinstance(a, str) and _HOOK_MODULE in a for a in args)


def with_fcsp_hooks(doc: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """doc with FCSP's hook at createRuntime and poststop, unless one is there already.

    Returns doc itself when nothing is missing, else a copy; unknown fields, other
    hooks and their order are kept (ours go last: nvidia's hook has run by then).
    """
    hooks = doc.get("hooks")
    if hooks is not None and not isinstance(hooks, dict):
        raise HookError("config.json hooks is not an object; refusing to edit it")
    hooks = dict(hooks or {})
    for stage in (*_CREATE_STAGES, STOP_STAGE):
        if not isinstance(hooks.get(stage, []), list):
            raise HookError(f"config.json hooks.{stage} is not a list; refusing to edit it")
    changed = False
    if not any(is_fcsp_hook(h) for stage in _CREATE_STAGES for h in hooks.get(stage, [])):
        hooks[CREATE_STAGE] = [*hooks.get(CREATE_STAGE, []), dict(entry)]
        changed = True
    if not any(is_fcsp_hook(h) for h in hooks.get(STOP_STAGE, [])):
        hooks[STOP_STAGE] = [*hooks.get(STOP_STAGE, []), dict(entry)]
        changed = True
    if not changed:
        return doc
    return {**doc, "hooks": hooks}


def hook_entry(python: str, config_path: str, client: str | None = None) -> dict[str, Any]:
    """The hook entry: the same one the hooks.d file carries (one source: hooksd); with
    client, the native client that asks fcsp-hookd first."""
    from pathlib import Path  # noqa: PLC0415  # the FCSP path only

    from fcsp_hook.hook import hooksd  # noqa: PLC0415

    package = hooksd.package_dir(python)
    hook = hooksd.hook_entry(python, Path(config_path), package, client)["hook"]
    if not isinstance(hook, dict):
        raise HookError("hooksd.hook_entry has no hook object")  # a bug, said in one line
    return hook


# ---- I/O --------------------------------------------------------------------------------------


def read_spec(bundle: str) -> tuple[bytes, bool] | None:
    """config.json's first MAX_CONFIG_BYTES + 1 bytes and whether the file mentions `"fcsp.`
    anywhere, or None when it cannot be read (the next runtime will say why).

    Past the limit the rest is searched too, a chunk at a time: annotations written after
    megabytes of env must not slip by unchecked.
    """
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
            mentions = _FCSP_KEY_BYTES in raw
            tail = raw[1 - len(_FCSP_KEY_BYTES) :]
            while not mentions and len(raw) > MAX_CONFIG_BYTES:
                chunk = f.read(_SCAN_CHUNK)
                if not chunk:
                    break
                mentions = _FCSP_KEY_BYTES in tail + chunk
                tail = chunk[1 - len(_FCSP_KEY_BYTES) :]
            return raw, mentions
    except OSError:
        return None


def write_atomically(path: str, data: bytes) -> None:
    """Replace path with data: a reader sees the old file or the new one, never a mix.

    The temporary file sits next to path (same filesystem) and takes path's mode and
    owner, so the next runtime reads it exactly as it would have read the original.
    """
    st = os.stat(path)
    tmp = f"{path}.fcsp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, st.st_mode & 0o7777)
    try:
        try:
            os.write(fd, data)
            if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
                os.fchown(fd, st.st_uid, st.st_gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        import contextlib  # noqa: PLC0415  # failure path only

        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def runtime_log_line(message: str, log_format: str | None, now: float) -> str:
    """One error line in runc's --log format: containerd shows the last one on failure."""
    import json  # noqa: PLC0415  # error path only
    import time  # noqa: PLC0415

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    if log_format == "json":
        return json.dumps({"level": "error", "msg": message, "time": stamp}) + "\n"
    return f"time={json.dumps(stamp)} level=error msg={json.dumps(message)}\n"


def report_error(message: str, args: list[str]) -> None:
    """To the runtime's --log file, if any (containerd's shim reads the reason there), then
    to stderr (podman and Docker show it).  Either may be unwritable: containerd gives a
    sandbox's create /dev/null opened read-only as stderr."""
    import contextlib  # noqa: PLC0415  # error path only
    import time  # noqa: PLC0415

    message = one_line(message)
    log = global_flag(args, "log")
    if log:
        line = runtime_log_line(
            f"fcsp-runtime: {message}", global_flag(args, "log-format"), time.time()
        )
        with contextlib.suppress(OSError):  # stderr may still reach someone
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
    with contextlib.suppress(OSError):  # nobody to tell: the exit status says it
        os.write(2, f"fcsp-runtime: {message}\n".encode())


# ---- the FCSP path ---------------------------------------------------------------------------


def validate(doc: dict[str, Any], bundle: str, cfg: config_mod.Config) -> str:
    """The hook's own checks, on the spec as the next runtime will see it.

    Returns '' for a container of FCSP's, else why it is not one (a pod's sandbox, no
    GPU): such a container is left untouched and its fcsp.* values are not checked.
    """
    from pathlib import Path  # noqa: PLC0415  # the FCSP path only

    from fcsp_hook import annotations, gpus, oci  # noqa: PLC0415

    wanted = fcsp_annotations(doc)
    sandbox = annotations.sandbox_mark(wanted)
    if sandbox:
        return f"pod sandbox container ({sandbox}); left untouched"
    spec = oci.decode_bundle_config(doc, Path(bundle))
    visible = oci.env_value(spec.env, gpus.VISIBLE_DEVICES)
    uuids = gpus.host_gpu_uuids(cfg.paths.driver_dir)  # as the hook counts them
    found = gpus.discover(visible, spec.devices, spec.mounts, cfg.paths.dev_dir, uuids).gpus
    if not found:
        return "no GPU requested; container left untouched"
    annotations.parse(wanted, len(found), cfg.defaults.mode, cfg.defaults.mem_mode)
    return ""


def prepare_bundle(
    bundle: str, raw: bytes, config_path: str, cfg: config_mod.Config, client: str | None = None
) -> str:
    """Validate and add FCSP's hooks to <bundle>/config.json (run by client when given).
    Returns what was done, as a line for the log."""
    import json  # noqa: PLC0415  # the FCSP path only

    from fcsp_hook import oci  # noqa: PLC0415

    doc = oci.json_object(raw, MAX_CONFIG_BYTES, f"{bundle}/config.json")
    not_ours = validate(doc, bundle, cfg)
    if not_ours:
        return not_ours
    updated = with_fcsp_hooks(doc, hook_entry(sys.executable, config_path, client))
    if updated is doc:
        return "FCSP hooks already present"
    data = json.dumps(updated, ensure_ascii=True, separators=(",", ":")).encode()
    write_atomically(os.path.join(bundle, "config.json"), data)
    return "FCSP hooks added to config.json"


def _log(cfg: config_mod.Config | None, args: list[str], bundle: str) -> HookLogger:
    """The hook's JSON-lines log; stderr is left to report_error (prefix fcsp-runtime)."""
    import io  # noqa: PLC0415  # the FCSP path only

    from fcsp_hook.log import HookLogger  # noqa: PLC0415

    log = HookLogger(path=cfg.hook.log_file if cfg else None, stderr=io.StringIO())
    log.bind(stage="runtime-create", container_id=container_id_of(args), bundle=bundle)
    return log


def fcsp_create(
    bundle: str, raw: bytes, args: list[str], config_path: str, client: str | None
) -> int | None:
    """The FCSP path of `create`: None to go on to the next runtime, else an exit code."""
    from pathlib import Path  # noqa: PLC0415  # the FCSP path only

    from fcsp_hook import config  # noqa: PLC0415

    cfg = None
    details: dict[str, object] = {}
    try:
        cfg = config.load(Path(config_path))
        _log(cfg, args, bundle).info(prepare_bundle(bundle, raw, config_path, cfg, client))
        return None
    except (FcspError, OSError) as exc:
        message = str(exc) if isinstance(exc, FcspError) else f"{bundle}/config.json: {exc}"
    except Exception as exc:  # a bug: one line for the user, the traceback in the log
        import traceback  # noqa: PLC0415  # rare path

        message = f"internal error: {type(exc).__name__}: {exc}"
        details["traceback"] = traceback.format_exc()
    # The hook's failure policy: fail-open starts the container without FCSP.
    fail_open = cfg is not None and cfg.hook.failure_policy == config.FAIL_OPEN
    log = _log(cfg, args, bundle)
    if fail_open:
        log.warning(message, failure_policy=config.FAIL_OPEN, **details)
        return None
    log.error(message, failure_policy=config.FAIL_CLOSED, **details)
    report_error(message, args)
    return EXIT_FAILED


def fcsp_spec(args: list[str]) -> tuple[str, bytes] | None:
    """(bundle, config.json's bytes) when args create a container FCSP must check, else None."""
    bundle = bundle_of(args)
    spec = read_spec(bundle) if bundle is not None else None
    # The fast path: no `"fcsp.` anywhere means no fcsp.* annotation; JSON is not parsed.
    if bundle is None or spec is None or not spec[1]:
        return None
    # A spec that mentions fcsp. but cannot be read (too large, not UTF-8, not JSON,
    # nested too deeply, not an object) may carry fcsp.* annotations: the FCSP path
    # says what is wrong with it, rather than start the container unchecked.
    doc = _loads(spec[0])
    return (bundle, spec[0]) if doc is None or fcsp_annotations(doc) else None


def run(args: list[str], hook_client: str | None = None) -> int:
    """Decide, then exec the next runtime with args unchanged (returns only on failure).
    hook_client: the hook entry FCSP's creates get runs this native client (the installed
    launcher names it), else the Python hook."""
    config_path = os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    create = fcsp_spec(args)
    if create is not None:
        code = fcsp_create(*create, args, config_path, hook_client)
        if code is not None:
            return code
    search_path = os.environ.get("PATH") or DEFAULT_PATH
    config_stat = _stat(config_path)  # before reading it: a later change reads as a change
    try:
        setting = next_setting(config_path)
        target = resolve_next(setting, search_path)
    except ConfigError as exc:
        report_error(str(exc), args)
        return EXIT_FAILED
    if config_stat is not None:
        served = served_by(config_path, hook_client) if create is not None else None
        remember_next(config_path, config_stat, setting, search_path, served)
    launchers = {os.path.realpath(sys.argv[0]), os.environ.get("FCSP_RUNTIME_LAUNCHER")}
    if os.path.realpath(target) in launchers:
        report_error(f"[runtime] next = {target} is fcsp-runtime itself", args)
        return EXIT_FAILED
    try:
        os.execv(target, [target, *args])  # noqa: S606  # the point: become the next runtime
    except OSError as exc:
        report_error(f"cannot run the next runtime {target}: {exc.strerror}", args)
    return EXIT_NOT_FOUND


# ---- FCSP's creates through fcsp-hookd -------------------------------------------------------

RUNTIME_CREATE = "runtime-create"  # the request's first argument (fcsp-hookd's dispatch)


def served_create(request: list[str]) -> int:
    """In a fork of fcsp-hookd: the FCSP part of a create the native launcher hands over,
    `--config PATH --client PATH --cwd DIR -- RUNTIME-ARGS...`.  0: the launcher goes on
    to the next runtime; else the exit code, the reason already on stderr and in --log."""
    fields = request[:7]
    names = fields[0:6:2]
    if names != ["--config", "--client", "--cwd"] or fields[6:] != [END_OF_FLAGS]:
        report_error("fcsp-hookd: malformed runtime-create request", [])
        return EXIT_FAILED
    config_path, client, cwd = fields[1:6:2]
    args = request[7:]
    try:
        os.chdir(cwd)  # the launcher's: a relative bundle or --log is relative to it
    except OSError as exc:
        report_error(f"cannot enter the runtime's directory {cwd}: {exc.strerror}", args)
        return EXIT_FAILED
    create = fcsp_spec(args)
    code = fcsp_create(*create, args, config_path, client) if create is not None else None
    return code or 0


def served_by(config_path: str, hook_client: str | None) -> dict[str, str] | None:
    """For the native launcher's record: fcsp-hookd's socket and the hook client, which it
    hands FCSP's creates to; None without a client (this runtime was not installed with
    one) or a config that cannot be read."""
    if hook_client is None:
        return None
    from pathlib import Path  # noqa: PLC0415  # after an FCSP create only

    from fcsp_hook import config  # noqa: PLC0415
    from fcsp_hook.hook import hooksd  # noqa: PLC0415

    try:
        run_dir = config.load(Path(config_path)).paths.run_dir  # parsed once: the create's
    except FcspError:
        return None
    return {"hookd": str(run_dir / hooksd.HOOKD_SOCKET), "client": hook_client}


def _stat(path: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of config.toml, (0, 0) when there is none; None: unreadable."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0, 0
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def next_record(config_path: str) -> str:
    """Where remember_next leaves the candidates for config_path."""
    return f"{NEXT_RECORDS}/{config_path.replace('/', '%')}"


def remember_next(
    config_path: str,
    config_stat: tuple[int, int],
    setting: str,
    search: str,
    served: dict[str, str] | None = None,
) -> None:
    """Leave the next runtime's candidates, in order, for the native launcher
    (hookc/fcsp-runtime.c), which execs the first executable one itself while config.toml
    is unchanged, and after an FCSP create, served (fcsp-hookd's socket and the hook
    client), which it hands FCSP's creates to; a record of the same config keeps the
    served lines it has.  Best effort: without the record the launcher runs this module."""
    candidates = [setting] if setting != NEXT_AUTO else auto_candidates(search)
    head = f"config {config_stat[0]} {config_stat[1]}\n"
    text = head + "".join(f"next {c}\n" for c in candidates if _plain_path(c))
    path = next_record(config_path)
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read(MAX_RECORD_BYTES)
    except (OSError, UnicodeDecodeError):
        old = ""
    if served is not None:
        text += "".join(f"{key} {value}\n" for key, value in served.items() if _plain_path(value))
    elif old.startswith(head):
        text += "".join(f"{line}\n" for line in old.splitlines() if line.startswith(_SERVED))
    if old == text:
        return
    tmp = f"{path}.{os.getpid()}"
    try:
        os.makedirs(NEXT_RECORDS, mode=0o700, exist_ok=True)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        import contextlib  # noqa: PLC0415  # failure path only

        with contextlib.suppress(OSError):
            os.unlink(tmp)


_SERVED = ("hookd /", "client /")
MAX_RECORD_BYTES = 8192  # the launcher's MAX_CACHE


def _plain_path(path: str) -> bool:
    return path.startswith("/") and "\n" not in path


def _loads(raw: bytes) -> dict[str, object] | None:
    """config.json as a JSON object for the annotation check; None when it is not one."""
    if len(raw) > MAX_CONFIG_BYTES:
        return None
    import json  # noqa: PLC0415  # only when the bytes mention fcsp.

    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return doc if isinstance(doc, dict) else None


def main(argv: list[str] | None = None, hook_client: str | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv, hook_client)


if __name__ == "__main__":
    sys.exit(main())
