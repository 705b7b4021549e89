"""The collector loop: schedule ticks on the monotonic clock, write them, keep systemd informed."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TextIO

from . import schema
from .backend import Backend, BackendInitError
from .clock import Clock
from .notify import Notifier
from .records import Event, Tick
from .sampler import Sampler
from .states import IDLE_HELD, gpu_state
from .store import Store
from .textfile import Textfile

MAX_BACKLOG = 360  # ticks kept in memory while the disk refuses writes
POLL_S = 10.0  # the driver keeps ~14 s of utilization samples: drain them before they go
PRUNE_EVERY_S = 3600.0
INIT_BACKOFF_MAX_S = 60.0


@dataclass(frozen=True)
class Settings:
    """What the loop needs from the command line."""

    interval_s: float
    retention_ms: int
    ticks: int | None = None  # stop after this many ticks (demo, tests)
    hostname: str = ""
    version: str = ""


class Log:
    """One line per notable event on stderr; journald priority prefixes when under systemd."""

    def __init__(self, stream: TextIO = sys.stderr, journal: bool | None = None) -> None:
        self._stream = stream
        self._journal = bool(os.environ.get("JOURNAL_STREAM")) if journal is None else journal

    def info(self, message: str) -> None:
        self._write(6, message)

    def warning(self, message: str) -> None:
        self._write(4, message)

    def error(self, message: str) -> None:
        self._write(3, message)

    def _write(self, priority: int, message: str) -> None:
        prefix = f"<{priority}>" if self._journal else "gua-collector: "
        self._stream.write(f"{prefix}{message}\n")
        self._stream.flush()


class Service:
    """Runs until stopped (or for a number of ticks) and returns the exit status."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        backend: Backend,
        clock: Clock,
        notifier: Notifier,
        log: Log,
        stop: threading.Event,
        watchdog_s: float | None,
        textfile: Textfile | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._backend = backend
        self._clock = clock
        self._notify = notifier.send
        self._log = log
        self._stop = stop
        # Never sleep longer than the watchdog allows.
        self._wake_s = min(x for x in (watchdog_s, settings.interval_s) if x)
        self._ping = watchdog_s is not None
        self._backlog: list[Tick] = []
        self._db_failing = ""
        self._db_failed_since = 0
        self._dropped = 0
        self._ready = False
        self._ticks = 0
        self._last_ts = 0
        self._gap_from: tuple[int, str] | None = None  # (last tick ms, why) before sampling (re)started
        self._textfile = textfile
        self._textfile_failing = ""

    # --- lifecycle ----------------------------------------------------------------
    def run(self) -> int:
        previous = self._store.last_tick()
        if previous is not None:
            why = "collector stopped" if previous.clean_stop else "collector did not stop cleanly (crash, kill or power loss)"
            self._gap_from = (previous.ts_ms, why)
        self._store.begin_run(
            self._clock.wall_ms(), round(self._settings.interval_s * 1000), self._backend.name,
            self._settings.hostname, self._settings.version,
        )
        self._log.info(f"started: backend {self._backend.name}, database {self._store.path}")
        while self._init_backend():
            try:
                self._sample(Sampler(self._backend))
                return self._finish("stopped")
            except BackendInitError as error:
                # The driver went away under us (unloaded, upgraded): start over with backoff.
                self._log.error(f"{error}; initialising NVML again")
                self._safe_events([Event(self._clock.wall_ms(), "nvml_error", str(error))])
                self._backend.shutdown()
                if self._last_ts:  # else the restart gap, if any, still stands
                    self._gap_from = (self._last_ts, "NVML unavailable")
        return self._finish("stopped before the backend came up")

    def _sample(self, sampler: Sampler) -> None:
        """Tick until stopped (or enough ticks); raises BackendInitError when NVML is gone."""
        clock = self._clock
        mono, boot = clock.monotonic(), clock.boottime()
        # The first tick after (re)starting covers no time: there is no previous tick to measure from.
        self._record(self._with_gap(sampler.tick(clock.wall_ms(), 0)))
        interval = self._settings.interval_s
        next_tick = mono + interval
        next_prune = mono
        # Reads between ticks drain the driver's short buffers; spaced evenly,
        # never right after a tick (an empty read would count as 0 % SM).
        next_poll = mono + POLL_S
        while not self._stop.is_set() and (self._settings.ticks is None or self._ticks < self._settings.ticks):
            now = clock.monotonic()
            if now >= next_tick:
                boot_now = clock.boottime()
                duration_ms = round((now - mono) * 1000)
                tick = sampler.tick(clock.wall_ms(), duration_ms)
                self._record(self._with_suspend_gap(tick, (boot_now - boot) - (now - mono), duration_ms))
                mono, boot = now, boot_now
                # Keep the phase; skip slots missed while something stalled.
                while next_tick <= now:
                    next_tick += interval
                if now >= next_prune:
                    next_prune = now + (PRUNE_EVERY_S if self._prune(clock.wall_ms()) else 1.0)
                next_poll = now + POLL_S
                self._ping_watchdog()
                continue
            if now >= next_poll and next_tick - now > 1.0:
                sampler.poll()
                next_poll = now + POLL_S
            self._ping_watchdog()
            wake_at = min(next_tick, next_poll) if next_poll > now else next_tick
            clock.sleep(min(wake_at - now, self._wake_s), self._stop)

    def _record(self, tick: Tick) -> None:
        self._write(tick)
        self._status(tick)
        self._ticks += 1
        self._last_ts = tick.ts_ms
        if self._textfile is not None:
            self._publish(self._textfile, tick)

    def _publish(self, textfile: Textfile, tick: Tick) -> None:
        try:
            textfile.publish(tick)
        except OSError as error:
            if str(error) != self._textfile_failing:
                self._log.error(f"cannot write {textfile.path}: {error.strerror or error}")
                self._textfile_failing = str(error)
            return
        if self._textfile_failing:
            self._log.info(f"writing {textfile.path} again")
            self._textfile_failing = ""

    def _finish(self, why: str) -> int:
        self._notify("STOPPING=1")
        if self._backlog:
            self._flush()
        try:
            self._store.end_run(self._clock.wall_ms(), why)
        except sqlite3.Error as error:
            self._log.error(f"could not record the stop: {error}")
        self._backend.shutdown()
        self._log.info(why)
        return 0

    # --- backend ---------------------------------------------------------------------
    def _init_backend(self) -> bool:
        """Start NVML, retrying with backoff while the loop stays alive for the watchdog."""
        delay = 1.0
        last = ""
        while not self._stop.is_set():
            try:
                self._backend.init()
                if last:
                    self._log.info("NVML is up")
                return True
            except BackendInitError as error:
                reason = str(error)
                if reason != last:
                    self._log.error(f"{reason}; retrying with backoff")
                    self._safe_events([Event(self._clock.wall_ms(), "init_failed", reason)])
                    last = reason
                self._notify(f"STATUS=waiting for NVML: {reason} (retry in {delay:.0f}s)")
                self._sleep_alive(delay)
                delay = min(delay * 2, INIT_BACKOFF_MAX_S)
        return False

    def _sleep_alive(self, seconds: float) -> None:
        """Sleep, waking often enough to feed the watchdog."""
        end = self._clock.monotonic() + seconds
        while not self._stop.is_set():
            left = end - self._clock.monotonic()
            if left <= 0:
                return
            self._ping_watchdog()
            self._clock.sleep(min(left, self._wake_s), self._stop)

    def _ping_watchdog(self) -> None:
        if self._ping:
            self._notify("WATCHDOG=1")

    # --- writing ---------------------------------------------------------------------
    def _write(self, tick: Tick) -> None:
        self._backlog.append(tick)
        if len(self._backlog) > MAX_BACKLOG:
            self._backlog.pop(0)
            self._dropped += 1
        self._flush()

    def _flush(self) -> None:
        """Write the backlog in one transaction; on a disk error keep it for the next tick."""
        try:
            self._store.write_ticks(self._backlog)
        except sqlite3.Error as error:
            reason = str(error)
            if reason != self._db_failing:
                self._log.error(f"database write failed: {reason}; will retry next tick")
                if not self._db_failing:
                    self._db_failed_since = self._backlog[-1].ts_ms
                self._db_failing = reason
            return
        self._backlog.clear()
        if not self._ready:
            # READY=1 only once a tick is really on disk.
            self._notify("READY=1")
            self._ready = True
        if self._db_failing:
            now = self._clock.wall_ms()
            detail = f"writes failed ({self._db_failing}); {self._dropped} ticks lost"
            self._log.info(f"database writable again; {self._dropped} ticks lost")
            self._safe_events([Event(self._db_failed_since, "db_error", detail, end_ms=now)])
            self._db_failing = ""
            self._dropped = 0

    def _safe_events(self, events: list[Event]) -> None:
        try:
            self._store.write_events(events)
        except sqlite3.Error as error:
            self._log.error(f"could not record event: {error}")

    def _prune(self, now_ms: int) -> bool:
        """One batch of retention; True when nothing old is left."""
        try:
            removed = self._store.prune(now_ms - self._settings.retention_ms)
        except sqlite3.Error as error:
            self._log.error(f"retention pruning failed: {error}")
            return True
        return removed == 0

    # --- gaps and status ----------------------------------------------------------------
    def _with_gap(self, tick: Tick) -> Tick:
        """Add a gap event when sampling (re)starts long after the last stored tick."""
        if self._gap_from is None:
            return tick
        since, why = self._gap_from
        self._gap_from = None
        # Any stretch longer than one interval is time no tick covers: say so.
        if tick.ts_ms - since <= self._settings.interval_s * 1000:
            return tick
        return replace(tick, events=tick.events + (Event(since, "gap", why, end_ms=tick.ts_ms),))

    def _with_suspend_gap(self, tick: Tick, suspended_s: float, duration_ms: int) -> Tick:
        if suspended_s < 1.0:
            return tick
        start = tick.ts_ms - duration_ms - round(suspended_s * 1000)
        gap = Event(start, "gap", f"host suspended for {suspended_s:.0f} s", end_ms=tick.ts_ms - duration_ms)
        return replace(tick, events=tick.events + (gap,))

    def _status(self, tick: Tick) -> None:
        self._notify("STATUS=" + status_line(tick, self._db_failing))


def status_line(tick: Tick, db_failing: str = "") -> str:
    """The one-line summary systemctl status shows."""
    gpus = [g for g in tick.gpus if g.gpu.parent_uuid is None]
    procs = {(p.process.pid, p.process.start_ms) for g in tick.gpus for p in g.procs}
    held = sum(1 for g in gpus if gpu_state(g) == IDLE_HELD)
    bad = sum(1 for g in gpus if g.status != schema.STATUS_OK)
    text = f"{len(gpus)} GPUs, {len(procs)} processes, {held} idle-held"
    if bad:
        text += f", {bad} failing"
    if db_failing:
        text += f"; database write failing: {db_failing}"
    return text


def install_signal_handlers(stop: threading.Event, notify: Callable[[str], None]) -> None:
    """SIGTERM/SIGINT: say STOPPING=1 and let the current transaction finish."""
    import signal

    def handler(signum: int, frame: object) -> None:
        notify("STOPPING=1")
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
