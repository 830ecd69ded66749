"""fcsp-hookd: the hook's work in a process that is already running.

A container start runs fcsp-hook twice (prestart, poststop).  Started as Python each time,
the interpreter and the hook's imports cost tens of milliseconds a run.  fcsp-hookd imports
them once and serves each run in a fork of itself: the native client the hooks.d entry runs
(hookc/fcsp-hook.c) hands it the OCI state over a Unix socket and prints its answer.  The
fork runs fcsp-hook's own main() with the state as its stdin and a file as its stderr, so
what it does, logs and prints is exactly what the hook process would; the fork is also where
a prestart may enter a container's namespaces, which a multithreaded or long-lived process
must not.

When fcsp-hookd is not running, cannot be reached, dies mid-request or answers garbage, the
client runs the Python hook itself: the same code, the same result, slower.

fcsp-runtime's native launcher (hookc/fcsp-runtime.c) hands it FCSP's creates the same
way (the first argument "runtime-create": runtime.served_create), so that Docker and
containerd starts pay no Python start either.

The protocol, one request per connection (PROTOCOL is the version; both sides check it):

    request   "FCSP-HOOK 1\\n" <argument> "\\n" ... "\\n" <state: the rest, to EOF>
              (the arguments are the hook's own, e.g. --config PATH oci, one per line,
              ended by an empty line; the client shuts its side down after the state)
    reply     "FCSP-HOOK 1 <exit code>\\n" <what the hook printed on stderr>

The socket is the caller's to secure: 0600 root (the hook runs as root), under run_dir.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

from fcsp_hook import config, oci
from fcsp_hook.errors import FcspError
from fcsp_hook.hook import hooksd, oci_hook, runtime

PROTOCOL = b"FCSP-HOOK 1"
MAX_ARGUMENTS = 64  # hookc/hookd.h: HOOKD_MAX_ARGS (a runtime's create has ~20)
MAX_ARGUMENT = 4096
REQUEST_TIMEOUT_S = 8.0  # under the hooks.d entry's own 10 s


class BadRequest(Exception):
    pass


def read_request(conn: socket.socket) -> tuple[list[str], bytes]:
    """The hook's arguments and the OCI state (bounded like the hook's own stdin)."""
    data = b""
    limit = len(PROTOCOL) + 1 + MAX_ARGUMENTS * (MAX_ARGUMENT + 1) + 1 + oci.MAX_STATE_BYTES + 1
    while len(data) < limit:
        chunk = conn.recv(min(65536, limit - len(data)))
        if not chunk:
            break
        data += chunk
    head, sep, rest = data.partition(b"\n")
    if head != PROTOCOL or not sep:
        raise BadRequest("not an fcsp-hook request")
    arguments: list[str] = []
    while True:
        line, sep, rest = rest.partition(b"\n")
        if not sep or len(line) > MAX_ARGUMENT:
            raise BadRequest("malformed arguments")
        if not line:
            return arguments, rest
        if len(arguments) == MAX_ARGUMENTS:
            raise BadRequest("too many arguments")
        arguments.append(line.decode("utf-8", "surrogateescape"))


def answer(conn: socket.socket, code: int, printed: bytes = b"") -> None:
    with contextlib.suppress(OSError):
        conn.sendall(PROTOCOL + f" {code}\n".encode() + printed[:65536])
        conn.shutdown(socket.SHUT_RDWR)  # the client's EOF now, not when this fork is gone


def serve_one(conn: socket.socket) -> None:
    """In the fork: run the hook on the request, send its exit code and stderr back.  A
    removal (poststop) is answered first and done after: it exits 0 whatever happens, and
    the engine need not wait for the slot to go."""
    conn.settimeout(REQUEST_TIMEOUT_S)
    try:
        arguments, state = read_request(conn)
    except (BadRequest, OSError):
        return
    removal = oci_hook.is_removal(arguments, state)
    if removal:
        answer(conn, oci_hook.EXIT_OK)
    stdin = os.memfd_create("fcsp-hook-state", os.MFD_CLOEXEC)
    stderr = os.memfd_create("fcsp-hook-stderr", os.MFD_CLOEXEC)
    os.write(stdin, state)
    os.lseek(stdin, 0, os.SEEK_SET)
    sys.stderr.flush()
    os.dup2(stdin, 0)
    os.dup2(stderr, 2)
    try:
        if arguments[:1] == [runtime.RUNTIME_CREATE]:
            code = runtime.served_create(arguments[1:])
        else:
            code = oci_hook.main(arguments)
    except BaseException:  # whatever happens, the client gets an answer
        code = oci_hook.EXIT_FAILED
    if removal:
        return
    sys.stderr.flush()
    os.lseek(stderr, 0, os.SEEK_SET)
    printed = b""
    while chunk := os.read(stderr, 65536):
        printed += chunk
    answer(conn, code, printed)


def listening_socket(path: Path) -> socket.socket:
    """systemd's socket (socket activation), else one bound at path (0600)."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        return socket.socket(fileno=3)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(64)
    return server


def warm_config(path: Path) -> None:
    """Load the config here, so that the forks find it parsed (config.load keeps the last
    one); a bad one is the fork's to report."""
    with contextlib.suppress(FcspError):
        config.load(path)


def serve(server: socket.socket, config_path: Path) -> None:
    """Accept forever; each connection in a fork (reaped by the kernel)."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    while True:
        try:
            conn, _ = server.accept()
        except InterruptedError:
            continue
        warm_config(config_path)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the hook waits for its own children
            server.close()
            try:
                serve_one(conn)
            finally:
                os._exit(0)
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fcsp-hookd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH, help="config.toml")
    args = parser.parse_args(argv)
    try:
        path = config.load(args.config).paths.run_dir / hooksd.HOOKD_SOCKET
    except FcspError as exc:
        print(f"fcsp-hookd: {exc}", file=sys.stderr)
        return 1
    # What a prestart and the runtime's create need, imported once here rather than in
    # every fork.
    from fcsp_hook import annotations, gpus  # noqa: F401, PLC0415
    from fcsp_hook.hook import prestart  # noqa: F401, PLC0415

    try:
        server = listening_socket(path)
    except OSError as exc:
        print(f"fcsp-hookd: cannot listen on {path}: {exc.strerror}", file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        serve(server, args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
