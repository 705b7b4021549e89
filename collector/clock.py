"""Clocks behind one small interface: the real one and a simulated one for fast-forward."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """Time as the collector loop sees it."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps and stops during suspend."""

    def boottime(self) -> float:
        """Seconds on a clock that never jumps and keeps counting during suspend."""

    def wall_ms(self) -> int:
        """UTC epoch milliseconds."""

    def sleep(self, seconds: float, stop: threading.Event) -> None:
        """Sleep, returning early when stop is set."""


class RealClock:
    """The host's clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def boottime(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def sleep(self, seconds: float, stop: threading.Event) -> None:
        if seconds > 0:
            stop.wait(seconds)


class SimClock:
    """A clock that jumps forward when asked to sleep, for building data fast."""

    def __init__(self, start_ms: int) -> None:
        self._start_ms = start_ms
        self._now = 0.0

    def monotonic(self) -> float:
        return self._now

    def boottime(self) -> float:
        return self._now

    def wall_ms(self) -> int:
        return self._start_ms + round(self._now * 1000)

    def sleep(self, seconds: float, stop: threading.Event) -> None:
        if seconds > 0:
            self._now += seconds
