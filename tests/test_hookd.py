"""fcsp-hookd and the native client the hooks.d entry runs: a container start asks the
running service; when it is down, dies mid-request or answers garbage, the client runs the
Python hook itself, so every container still starts with its limits (or is refused with
its one line) and its slot is still removed."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcsp_hook import procfs
from fcsp_hook.hook import server
from fcsp_hook.slot import abi, files
from tests.containers import GLIBC_IN_ROOTFS, HookServer, HookSetup, podman
from tests.test_observer import wait_for

pytestmark = pytest.mark.e2e

GPU = {"NVIDIA_VISIBLE_DEVICES": "0"}
FCSP = {"fcsp.sm": "40", "fcsp.mem": "8G"}
PRELOAD = [str(GLIBC_IN_ROOTFS), "/etc/ld.so.preload"]


@pytest.fixture
def hookd(hook: HookSetup, hook_python: Path) -> Iterator[HookServer]:
    running = HookServer(hook).start(hook_python)
    yield running
    running.stop()


def _no_fallback(hook: HookSetup) -> None:
    """The entry's Python hook replaced by a command that fails: what works, the service did."""
    path = hook.hooks_dir / "fcsp.json"
    entry = json.loads(path.read_text())
    args = entry["hook"]["args"]
    entry["hook"]["args"] = [*args[: args.index("--") + 1], "/bin/false"]
    path.write_text(json.dumps(entry))


def _waiting(path: Path) -> int:
    """Connections waiting to be accepted on a listening socket (ss's Recv-Q)."""
    argv = ["ss", "-xlH", "src", str(path)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    fields = out.stdout.split()
    return int(fields[2]) if len(fields) > 2 else 0


def _run_with_limits(hook: HookSetup, rootfs: Path) -> subprocess.CompletedProcess[str]:
    """A container with fcsp annotations that prints what its ld.so.preload says."""
    return podman(hook, rootfs, PRELOAD, FCSP, GPU)


def test_a_start_is_served_by_fcsp_hookd(hook: HookSetup, rootfs: Path, hookd: HookServer) -> None:
    """The container gets its shim through the running service and its slot is removed at
    the end: both stages served (the entry's Python hook would fail)."""
    _no_fallback(hook)
    result = _run_with_limits(hook, rootfs)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "/run/fcsp/libvgpu.so\n"
    # The removal is answered at once and done just after.
    wait_for("the slot's removal", lambda: hook.slots() == [])
    wait_for("its log line", lambda: "tenant slot removed" in _events(hook))
    assert "tenant slot ready" in _events(hook)
    assert hookd.proc is not None and hookd.proc.poll() is None


def _events(hook: HookSetup) -> list[object]:
    return [r.get("event") for r in hook.log_records()]


def test_a_restart_under_the_same_id_keeps_its_new_slot(
    hook: HookSetup, rootfs: Path, hookd: HookServer
) -> None:
    """`podman restart` reuses the container's id: the first run's removal, answered at
    once and done after, never takes the second run's slot (whose init it sees alive)."""
    name = f"fcsp-restart-{uuid.uuid4().hex[:8]}"
    started = podman(hook, rootfs, ["/bin/sleep", "600"], FCSP, GPU, extra=("-d", "--name", name))
    assert started.returncode == 0, started.stderr
    try:
        (slot,) = hook.slots()
        first = files.read_limits(slot / abi.LIMITS_FILE).init_host_pid
        restarted = subprocess.run(
            ["podman", "--hooks-dir", str(hook.hooks_dir), "restart", "-t", "0", name],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert restarted.returncode == 0, restarted.stderr
        wait_for(
            "the first run's removal to be decided",
            lambda: any(
                e in _events(hook)
                for e in (
                    "tenant slot kept: its container runs again under the same id",
                    "tenant slot removed",
                )
            ),
        )
        (slot,) = hook.slots()
        second = files.read_limits(slot / abi.LIMITS_FILE).init_host_pid
        assert second != first
        assert procfs.process_alive(second, 0)
    finally:
        subprocess.run(
            ["podman", "--hooks-dir", str(hook.hooks_dir), "rm", "-f", "-t", "0", name],
            capture_output=True,
            check=False,
        )
    wait_for("the slot's removal", lambda: hook.slots() == [])


def test_a_bad_annotation_is_refused_with_its_line_through_the_service(
    hook: HookSetup, rootfs: Path, hookd: HookServer
) -> None:
    """The service's answer is final: its refusal reaches podman in one line."""
    _no_fallback(hook)
    result = podman(hook, rootfs, ["/bin/true"], {"fcsp.sm": "abc"}, GPU)
    assert result.returncode != 0
    assert 'annotation fcsp.sm="abc" is invalid' in result.stderr
    assert hook.slots() == []


def test_without_the_service_the_python_hook_does_the_work(hook: HookSetup, rootfs: Path) -> None:
    """No fcsp-hookd (no socket): the same container, the same shim, the same removal."""
    assert not (hook.run_dir / "hook.sock").exists()
    result = _run_with_limits(hook, rootfs)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "/run/fcsp/libvgpu.so\n"
    assert hook.slots() == []


def test_a_service_killed_mid_request_leaves_the_work_to_the_python_hook(
    hook: HookSetup, rootfs: Path, hookd: HookServer
) -> None:
    """The service stopped (SIGSTOP), the start's request waiting in its socket, then
    killed: the client gets no answer and runs the Python hook, which gives the container
    its limits."""
    assert hookd.proc is not None
    hookd.proc.send_signal(signal.SIGSTOP)
    started = threading.Event()

    def kill_once_asked() -> None:
        started.wait(timeout=60)
        wait_for("a request waiting", lambda: _waiting(hookd.socket) > 0)
        hookd.stop()

    killer = threading.Thread(target=kill_once_asked)
    killer.start()
    try:
        name = f"fcsp-hookd-{uuid.uuid4().hex[:8]}"
        run = subprocess.Popen(
            [
                "podman",
                "--hooks-dir",
                str(hook.hooks_dir),
                "run",
                "--rm",
                "--name",
                name,
                "--runtime",
                "runc",
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=4096:4096",
                *[f"--annotation={k}={v}" for k, v in FCSP.items()],
                "-e",
                "NVIDIA_VISIBLE_DEVICES=0",
                "--rootfs",
                str(rootfs),
                *PRELOAD,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.set()
        out, err = run.communicate(timeout=120)
    finally:
        started.set()
        killer.join()
    assert run.returncode == 0, err
    assert out == "/run/fcsp/libvgpu.so\n"
    assert hook.slots() == []


def test_garbage_on_the_socket_leaves_the_work_to_the_python_hook(
    hook: HookSetup, rootfs: Path
) -> None:
    """Something else answers on the service's socket: the client does not trust it."""
    hook.run_dir.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(hook.run_dir / "hook.sock"))
    listener.listen(8)
    answered = threading.Event()

    def answer_garbage() -> None:
        listener.settimeout(60)
        while not answered.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        result = _run_with_limits(hook, rootfs)
    finally:
        answered.set()
        listener.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == "/run/fcsp/libvgpu.so\n"
    assert hook.slots() == []


@pytest.mark.parametrize(
    ("request_bytes", "accepted"),
    [
        (b"FCSP-HOOK 1\n--config\n/c.toml\noci\n\n{}", (["--config", "/c.toml", "oci"], b"{}")),
        (b"FCSP-HOOK 1\n\n", ([], b"")),
        (b"FCSP-HOOK 2\noci\n\n{}", None),  # another protocol
        (b"GET / HTTP/1.1\r\n\r\n", None),
        (b"FCSP-HOOK 1\noci", None),  # arguments never ended
        (
            b"FCSP-HOOK 1\n" + b"x\n" * server.MAX_ARGUMENTS + b"\n",
            (["x"] * server.MAX_ARGUMENTS, b""),
        ),
        (b"FCSP-HOOK 1\n" + b"x\n" * (server.MAX_ARGUMENTS + 1) + b"\n", None),  # too many
    ],
)
def test_requests_are_read_strictly(
    request_bytes: bytes, accepted: tuple[list[str], bytes] | None
) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(request_bytes)
        a.shutdown(socket.SHUT_WR)
        if accepted is None:
            with pytest.raises(server.BadRequest):
                server.read_request(b)
        else:
            assert server.read_request(b) == accepted
