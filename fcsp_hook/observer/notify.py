"""sd_notify(3) without libsystemd: one datagram per message to $NOTIFY_SOCKET.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the observer runs the
same under a terminal, a test or a unit.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

USEC_NS = 1000


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = self._resolve(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_ns = self._watchdog(env)
        self._sock: socket.socket | None = None
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @staticmethod
    def _resolve(address: str) -> str | None:
        if address.startswith("@"):  # abstract namespace socket
            return "\0" + address[1:]
        if address.startswith("/"):
            return address
        return None

    @staticmethod
    def _watchdog(env: Mapping[str, str]) -> int:
        """WATCHDOG_USEC in ns, 0 if the watchdog is off or meant for another process."""
        pid = env.get("WATCHDOG_PID", "")
        if pid and pid != str(os.getpid()):
            return 0
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
        except ValueError:
            return 0
        return max(usec, 0) * USEC_NS

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str) -> bool:
        """Send KEY=value lines; False if there is no socket or the send failed."""
        if self._sock is None or self._address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError:
            return False  # systemd gone or restarting: nothing useful to do about it
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def reloading(self, monotonic_usec: int) -> bool:
        return self.send(RELOADING="1", MONOTONIC_USEC=str(monotonic_usec))

    def stopping(self) -> bool:
        return self.send(STOPPING="1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
