"""The collector under a hostile local account and a broken host: links, modes, full disks, signals, clocks."""

from __future__ import annotations

import io
import os
import resource
import signal
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from collector_helpers import clean_env, collector_cmd, run_collector
from gua_collector import unsaved
from gua_collector.backend import BackendInitError
from gua_collector.clock import SimClock
from gua_collector.service import Log, Service, Settings
from gua_collector.simulate import SimBackend
from gua_collector.store import WAL_LIMIT_BYTES, Store, StoreError
from test_notify import FakeSystemd

pytestmark = pytest.mark.timeout(90)
START = 1_772_438_400_000
DAY = 86_400_000


class Recorder:
    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.sent: list[str] = []

    def send(self, message: str) -> None:
        self.sent.append(message)


def service_for(store, backend, clock, ticks, stop=None, log=None, **settings):
    notes = Recorder(clock)
    log = log if log is not None else io.StringIO()
    service = Service(
        Settings(interval_s=10, retention_ms=90 * DAY, ticks=ticks, **settings),
        store, backend, clock, notes, Log(log, journal=False), stop or threading.Event(), 5.0,
    )
    return service, notes, log


def overlaps(conn: sqlite3.Connection) -> int:
    """Ticks whose interval starts before the previous tick ended."""
    rows = conn.execute("SELECT ts_ms, duration_ms FROM tick ORDER BY ts_ms, tick_id").fetchall()
    return sum(1 for (a, _), (b, d) in zip(rows, rows[1:]) if b - d < a or b <= a)


# --- one writer per inode -------------------------------------------------------------

@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_second_collector_through_another_path_is_refused(tmp_path: Path, link: str) -> None:
    db = tmp_path / "gua.db"
    run_collector("--db", str(db), "--backend", "simulate", "--ticks", "2")
    other = tmp_path / "other" / "gua.db"
    other.parent.mkdir()
    (os.symlink if link == "symlink" else os.link)(db, other)
    first = subprocess.Popen(
        collector_cmd("--db", str(db), "--backend", "simulate:lab", "--interval", "1s"),
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.5)
        second = run_collector("--db", str(other), "--backend", "simulate", "--ticks", "1")
        assert second.returncode == 8, second.stderr
        assert "already writing" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(10) == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM run").fetchone()[0] == 2, "only the first two runs wrote"
        assert overlaps(conn) == 0


def test_lock_does_not_break_sqlite_locking(tmp_path: Path) -> None:
    """The inode flock must never drop SQLite's own POSIX locks (closing a second fd would)."""
    db = tmp_path / "gua.db"
    store = Store.open(str(db), now_ms=START)
    store.begin_run(START, 10_000, "test", "host", "0")
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM run").fetchone()[0] == 1
    with pytest.raises(StoreError) as refused:
        Store.open(str(db), now_ms=START)
    assert refused.value.kind == "locked"
    store.end_run(START + 1, "test")  # still writes alongside the open reader snapshot
    reader.close()
    store.close()
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# --- modes ----------------------------------------------------------------------------------

def test_open_takes_world_access_away_from_db_wal_and_shm(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    run_collector("--db", str(db), "--backend", "simulate", "--ticks", "2")
    keeper = sqlite3.connect(db)  # keeps -wal and -shm in place while we loosen them
    keeper.execute("SELECT count(*) FROM tick").fetchone()
    for name in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert name.exists(), name
        os.chmod(name, 0o644)
    proc = run_collector("--db", str(db), "--backend", "simulate", "--ticks", "2")
    keeper.close()
    assert proc.returncode == 0, proc.stderr
    assert "0644, now 0640" in proc.stderr, proc.stderr
    for name in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        if name.exists():
            assert stat.S_IMODE(name.stat().st_mode) == 0o640, name
    quiet = run_collector("--db", str(db), "--backend", "simulate", "--ticks", "1")
    assert "now 0640" not in quiet.stderr, "logged only when something changed"


# --- a full disk at start -----------------------------------------------------------------

def _fsize_limit(limit: int):
    def apply() -> None:
        # Soft limit only: the test lifts it later with prlimit, as freeing space would.
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def test_full_disk_at_start_is_transient_for_a_one_off_run(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    assert run_collector("--db", str(db), "--backend", "simulate", "--ticks", "3").returncode == 0
    before = db.read_bytes()
    proc = subprocess.run(
        collector_cmd("--db", str(db), "--backend", "simulate", "--ticks", "3"),
        env=clean_env(), capture_output=True, text=True, timeout=60, preexec_fn=_fsize_limit(0),
    )
    assert proc.returncode == 9, proc.stderr
    assert "corrupt" not in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert db.read_bytes() == before


def test_full_disk_at_start_waits_then_records(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    assert run_collector("--db", str(db), "--backend", "simulate", "--ticks", "3").returncode == 0
    fake = FakeSystemd(tmp_path / "notify.sock")
    proc = subprocess.Popen(
        collector_cmd("--db", str(db), "--backend", "simulate:lab", "--interval", "1s"),
        env=clean_env(NOTIFY_SOCKET=str(fake.path), WATCHDOG_USEC="2000000"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_fsize_limit(0),
    )
    try:
        waiting = lambda ms: any("waiting for the database" in m for _, m in ms)  # noqa: E731
        assert fake.read_until(waiting, 20), fake.messages
        messages = [m for _, m in fake.messages]
        assert messages.index("READY=1") < next(i for i, m in enumerate(messages) if "waiting for the database" in m)
        fake.read_until(lambda ms: False, 2.5)
        assert proc.poll() is None, "a full disk is waited out, not an exit"
        assert fake.times("WATCHDOG=1"), "the watchdog is fed while waiting"
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        recording = lambda ms: any(m.startswith("STATUS=4 GPUs") for _, m in ms)  # noqa: E731
        assert fake.read_until(recording, 30), fake.messages[-5:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in stderr and "corrupt" not in stderr, stderr
        assert stderr.count("retrying with backoff") == 1, "the same failure is logged once"
    finally:
        proc.kill()
        fake.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM run").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM tick").fetchone()[0] > 3


def test_real_corruption_is_still_exit_7(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    assert run_collector("--db", str(db), "--backend", "simulate", "--ticks", "200").returncode == 0
    data = bytearray(db.read_bytes())
    page = 4096
    data[page:] = os.urandom(len(data) - page)  # every b-tree page but the schema's
    db.write_bytes(bytes(data))
    proc = run_collector("--db", str(db), "--backend", "simulate", "--ticks", "1")
    assert proc.returncode == 7 and "corrupt" in proc.stderr, proc.stderr


# --- signals ---------------------------------------------------------------------------------

def test_sighup_and_sigusr1_are_answered_not_fatal(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    proc = subprocess.Popen(
        collector_cmd("--db", str(db), "--backend", "simulate:lab", "--interval", "1s"),
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.5)
        for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            proc.send_signal(signum)
            time.sleep(1.2)
            assert proc.poll() is None, f"{signum.name} killed the collector"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
    assert "SIGHUP: settings are read only at start" in stderr, stderr
    assert "SIGUSR1: 4 GPUs" in stderr, stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT stopped_ms IS NOT NULL FROM run").fetchone()[0] == 1, "a clean stop"


# --- stopping while the disk refuses writes ----------------------------------------------

def test_stop_with_a_refusing_disk_counts_the_lost_ticks(tmp_path: Path) -> None:
    clock = SimClock(START)
    store = Store.open(str(tmp_path / "gua.db"), now_ms=START)
    stop = threading.Event()
    service, _, log = service_for(store, SimBackend("lab", clock), clock, ticks=None, stop=stop)
    written = {"n": 0}
    real = store.write_ticks

    def refusing(ticks):
        written["n"] += 1
        if written["n"] > 5:
            if written["n"] == 12:
                stop.set()
            raise sqlite3.OperationalError("database or disk is full")
        return real(ticks)

    store.write_ticks = refusing  # type: ignore[method-assign]
    assert service.run() == 0
    store.close()
    assert "7 ticks not written at stop (database or disk is full)" in log.getvalue(), log.getvalue()
    assert (tmp_path / "gua.db.unsaved").exists()
    # The next start files the loss in the DB and removes the note.
    clock2 = SimClock(clock.wall_ms() + 60_000)
    store2 = Store.open(str(tmp_path / "gua.db"), now_ms=clock2.wall_ms())
    service2, _, log2 = service_for(store2, SimBackend("lab", clock2), clock2, ticks=2)
    assert service2.run() == 0
    store2.close()
    assert "7 ticks not written before the collector stopped" in log2.getvalue()
    assert not (tmp_path / "gua.db.unsaved").exists()
    with sqlite3.connect(tmp_path / "gua.db") as conn:
        row = conn.execute("SELECT ts_ms, end_ms, detail FROM event WHERE kind = 'db_error'").fetchone()
        assert row is not None and row[1] > row[0] and row[2].startswith("7 ticks not written"), row


def test_unsaved_note_planted_by_another_account_is_ignored(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "gua.db.unsaved")
    with pytest.raises(OSError):
        unsaved.save(str(tmp_path / "gua.db"), unsaved.Unsaved(1, 0, 1, "x"))
    assert victim.read_text() == "keep"
    assert unsaved.take(str(tmp_path / "gua.db")) == []


# --- the WAL stays bounded ---------------------------------------------------------------

def test_wal_is_bounded_once_a_long_reader_lets_go(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    clock = SimClock(START)
    store = Store.open(str(db), now_ms=START)
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM tick").fetchone()  # holds a snapshot for the whole run
    service, _, _ = service_for(store, SimBackend("lab8", clock), clock, ticks=1500)
    def release_halfway() -> None:
        while not os.path.exists(f"{db}-wal") or os.path.getsize(f"{db}-wal") < 2 * WAL_LIMIT_BYTES:
            time.sleep(0.01)
        grown["size"] = os.path.getsize(f"{db}-wal")
        reader.rollback()

    grown = {"size": 0}
    releaser = threading.Thread(target=release_halfway)
    releaser.start()
    assert service.run() == 0
    releaser.join(5)
    assert grown["size"] > WAL_LIMIT_BYTES, "the reader made the WAL grow"
    assert os.path.getsize(f"{db}-wal") <= WAL_LIMIT_BYTES, "trimmed once the reader let go"
    store.close()
    reader.close()
    wal = Path(f"{db}-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "a clean stop leaves no WAL content behind"


# --- time never overlaps ------------------------------------------------------------------

class SteppingClock(SimClock):
    """A wall clock that an NTP step sets back by an hour after a few ticks."""

    def __init__(self, start_ms: int, after_sleeps: int) -> None:
        super().__init__(start_ms)
        self.sleeps = 0
        self.after = after_sleeps
        self.offset = 0

    def wall_ms(self) -> int:
        return super().wall_ms() + self.offset

    def sleep(self, seconds, stop) -> None:
        super().sleep(seconds, stop)
        self.sleeps += 1
        if self.sleeps == self.after:
            self.offset = -3_600_000


def test_wall_clock_stepping_back_never_overlaps_stored_time(tmp_path: Path) -> None:
    clock = SteppingClock(START, after_sleeps=20)
    store = Store.open(str(tmp_path / "gua.db"), now_ms=START)
    service, _, log = service_for(store, SimBackend("lab", clock), clock, ticks=600)
    assert service.run() == 0
    store.close()
    with sqlite3.connect(tmp_path / "gua.db") as conn:
        assert overlaps(conn) == 0
        span = conn.execute("SELECT max(ts_ms) - min(ts_ms), sum(duration_ms) FROM tick").fetchone()
        assert span[0] == span[1], "GPU time equals the time covered"
        events = conn.execute("SELECT detail FROM event WHERE kind = 'clock'").fetchall()
        assert len(events) == 1 and "3600 s behind" in events[0][0], events
    assert "behind the last stored tick" in log.getvalue()


def test_clock_behind_at_start_continues_after_the_last_tick(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    clock = SimClock(START)
    store = Store.open(str(db), now_ms=START)
    assert service_for(store, SimBackend("lab", clock), clock, ticks=30)[0].run() == 0
    store.close()
    early = SimClock(START - 86_400_000)  # an RTC a day behind at boot
    store = Store.open(str(db), now_ms=early.wall_ms())
    assert service_for(store, SimBackend("lab", early), early, ticks=30)[0].run() == 0
    store.close()
    with sqlite3.connect(db) as conn:
        assert overlaps(conn) == 0
        assert conn.execute("SELECT count(*) FROM tick").fetchone()[0] == 60
        assert conn.execute("SELECT count(*) FROM event WHERE kind = 'clock'").fetchone()[0] == 1


def test_second_simulated_run_starts_after_the_first(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    for _ in range(2):
        proc = run_collector("--db", str(db), "--backend", "simulate:lab", "--ticks", "360")
        assert proc.returncode == 0, proc.stderr
    assert "starts after them" in proc.stderr
    with sqlite3.connect(db) as conn:
        assert overlaps(conn) == 0
        gpus = conn.execute("SELECT count(*) FROM gpu WHERE parent_id IS NULL").fetchone()[0]
        lo, hi = conn.execute("SELECT min(ts_ms), max(ts_ms) FROM tick").fetchone()
        gpu_ms = conn.execute(
            "SELECT sum(t.duration_ms) FROM gpu_sample g JOIN tick t USING (tick_id)"
            " JOIN gpu USING (gpu_id) WHERE parent_id IS NULL").fetchone()[0]
        assert gpu_ms <= gpus * (hi - lo)


# --- NVML outage ------------------------------------------------------------------------------

class NeverUp(SimBackend):
    def init(self) -> None:
        raise BackendInitError("NVML init failed: Driver Not Loaded")


def test_stop_during_an_nvml_outage_records_the_stretch(tmp_path: Path) -> None:
    clock = SimClock(START)
    store = Store.open(str(tmp_path / "gua.db"), now_ms=START)
    stop = threading.Event()
    service, notes, _ = service_for(store, NeverUp("lab", clock), clock, ticks=None, stop=stop)
    threading.Timer(0.3, stop.set).start()
    assert service.run() == 0
    store.close()
    assert "READY=1" in notes.sent
    with sqlite3.connect(tmp_path / "gua.db") as conn:
        gap = conn.execute("SELECT ts_ms, end_ms, detail FROM event WHERE kind = 'gap'").fetchone()
        assert gap is not None and gap[0] == START and gap[1] > gap[0] and "until stop" in gap[2], gap
