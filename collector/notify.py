"""The sd_notify side of the service: READY, STATUS, WATCHDOG, STOPPING."""

from __future__ import annotations

import os
from typing import Protocol


class Notifier(Protocol):
    """Where service state goes; systemd in production, a list in tests."""

    def send(self, message: str) -> None: ...


class SystemdNotifier:
    """sd_notify through the sdnotify package; silent without NOTIFY_SOCKET."""

    def __init__(self) -> None:
        import sdnotify  # imported here so tests of the core need no sdnotify

        self._notifier = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None

    def send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)


def watchdog_interval_s(environ: dict[str, str] | os._Environ[str]) -> float | None:
    """Seconds between WATCHDOG=1 pings systemd asks for (half its timeout), or None.

    WATCHDOG_PID, when set, must be ours: a child that inherited the
    environment must not ping for its parent.
    """
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None
