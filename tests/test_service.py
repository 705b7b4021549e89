"""The collector loop in-process: init retry, disk errors, gaps, watchdog cadence, stopping."""

from __future__ import annotations

import io
import sqlite3
import threading
from pathlib import Path

import pytest

from gua_collector import schema
from gua_collector.backend import BackendInitError
from gua_collector.clock import SimClock
from gua_collector.service import Log, Service, Settings
from gua_collector.simulate import SimBackend
from gua_collector.store import Store

pytestmark = pytest.mark.timeout(60)
START = 1_772_438_400_000


class Recorder:
    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, str]] = []

    def send(self, message: str) -> None:
        self.sent.append((self.clock.monotonic(), message))


def make(tmp_path: Path, backend, clock: SimClock, ticks: int, interval_s: float = 10, watchdog_s: float | None = None):
    store = Store.open(str(tmp_path / "gua.db"), now_ms=clock.wall_ms())
    notes = Recorder(clock)
    log = io.StringIO()
    service = Service(
        Settings(interval_s=interval_s, retention_ms=90 * 86_400_000, ticks=ticks),
        store, backend, clock, notes, Log(log, journal=False), threading.Event(), watchdog_s,
    )
    return service, store, notes, log


def run_to_end(tmp_path: Path, backend, clock: SimClock, **kwargs):
    """Run a service to its tick limit; return the database, what systemd heard and the log."""
    service, store, notes, log = make(tmp_path, backend, clock, **kwargs)
    assert service.run() == 0
    store.close()
    return sqlite3.connect(tmp_path / "gua.db"), notes, log


class FlakyInit(SimBackend):
    """NVML that is missing for the first few tries (driver being upgraded)."""

    def __init__(self, clock: SimClock, failures: int) -> None:
        super().__init__("lab", clock)
        self.failures = failures

    def init(self) -> None:
        if self.failures:
            self.failures -= 1
            raise BackendInitError("NVML init failed: Driver Not Loaded")
        super().init()


def test_init_retried_with_backoff_and_watchdog_fed(tmp_path: Path) -> None:
    clock = SimClock(START)
    conn, notes, log = run_to_end(tmp_path, FlakyInit(clock, failures=4), clock, ticks=3, watchdog_s=5)
    messages = [m for _, m in notes.sent]
    waits = [m for m in messages if m.startswith("STATUS=waiting for NVML")]
    assert len(waits) == 4 and "Driver Not Loaded" in waits[0]
    assert "(retry in 1s)" in waits[0] and "(retry in 8s)" in waits[3], "exponential backoff"
    # Waiting for a driver loaded late at boot is the service's job, not a slow start:
    # READY=1 comes first, so systemd's start timeout cannot kill it.
    assert messages.index("READY=1") < messages.index(waits[0])
    assert log.getvalue().count("Driver Not Loaded") == 1, "the same failure is logged once"
    pings = [t for t, m in notes.sent if m == "WATCHDOG=1"]
    assert max(b - a for a, b in zip(pings, pings[1:])) <= 5, "pinged while waiting"
    assert conn.execute("SELECT count(*) FROM event WHERE kind = 'init_failed'").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM tick").fetchone()[0] == 3
    # The outage is a stretch with a start and an end, up to the first tick.
    gap = conn.execute("SELECT ts_ms, end_ms, detail FROM event WHERE kind = 'gap'").fetchone()
    first_tick = conn.execute("SELECT min(ts_ms) FROM tick").fetchone()[0]
    assert gap is not None and gap[0] == START and gap[1] == first_tick, gap
    assert gap[1] - gap[0] >= 15_000 and "Driver Not Loaded" in gap[2], "1 + 2 + 4 + 8 s of backoff"


def test_long_interval_pings_between_ticks_and_drains_buffers(tmp_path: Path) -> None:
    clock = SimClock(START)
    conn, notes, _ = run_to_end(tmp_path, SimBackend("lab", clock), clock, ticks=4, interval_s=60, watchdog_s=4)
    pings = [t for t, m in notes.sent if m == "WATCHDOG=1"]
    assert max(b - a for a, b in zip(pings, pings[1:])) <= 4
    # The driver keeps 14 s of samples; polling between 60 s ticks keeps coverage whole.
    coverage = [r[0] for r in conn.execute(
        f"SELECT min({schema.COVERAGE_SQL.format(g='')}) FROM gpu_sample JOIN tick USING (tick_id) "
        "WHERE duration_ms > 0")]
    assert coverage == [1000]


def test_disk_full_is_retried_without_losing_ticks(tmp_path: Path) -> None:
    clock = SimClock(START)
    backend = SimBackend("lab", clock)
    service, store, notes, log = make(tmp_path, backend, clock, ticks=40)
    writes = {"n": 0}
    real_write = store._write_tick

    def filling_disk(tick):
        # Rows go in, then the disk fills: each failed transaction must roll back whole.
        real_write(tick)
        if 5 <= writes["n"] < 15:
            raise sqlite3.OperationalError("database or disk is full")

    original = store.write_ticks

    def counting(ticks):
        writes["n"] += 1
        return original(ticks)

    store._write_tick = filling_disk  # type: ignore[method-assign]
    store.write_ticks = counting  # type: ignore[method-assign]
    assert service.run() == 0
    store.close()
    text = log.getvalue()
    assert text.count("database write failed") == 1, text
    assert "writable again" in text
    db = sqlite3.connect(tmp_path / "gua.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*) FROM tick").fetchone()[0] == 40, "the backlog was written later"
    event = db.execute("SELECT detail FROM event WHERE kind = 'db_error'").fetchone()
    assert event and "full" in event[0] and "0 ticks lost" in event[0]
    statuses = [m for _, m in notes.sent if m.startswith("STATUS=") and "database write failing" in m]
    assert statuses, "STATUS says the disk is failing"


def test_faults_scenario_keeps_sampling_the_healthy_gpus(tmp_path: Path) -> None:
    clock = SimClock(START)
    db, _, _ = run_to_end(tmp_path, SimBackend("faults", clock), clock, ticks=300)
    by_gpu = dict(db.execute(
        "SELECT g.gpu_index, group_concat(DISTINCT s.status) FROM gpu_sample s JOIN gpu g USING (gpu_id) GROUP BY 1"))
    assert by_gpu[0] == "0" and by_gpu[3] == "0"
    assert set(by_gpu[1].split(",")) == {"0", "2"}, "GPU 1 is lost mid-run"
    assert set(by_gpu[2].split(",")) == {"0", "1"}, "GPU 2 has intermittent errors"
    kinds = dict(db.execute("SELECT kind, count(*) FROM event GROUP BY kind"))
    assert kinds["gpu_lost"] == 1 and kinds["nvml_error"] >= 10
    ticks = db.execute("SELECT count(*) FROM tick").fetchone()[0]
    assert ticks == 300
    unknown = db.execute("SELECT count(*) FROM proc_sample WHERE mem_mib IS NULL").fetchone()[0]
    assert unknown > 0, "memory NVML cannot report is stored as NULL"


class SuspendingClock(SimClock):
    """A host that suspends for an hour once, between two ticks."""

    def __init__(self, start_ms: int) -> None:
        super().__init__(start_ms)
        self.extra = 0.0
        self.sleeps = 0

    def boottime(self) -> float:
        return self.monotonic() + self.extra

    def wall_ms(self) -> int:
        return super().wall_ms() + round(self.extra * 1000)

    def sleep(self, seconds, stop) -> None:
        super().sleep(seconds, stop)
        self.sleeps += 1
        if self.sleeps == 5:
            self.extra = 3600.0


def test_suspend_is_a_gap_not_gpu_time(tmp_path: Path) -> None:
    clock = SuspendingClock(START)
    db, _, _ = run_to_end(tmp_path, SimBackend("lab", clock), clock, ticks=10)
    gap = db.execute("SELECT ts_ms, end_ms, detail FROM event WHERE kind = 'gap'").fetchone()
    assert gap is not None and "suspended" in gap[2]
    assert gap[1] - gap[0] == 3_600_000
    assert db.execute("SELECT max(duration_ms) FROM tick").fetchone()[0] == 10_000


def test_stop_request_finishes_cleanly(tmp_path: Path) -> None:
    clock = SimClock(START)
    service, store, notes, _ = make(tmp_path, SimBackend("lab", clock), clock, ticks=None)  # type: ignore[arg-type]
    stopper = threading.Timer(0.3, service._stop.set)
    stopper.start()
    assert service.run() == 0
    store.close()
    assert notes.sent[-1][1] == "STOPPING=1" or any(m == "STOPPING=1" for _, m in notes.sent)
    db = sqlite3.connect(tmp_path / "gua.db")
    assert db.execute("SELECT stopped_ms IS NOT NULL FROM run").fetchone()[0] == 1
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class DriverUpgrade(SimBackend):
    """NVML that stops answering mid-run (driver unloaded) and needs a few init tries to return."""

    def __init__(self, clock: SimClock) -> None:
        super().__init__("lab", clock)
        self.counts = 0
        self.inits = 0

    def init(self) -> None:
        self.inits += 1
        if 2 <= self.inits <= 4:
            raise BackendInitError("NVML init failed: RM has detected an NVML/RM version mismatch")
        super().init()

    def device_count(self) -> int:
        from gua_collector.backend import DeviceError

        self.counts += 1
        if self.counts == 12:
            raise DeviceError("Uninitialized")
        return super().device_count()


def test_nvml_vanishing_mid_run_is_reinitialised(tmp_path: Path) -> None:
    clock = SimClock(START)
    backend = DriverUpgrade(clock)
    db, notes, log = run_to_end(tmp_path, backend, clock, ticks=20, watchdog_s=5)
    assert backend.inits == 5, "init retried until the new driver answered"
    text = log.getvalue()
    assert text.count("NVML stopped answering") == 1 and text.count("version mismatch") == 1, text
    assert db.execute("SELECT count(*) FROM tick").fetchone()[0] == 20
    assert db.execute("SELECT count(*) FROM tick WHERE duration_ms = 0").fetchone()[0] == 2, "a fresh start after re-init"
    kinds = dict(db.execute("SELECT kind, count(*) FROM event GROUP BY kind"))
    assert kinds["nvml_error"] == 1 and kinds["init_failed"] == 1
    gap = db.execute("SELECT end_ms - ts_ms, detail FROM event WHERE kind = 'gap'").fetchone()
    assert gap is not None and gap[1].startswith("NVML unavailable: ") and "mismatch" in gap[1] and gap[0] >= 7_000, gap  # 1 + 2 + 4 s of backoff
    pings = [t for t, m in notes.sent if m == "WATCHDOG=1"]
    assert max(b - a for a, b in zip(pings, pings[1:])) <= 5


@pytest.mark.parametrize("interval_s", [10, 25, 60])
def test_simulated_energy_does_not_depend_on_the_interval(tmp_path: Path, interval_s: int) -> None:
    """Energy integrates every sample instant, so a duty cycle cannot alias with the tick rate."""
    clock = SimClock(START)
    ticks = 2 * 3600 // interval_s + 1
    db, _, _ = run_to_end(tmp_path, SimBackend("lab", clock), clock, ticks=ticks, interval_s=interval_s)
    total_mj = db.execute("SELECT sum(energy_mj) FROM gpu_sample").fetchone()[0]
    # Two hours of lab, from the simulator's own power model at 2 s resolution.
    backend = SimBackend("lab", SimClock(START))
    expected = sum(
        (70 + 6.3 * gpu.workload(START + t)[0]) * 2000
        for gpu in backend._gpus for t in range(2000, 2 * 3600 * 1000 + 1, 2000)
    )
    assert abs(total_mj - expected) / expected < 0.001, (total_mj, expected)


def test_retention_passes_end_and_reach_unit_rollups(tmp_path: Path) -> None:
    """With a tick ageing out at every tick, a pass still ends (a short batch), and per-unit rollups go too."""
    from gua_collector.main import main

    db = tmp_path / "gua.db"
    assert main(["--db", str(db), "--backend", "simulate:lab", "--interval", "60s", "--ticks", str(3 * 1440),
                 "--start", "2026-01-01T00:00:00Z", "--retention", "1d", "--unit-retention", "1d"]) == 0
    conn = sqlite3.connect(db)
    newest = conn.execute("SELECT max(ts_ms) FROM tick").fetchone()[0]
    cut_hour = (newest - 86_400_000) // 3_600_000
    assert conn.execute("SELECT min(ts_ms) FROM tick").fetchone()[0] >= newest - 86_400_000 - 3_600_000
    oldest_unit = conn.execute("SELECT min(hour) FROM hour_unit").fetchone()[0]
    assert cut_hour - 2 <= oldest_unit <= cut_hour + 1, "units kept for a day, as the raw rows"
    pruned = int(conn.execute("SELECT value FROM meta WHERE key = 'units_pruned_before_hour'").fetchone()[0])
    assert pruned <= oldest_unit
    assert conn.execute("SELECT min(hour) FROM hour_gpu").fetchone()[0] < cut_hour - 24, "per-GPU rollups stay"
    # a report reaching further back says its units are incomplete, whole (wrapped, not cut)
    import subprocess
    import sys

    window = ("--db", str(db), "--since", "2026-01-01", "--until", "2026-01-04", "--tz", "UTC")
    text = subprocess.run([sys.executable, "-m", "gua_report", *window], capture_output=True, text=True).stdout
    assert "warning: per-unit rollups before 2026-01-02 " in text
    assert "the units cover only the time after" in text and all(len(line) <= 80 for line in text.splitlines())
    later = subprocess.run([sys.executable, "-m", "gua_report", *window[:2], "--since", "2026-01-03T12:00Z",
                            "--until", "2026-01-04"], capture_output=True, text=True).stdout
    assert "per-unit rollups" not in later
