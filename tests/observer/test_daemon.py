"""observer.daemon: the loop runs each duty when it is due, in order; reloads keep the
running config when the new one is bad; a clean exit lets every duty go, then the slots;
sd_notify speaks the protocol.  (The daemon as a process: tests/test_observer.py.)"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from fcsp_hook import config
from fcsp_hook.errors import ConfigError
from fcsp_hook.observer import daemon, notify
from fcsp_hook.observer.state import Duty, HostState
from tests.observer.scene import MS


class Recorded(Duty):
    """A duty that notes when it ran (and stopped) in a shared journal."""

    def __init__(self, name: str, period_ns: int, journal: list[tuple[str, int]]) -> None:
        self.name, self.period, self.journal = name, period_ns, journal

    def period_ns(self, state: HostState) -> int:
        return self.period

    def run(self, state: HostState, now_ns: int) -> None:
        self.journal.append((self.name, now_ns))

    def stop(self, state: HostState) -> None:
        self.journal.append((f"stop {self.name}", 0))


def _observer(tmp_path: Path, env: dict[str, str] | None = None) -> daemon.Observer:
    path = tmp_path / "config.toml"
    path.write_text(f'[paths]\nrun_dir = "{tmp_path / "run"}"\n[observer]\nmetrics_port = 0\n')
    return daemon.Observer(
        config.load(path), path, daemon.configure_logging(), notify.Notifier({}), env=env or {}
    )


def test_duties_run_when_due_in_order(tmp_path: Path) -> None:
    observer = _observer(tmp_path)
    journal: list[tuple[str, int]] = []
    observer.duties = [Recorded("every tick", 10 * MS, journal), Recorded("slow", 25 * MS, journal)]
    observer.next_ns = [0, 0]
    for now in (0, 10, 20, 30, 40, 50):
        observer.tick(now * MS)
    assert journal == [
        ("every tick", 0), ("slow", 0),
        ("every tick", 10 * MS), ("every tick", 20 * MS),
        ("every tick", 30 * MS), ("slow", 30 * MS),
        ("every tick", 40 * MS), ("every tick", 50 * MS),
    ]  # fmt: skip
    assert observer.state.ticks == 6
    journal.clear()
    observer.release()
    assert journal == [("stop every tick", 0), ("stop slow", 0)]


def test_the_duties_of_a_tick_and_their_order() -> None:
    """Tenants are sampled before their memory is rated and shares are decided;
    publishing comes last."""
    names = [d.name for d in daemon.duties(notify.Notifier({}), daemon.metrics.Metrics())]
    assert names == [
        "tenants",
        "memory",
        "shares",
        "reaper",
        "backends",
        "clocks",
        "crosscheck",
        "backstop",
        "publish",
    ]


def test_a_bad_reload_keeps_the_running_config(tmp_path: Path) -> None:
    observer = _observer(tmp_path)
    running = observer.state.cfg
    observer.config_path.write_text("[observer]\ninterval_ms = 'fast'\n")
    observer.reload()
    assert observer.state.cfg is running
    observer.config_path.write_text(
        f'[paths]\nrun_dir = "{tmp_path / "elsewhere"}"\n[observer]\ninterval_ms = 20\n'
    )
    observer.reload()
    assert observer.state.interval_ns == 20 * MS
    assert observer.state.run_dir == tmp_path / "run"  # run_dir changes need a restart
    observer.release()


def test_interval_override_from_the_environment(tmp_path: Path) -> None:
    """BUD_OBSERVER_INTERVAL_US overrides interval_ms; a bad value is a one-line error."""
    cfg = config.Config()
    assert daemon.interval_ns(cfg, {}) == 50_000_000
    assert daemon.interval_ns(cfg, {"BUD_OBSERVER_INTERVAL_US": "2000"}) == 2_000_000
    with pytest.raises(ConfigError, match="BUD_OBSERVER_INTERVAL_US='fast'"):
        daemon.interval_ns(cfg, {"BUD_OBSERVER_INTERVAL_US": "fast"})
    observer = _observer(tmp_path, {"BUD_OBSERVER_INTERVAL_US": "2000"})
    assert observer.state.interval_ns == 2_000_000
    observer.release()


def test_notify_abstract_socket_and_watchdog_settings() -> None:
    """'@name' is the abstract namespace; WATCHDOG_USEC for another pid is ignored."""
    name = f"fcsp-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(10)
    try:
        n = notify.Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000"})
        assert n.enabled and n.watchdog_ns == 3_000_000_000
        assert n.ready("2 tenants on 1 GPU, contention 0.10")
        assert server.recv(4096) == b"READY=1\nSTATUS=2 tenants on 1 GPU, contention 0.10"
        n.close()
    finally:
        server.close()
    other = notify.Notifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_ns == 0 and not other.enabled and not other.status("x")
