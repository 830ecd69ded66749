"""fcsp-observer: the host-wide daemon that shares every GPU among its tenants.

The daemon is a loop over duties (observer.state.Duty), each run when it is due, in this
order within a tick: find and sample tenants, rate their memory pressure, decide shares
and turns (and beat), reap slots of containers that are gone, keep MPS daemons, normalise
clocks, cross-check with NVML, publish.  This module owns the loop: the tick timer,
signals through a self-pipe (SIGHUP reloads config.toml, SIGTERM/SIGINT stop), sd_notify
(READY, WATCHDOG, RELOADING, STOPPING) and the clean exit.

On SIGTERM every tenant's requested share goes back into its slot as the share in force,
with a zero heartbeat ("no observer"), so that the shims run on their requests at once.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import structlog

from fcsp_hook import config, nvml
from fcsp_hook.errors import ConfigError, FcspError
from fcsp_hook.observer import metrics, notify
from fcsp_hook.observer.backends import Backends
from fcsp_hook.observer.backstop import Backstop
from fcsp_hook.observer.clocks import Clocks
from fcsp_hook.observer.crosscheck import CrossCheck
from fcsp_hook.observer.memory import Memory
from fcsp_hook.observer.publish import Publish, status_text
from fcsp_hook.observer.reaper import Reaper
from fcsp_hook.observer.shares import Shares
from fcsp_hook.observer.state import NS_PER_MS, NS_PER_US, Duty, HostState, Logger
from fcsp_hook.observer.tenants import Tenants
from fcsp_hook.slot import files, live

INTERVAL_ENV = "BUD_OBSERVER_INTERVAL_US"


def configure_logging() -> Logger:
    """JSON lines on stderr (journald keeps them), one object per event."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger("fcsp-observer")


def interval_ns(cfg: config.Config, env: dict[str, str]) -> int:
    raw = env.get(INTERVAL_ENV, "")
    if not raw:
        return cfg.observer.interval_ms * NS_PER_MS
    if not raw.isdigit() or not 100 <= int(raw) <= 10_000_000:
        raise ConfigError(
            f"{INTERVAL_ENV}={raw!r} is invalid: expected microseconds from 100 to 10000000"
        )
    return int(raw) * NS_PER_US


def duties(notifier: notify.Notifier, exporter: metrics.Metrics) -> list[Duty]:
    """Every duty, in the order a tick runs them."""
    return [
        Tenants(),
        Memory(),
        Shares(),
        Reaper(),
        Backends(),
        Clocks(),
        CrossCheck(),
        Backstop(),
        Publish(notifier, exporter),
    ]


class Observer:
    def __init__(
        self,
        cfg: config.Config,
        config_path: Path,
        log: Logger,
        notifier: notify.Notifier,
        *,
        nvml_factory: Callable[[], nvml.Nvml] = nvml.Nvml,
        env: dict[str, str] | None = None,
        exporter: metrics.Metrics | None = None,
    ) -> None:
        self.config_path = config_path
        self.notifier = notifier
        self.env = dict(os.environ) if env is None else env
        nv = nvml_factory()
        self.state = HostState(cfg, log, nv, interval_ns(cfg, self.env), gpus=nv.inventory())
        self.duties = duties(notifier, exporter or metrics.Metrics())
        self.next_ns = [0] * len(self.duties)
        self.next_watchdog_ns = 0
        if not nv.available:
            log.info("running without NVML", reason=nv.reason)

    def tick(self, now_ns: int) -> None:
        """Run every duty that is due."""
        state = self.state
        started = live.monotonic_ns()
        state.ticks += 1
        for i, duty in enumerate(self.duties):
            if duty.due(state, now_ns, self.next_ns[i]):
                self.next_ns[i] = now_ns + duty.period_ns(state)
                duty.run(state, now_ns)
        state.tick_ns_total += live.monotonic_ns() - started

    def reload(self) -> None:
        """SIGHUP: a new config.toml, or the old one kept if the new one is bad."""
        state = self.state
        self.notifier.reloading(live.monotonic_ns() // NS_PER_US)
        try:
            new = config.load(self.config_path)
            new_interval = interval_ns(new, self.env)
        except ConfigError as exc:
            state.log.error("config reload rejected; keeping the running config", error=str(exc))
            self.notifier.send(READY="1", STATUS=f"config reload rejected: {exc}")
            return
        if new.paths.run_dir != state.cfg.paths.run_dir:
            state.log.warning("paths.run_dir changes need a restart; keeping the old one")
            new = replace(new, paths=state.cfg.paths)
        if new.observer.metrics_port != state.cfg.observer.metrics_port:
            state.log.warning("metrics_port changes need a restart")
        state.cfg, state.interval_ns = new, new_interval
        state.log.info("config reloaded", path=str(self.config_path))
        self.notifier.send(READY="1", STATUS=status_text(state))

    def release(self) -> None:
        """Clean exit: each duty lets go of what it holds, then the slots are closed."""
        for duty in self.duties:
            duty.stop(self.state)
        self.state.close()

    def watchdog(self, now_ns: int) -> None:
        if self.notifier.watchdog_ns and now_ns >= self.next_watchdog_ns:
            self.next_watchdog_ns = now_ns + self.notifier.watchdog_ns // 2
            self.notifier.watchdog()

    def run(self) -> int:
        """The loop: ticks on time, signals through a self-pipe (SIGHUP, SIGTERM, SIGINT)."""
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous_fd = signal.set_wakeup_fd(write_fd)
        handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
        previous = {s: signal.signal(s, lambda *_: None) for s in handled}
        selector = selectors.DefaultSelector()
        selector.register(read_fd, selectors.EVENT_READ)
        try:
            files.ensure_tenants_dir(self.state.run_dir)
            for duty in self.duties:
                duty.start(self.state)
            now = live.monotonic_ns()
            self.tick(now)
            self.notifier.ready(status_text(self.state))
            self.state.log.info("observer ready", interval_ms=self.state.interval_ns / NS_PER_MS)
            return self._loop(selector, read_fd, now + self.state.interval_ns)
        finally:
            selector.close()
            signal.set_wakeup_fd(previous_fd)
            for s, handler in previous.items():
                signal.signal(s, handler)
            os.close(read_fd)
            os.close(write_fd)
            self.release()

    def _loop(self, selector: selectors.BaseSelector, read_fd: int, next_tick: int) -> int:
        while True:
            now = live.monotonic_ns()
            for _ in selector.select(max(next_tick - now, 0) / 1e9):
                for signum in _drain(read_fd):
                    if signum == signal.SIGHUP:
                        self.reload()
                    elif signum in (signal.SIGTERM, signal.SIGINT):
                        self.notifier.stopping()
                        self.state.log.info("stopping", signal=signal.Signals(signum).name)
                        return 0
            now = live.monotonic_ns()
            if now >= next_tick:
                self.tick(now)
                # Late (suspended, overloaded): skip the missed ticks rather than burst.
                interval = self.state.interval_ns
                next_tick = max(next_tick + interval, now + interval // 2)
            self.watchdog(now)


def _drain(fd: int) -> Iterable[int]:
    try:
        return os.read(fd, 512)
    except BlockingIOError:
        return b""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcsp-observer", description="Share every GPU among its FCSP tenants."
    )
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH, help="config.toml")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = configure_logging()
    try:
        cfg = config.load(args.config)
        return Observer(cfg, args.config, log, notify.Notifier()).run()
    except FcspError as exc:
        print(f"fcsp-observer: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
