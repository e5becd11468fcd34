"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram
per message to $NOTIFY_SOCKET (a path, or '@name' for the abstract
namespace). READY=1 when the `ready` record is written, STATUS= lines,
RELOADING=1 / READY=1 around a reload, STOPPING=1, and WATCHDOG=1 from the
loop thread every WATCHDOG_USEC/2 when the unit sets WatchdogSec.

Without NOTIFY_SOCKET (not started by systemd) every call does nothing.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int = 0):
        self.address = address
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec > 0 else 0.0
        self._last_ping = 0.0
        self._sock: socket.socket | None = None
        self.sent = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Notifier":
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET") or None
        wd = 0
        try:
            wpid = env.get("WATCHDOG_PID")
            if not wpid or int(wpid) == os.getpid():
                wd = int(env.get("WATCHDOG_USEC") or 0)
        except ValueError:
            wd = 0
        return cls(addr, wd)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        if self.address is None:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), addr)
            self.sent += 1
            return True
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", self.address, e)
            return False

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                    "STATUS=reloading configuration and policy")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def watchdog(self, now_mono: float | None = None) -> None:
        """Called from the loop thread after every poll: a ping each half
        watchdog interval, so a stuck loop is restarted by systemd."""
        if not self.watchdog_interval or self.address is None:
            return
        now_mono = time.monotonic() if now_mono is None else now_mono
        if now_mono - self._last_ping >= self.watchdog_interval:
            self._last_ping = now_mono
            self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
