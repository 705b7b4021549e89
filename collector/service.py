"""The collector loop: schedule ticks on the monotonic clock, write them, keep systemd informed."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TextIO

from . import schema, unsaved
from .backend import Backend, BackendInitError
from .clock import Clock
from .notify import Notifier
from .records import Event, Tick
from .sampler import Sampler
from .states import IDLE_HELD, gpu_state
from .store import PRUNE_BATCH, Store, StoreError
from .textfile import Textfile

MAX_BACKLOG = 360  # ticks kept in memory while the disk refuses writes
POLL_S = 10.0  # the driver keeps ~14 s of utilization samples: drain them before they go
PRUNE_EVERY_S = 3600.0
COMPACT_BUDGET_S = 0.5  # compaction between two ticks, at most (an hour of 8 GPUs takes ~35 ms)
INIT_BACKOFF_MAX_S = 60.0
CLOCK_STEP_MS = 1000  # the wall clock behind the last stored tick by more than this is a step, not jitter


@dataclass(frozen=True)
class Settings:
    """What the loop needs from the command line."""

    interval_s: float
    retention_ms: int
    ticks: int | None = None  # stop after this many ticks (demo, tests)
    hostname: str = ""
    version: str = ""
    # A service waits out a full disk; a one-off run (--ticks) reports it and exits.
    wait_for_db: bool = True
    unit_retention_ms: int | None = None  # per-unit rollups; None: kept for ever


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
        try:
            self._stream.write(f"{prefix}{message}\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed terminal or journal pipe must not stop the recording


class Service:
    """Runs until stopped (or for a number of ticks) and returns the exit status."""

    def __init__(
        self,
        settings: Settings,
        store: Store | Callable[[], Store],
        backend: Backend,
        clock: Clock,
        notifier: Notifier,
        log: Log,
        stop: threading.Event,
        watchdog_s: float | None,
        textfile: Textfile | None = None,
    ) -> None:
        self._settings = settings
        # An opener lets the service wait for a disk that is full at start.
        self._open = store if callable(store) and not isinstance(store, Store) else None
        self._store: Store = store if isinstance(store, Store) else None  # type: ignore[assignment]
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
        self._textfile_reason = ""  # short, for STATUS=
        self._signals: list[int] = []  # delivered by on_signal, handled by the loop
        self._clock_behind = False
        self._pending_events: list[Event] = []  # found while stamping, written with the next tick
        self._last_status = "starting"

    # --- lifecycle ----------------------------------------------------------------
    def run(self) -> int:
        """Open the store (waiting out a full disk), wait for NVML, tick until stopped.

        Raises StoreError when the database cannot be used at all (the
        caller maps it to an exit status); a stop request while waiting is a
        clean stop.
        """
        if not self._open_store():
            self._notify("STOPPING=1")
            self._log.info("stopped before the database could be opened")
            return 0
        previous = self._store.last_tick()
        if previous is not None:
            why = "collector stopped" if previous.clean_stop else "collector did not stop cleanly (crash, kill or power loss)"
            self._gap_from = (previous.ts_ms, why)
            self._last_ts = previous.ts_ms
        self._log.info(f"started: backend {self._backend.name}, database {self._store.path}")
        for note in self._store.notes:
            self._log.warning(note)
        self._record_unsaved()
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

    def close(self) -> None:
        """Close the database if it was opened (the inode lock goes with it)."""
        if self._store is not None:
            self._store.close()
            self._store = None  # type: ignore[assignment]

    def on_signal(self, signum: int) -> None:
        """Queue a signal that is neither a stop nor fatal; the loop answers it (see _answer_signals)."""
        self._signals.append(signum)

    def _open_store(self) -> bool:
        """Open the database and record this run; wait with backoff while the disk refuses.

        A full disk or an I/O error says nothing about the file: waiting
        (READY=1, STATUS= saying why) lets systemd keep the service up and
        the collector resume by itself, where an exit would end in a
        restart loop or a unit that systemd gives up on.
        """
        delay = 1.0
        last = ""
        while not self._stop.is_set():
            try:
                if self._store is None:
                    assert self._open is not None
                    self._store = self._open()
                self._store.begin_run(
                    self._clock.wall_ms(), round(self._settings.interval_s * 1000), self._backend.name,
                    self._settings.hostname, self._settings.version,
                )
                if last:
                    self._log.info("database usable again")
                return True
            except (StoreError, sqlite3.Error) as error:
                if isinstance(error, StoreError) and error.kind != "transient":
                    raise
                if isinstance(error, sqlite3.Error) and self._open is not None and self._store is not None:
                    self._store.close()
                    self._store = None  # type: ignore[assignment]
                if not self._settings.wait_for_db:
                    raise error if isinstance(error, StoreError) else StoreError("transient", str(error)) from None
                reason = str(error)
                if reason != last:
                    self._log.error(f"{reason}; retrying with backoff")
                    last = reason
                self._waiting(f"waiting for the database: {reason} (retry in {delay:.0f}s)")
                self._sleep_alive(delay)
                delay = min(delay * 2, INIT_BACKOFF_MAX_S)
        return False

    def _waiting(self, status: str) -> None:
        """READY=1 then STATUS=: the service is up, and doing its job is waiting for a resource."""
        if not self._ready:
            # Held back until the first tick otherwise, READY would leave
            # systemd's start timeout to kill a collector that waits for a
            # driver loaded late at boot.
            self._notify("READY=1")
            self._ready = True
        self._last_status = status
        self._notify(f"STATUS={status}")

    def _record_unsaved(self) -> None:
        """Ticks a previous run could not write before it stopped: say so in the DB and the log."""
        for lost in unsaved.take(self._store.path):
            detail = f"{lost.count} ticks not written before the collector stopped: {lost.reason}"
            self._log.warning(detail)
            self._safe_events([Event(lost.first_ms, "db_error", detail, end_ms=lost.last_ms)])

    def _sample(self, sampler: Sampler) -> None:
        """Tick until stopped (or enough ticks); raises BackendInitError when NVML is gone."""
        clock = self._clock
        mono, boot = clock.monotonic(), clock.boottime()
        # The first tick after (re)starting covers no time: there is no previous tick to measure from.
        self._record(self._with_gap(sampler.tick(self._stamp(clock.wall_ms(), 0), 0)))
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
                tick = sampler.tick(self._stamp(clock.wall_ms(), duration_ms), duration_ms)
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
            if self._signals:
                self._answer_signals()
            if now >= next_poll and next_tick - now > 1.0:
                sampler.poll()
                next_poll = now + POLL_S
            self._ping_watchdog()
            wake_at = min(next_tick, next_poll) if next_poll > now else next_tick
            clock.sleep(min(wake_at - now, self._wake_s), self._stop)

    def _record(self, tick: Tick) -> None:
        if self._pending_events:
            tick = replace(tick, events=tick.events + tuple(self._pending_events))
            self._pending_events.clear()
        self._write(tick)
        self._ticks += 1
        self._last_ts = tick.ts_ms
        # Before STATUS=, so the line says whether this tick's textfile was written.
        if self._textfile is not None:
            self._publish(self._textfile, tick)
        self._status(tick)

    def _publish(self, textfile: Textfile, tick: Tick) -> None:
        try:
            textfile.publish(tick)
        except OSError as error:
            if str(error) != self._textfile_failing:
                self._log.error(f"cannot write {textfile.path}: {error.strerror or error}")
                self._textfile_failing = str(error)
                self._textfile_reason = error.strerror or str(error)
            return
        if self._textfile_failing:
            self._log.info(f"writing {textfile.path} again")
            self._textfile_failing = ""
            self._textfile_reason = ""

    def _invalidate_textfile(self) -> None:
        """Clean stop: leave a file without GPU or user series, so no alert runs on frozen data."""
        if self._textfile is None:
            return
        try:
            self._textfile.invalidate()
        except OSError as error:
            self._log.error(f"cannot mark {self._textfile.path} stopped: {error.strerror or error}")

    def _finish(self, why: str) -> int:
        self._notify("STOPPING=1")
        if self._backlog:
            self._flush()  # one last try: the disk may have room again
        if self._backlog:
            self._report_unsaved()
        try:
            self._store.end_run(self._clock.wall_ms(), why)
        except sqlite3.Error as error:
            self._log.error(f"could not record the stop: {error}")
        self._invalidate_textfile()
        self._backend.shutdown()
        self._log.info(why)
        return 0

    def _report_unsaved(self) -> None:
        """Stopping with ticks the disk refused: count them in the journal and leave a note for the next start."""
        count = len(self._backlog) + self._dropped
        first = self._db_failed_since or self._backlog[0].ts_ms
        lost = unsaved.Unsaved(count, first, self._backlog[-1].ts_ms, self._db_failing or "database write failed")
        self._log.error(f"{count} ticks not written at stop ({lost.reason})")
        try:
            unsaved.save(self._store.path, lost)
        except OSError as error:
            self._log.error(f"cannot leave a note of the lost ticks: {error.strerror or error}")

    def _answer_signals(self) -> None:
        """SIGHUP: nothing to reload, say so; SIGUSR1/2: log the current status. Never a death."""
        import signal

        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self._log.info(
                    "SIGHUP: settings are read only at start; nothing reloaded "
                    "(systemctl restart gua-collector applies a changed config)"
                )
            else:
                self._log.info(f"{signal.Signals(signum).name}: {self._last_status}")

    # --- backend ---------------------------------------------------------------------
    def _init_backend(self) -> bool:
        """Start NVML, retrying with backoff while the loop stays alive for the watchdog.

        The stretch without NVML becomes a gap (start and end), so a report
        shows time with no samples rather than nothing.
        """
        delay = 1.0
        last = ""
        since = 0
        while not self._stop.is_set():
            try:
                self._backend.init()
                if last:
                    self._log.info("NVML is up")
                    self._gap_after_outage(since, last)
                return True
            except BackendInitError as error:
                reason = str(error)
                if not since:
                    since = self._clock.wall_ms()
                if reason != last:
                    self._log.error(f"{reason}; retrying with backoff")
                    self._safe_events([Event(self._clock.wall_ms(), "init_failed", reason)])
                    last = reason
                self._waiting(f"waiting for NVML: {reason} (retry in {delay:.0f}s)")
                self._sleep_alive(delay)
                if self._signals:
                    self._answer_signals()
                delay = min(delay * 2, INIT_BACKOFF_MAX_S)
        if last:
            # Stopped before NVML came back: the outage ends with the run.
            now = self._clock.wall_ms()
            start = self._gap_from[0] if self._gap_from else since
            self._safe_events([Event(start, "gap", f"NVML unavailable until stop: {last}", end_ms=now)])
        return False

    def _gap_after_outage(self, since: int, reason: str) -> None:
        """The first tick after NVML returns closes a gap that starts where recording stopped."""
        if self._gap_from is None:
            self._gap_from = (since, f"NVML unavailable: {reason}")
            return
        start, why = self._gap_from
        if why.startswith("NVML unavailable"):  # lost mid-run: the retries say why
            self._gap_from = (start, f"NVML unavailable: {reason}")
        else:
            self._gap_from = (start, f"{why}; then NVML unavailable: {reason}")

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
        self._store.bound_wal()
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
        """One batch of retention (raw rows, per-unit rollups), then of compaction; True when the pass is done.

        A batch short of PRUNE_BATCH ends the raw part: at 10 s ticks a tick
        ages out every tick, so "nothing removed" would never come, and the
        pass would run at every tick. Compaction goes on for COMPACT_BUDGET_S.
        """
        try:
            if self._store.prune(now_ms - self._settings.retention_ms) >= PRUNE_BATCH:
                return False
            if self._settings.unit_retention_ms is not None and self._store.prune_units(
                    now_ms - self._settings.unit_retention_ms):
                return False
        except sqlite3.Error as error:
            self._log.error(f"retention pruning failed: {error}")
            return True
        # Real time, not the loop's clock: a bound on work between two ticks
        # (an upgraded 90-day database has ~2,000 hours to compact).
        deadline = time.monotonic() + COMPACT_BUDGET_S
        while True:
            try:
                step = self._store.compact()
            except sqlite3.Error as error:
                self._log.error(f"compacting raw rows failed: {error}")
                return True
            if step is None:
                return True
            if step.kept:
                hour = f"the hour {time.strftime('%Y-%m-%dT%H:00Z', time.gmtime(step.hour * 3600))}" \
                    if step.hour >= 0 else "a tick"
                self._log.warning(f"raw rows of {hour} kept as rows, not compacted: {step.kept}")
            if time.monotonic() >= deadline:
                return False

    # --- time and gaps --------------------------------------------------------------------
    def _stamp(self, wall_ms: int, duration_ms: int) -> int:
        """The tick's timestamp: the wall clock, never overlapping time already stored.

        A tick covers [ts - duration, ts]. When the wall clock steps back (NTP,
        a wrong RTC at boot) it would repeat stored time and count it twice:
        carry on from the last stored tick by the monotonic duration instead,
        until the wall clock catches up.
        """
        floor = self._last_ts + max(duration_ms, 1) if self._last_ts else 0
        if wall_ms >= floor:
            self._clock_behind = False
            return wall_ms
        if floor - wall_ms > CLOCK_STEP_MS and not self._clock_behind:
            self._clock_behind = True
            detail = (
                f"wall clock is {(floor - wall_ms) / 1000:.0f} s behind the last stored tick; "
                "timestamps continue from it until the clock catches up"
            )
            self._log.warning(detail)
            self._pending_events.append(Event(floor, "clock", detail))
        return floor

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
        self._last_status = status_line(tick, self._db_failing, self._textfile_reason)
        self._notify("STATUS=" + self._last_status)


def status_line(tick: Tick, db_failing: str = "", textfile_failing: str = "") -> str:
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
    if textfile_failing:
        text += f"; textfile not written: {textfile_failing}"
    return text


def install_signal_handlers(
    stop: threading.Event, notify: Callable[[str], None], other: Callable[[int], None] | None = None
) -> None:
    """SIGTERM/SIGINT: say STOPPING=1 and let the current transaction finish.

    SIGHUP, SIGUSR1 and SIGUSR2 would kill the process by default (an
    unclean stop, a lost backlog): they go to `other`, which answers them
    from the loop, or are ignored.
    """
    import signal

    def handler(signum: int, frame: object) -> None:
        notify("STOPPING=1")
        stop.set()

    def deferred(signum: int, frame: object) -> None:
        if other is not None:
            other(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, deferred)
