"""gua-collector's command line: bad input gets one line and a distinct exit code, files untouched."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from collector_helpers import clean_env, collector_cmd, run_collector

pytestmark = pytest.mark.timeout(60)


def digest(path: Path) -> tuple[str, float]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gua-collector: error:"), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--interval", "soon"], "not a duration"),
        (["--interval", "0s"], "positive"),
        (["--interval", "500ms"], "at least 1s"),
        (["--retention", "3 fortnights"], "not a duration"),
        (["--unit-retention", "30d"], "unit_retention (30d) must be at least retention (90d)"),
        (["--retention", "500d"], "unit_retention (400d) must be at least retention (500d)"),
        (["--unit-retention", "soon"], "not a duration"),
        (["--backend", "cuda"], "unknown backend"),
        (["--backend", "simulate:nowhere"], "unknown scenario"),
        (["--ticks", "0", "--backend", "simulate"], "--ticks"),
        (["--bogus"], "unrecognized arguments"),
        (["--start", "yesterday", "--backend", "simulate", "--ticks", "2"], "ISO"),
        (["--start", "0001-01-01", "--backend", "simulate", "--ticks", "2"], "--start"),
        (["--backend", "simulate", "--ticks", "99999999999999999999"], "--ticks must be between"),
        (["--interval", "2h"], "at most 1h"),
        (["--retention", "9999999999999999999999d"], "too long"),
        (["--retention", "9" * 400], "too long"),
    ],
)
def test_bad_flags_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = run_collector("--db", str(tmp_path / "gua.db"), *args)
    assert_one_line_error(proc, 2, needle)
    assert not (tmp_path / "gua.db").exists(), "a bad option must not create the database"


def test_bad_config_file_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "gua.conf"
    config.write_text("[collector]\ninterval = 10s\ncolour = blue\n")
    assert_one_line_error(run_collector("--config", str(config)), 2, "unknown key 'colour'")
    config.write_text("this is not ini\n")
    assert_one_line_error(run_collector("--config", str(config)), 2, "config")
    assert_one_line_error(run_collector("--config", str(tmp_path / "missing.conf")), 2, "cannot read config")
    config.write_bytes(b"[collector]\ninterval = 10s\ntextfile = /tmp/\xff\xfe.prom\n")
    assert_one_line_error(run_collector("--config", str(config)), 2, "not UTF-8")


def test_percent_in_a_config_value_is_a_character(tmp_path: Path) -> None:
    config = tmp_path / "gua.conf"
    db = tmp_path / "100%" / "gua.db"
    db.parent.mkdir()
    config.write_text(f"[collector]\ndb = {db}\nbackend = simulate\n")
    proc = run_collector("--config", str(config), "--ticks", "2")
    assert proc.returncode == 0, proc.stderr
    assert db.exists()


def test_config_file_values_are_used_and_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "gua.conf"
    db = tmp_path / "from-config.db"
    config.write_text(f"[collector]\ndb = {db}\ninterval = 30s\nbackend = simulate:lab\n")
    proc = run_collector("--config", str(config), "--ticks", "3", "--interval", "20s")
    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT interval_ms, backend FROM run").fetchone() == (20_000, "simulate:lab")
        assert [r[0] for r in conn.execute("SELECT duration_ms FROM tick ORDER BY tick_id")] == [0, 20_000, 20_000]


def test_missing_directory_exit_3(tmp_path: Path) -> None:
    proc = run_collector("--db", str(tmp_path / "nowhere" / "gua.db"), "--backend", "simulate", "--ticks", "1")
    assert_one_line_error(proc, 3, "does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write any directory; run as a normal user to test EACCES")
def test_unwritable_directory_exit_4(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    proc = run_collector("--db", str(locked / "gua.db"), "--backend", "simulate", "--ticks", "1")
    assert_one_line_error(proc, 4, "permission denied")


def test_unwritable_directory_as_unprivileged_user(shared_dir: str) -> None:
    """The same check for real when the tests run as root: drop to nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user (covered by the non-root test)")
    import sys

    locked = Path(shared_dir)

    proc = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m", "gua_collector",
         "--db", str(locked / "gua.db"), "--backend", "simulate", "--ticks", "1"],
        capture_output=True, text=True, timeout=30, env=clean_env(PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert_one_line_error(proc, 4, "permission denied")
    assert not (locked / "gua.db").exists()


def test_not_sqlite_exit_5_untouched(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    db.write_text("these are someone's notes, not a database\n" * 20)
    before = digest(db)
    assert_one_line_error(run_collector("--db", str(db), "--backend", "simulate", "--ticks", "1"), 5, "not an SQLite database")
    assert digest(db) == before


def test_foreign_sqlite_exit_5_untouched(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE recipes (name TEXT)")
    conn.commit()
    conn.close()
    before = digest(db)
    assert_one_line_error(run_collector("--db", str(db), "--backend", "simulate", "--ticks", "1"), 5, "not a gua database")
    assert digest(db) == before


def test_newer_schema_exit_6_untouched(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    assert run_collector("--db", str(db), "--backend", "simulate", "--ticks", "2").returncode == 0
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()  # checkpoints: the change is in the main file now
    before = digest(db)
    assert_one_line_error(run_collector("--db", str(db), "--backend", "simulate", "--ticks", "1"), 6, "newer")
    assert digest(db) == before


def test_corrupt_exit_7_untouched(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    # A valid header followed by garbage pages.
    db.write_bytes(b"SQLite format 3\x00" + b"\x10\x00\x01\x01" + os.urandom(8192))
    before = digest(db)
    assert_one_line_error(run_collector("--db", str(db), "--backend", "simulate", "--ticks", "1"), 7, "corrupt")
    assert digest(db) == before


def test_second_collector_refused_exit_8(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    first = subprocess.Popen(
        collector_cmd("--db", str(db), "--backend", "simulate:lab", "--interval", "1s"),
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not db.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert_one_line_error(run_collector("--db", str(db), "--backend", "simulate", "--ticks", "1"), 8, "already writing")
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(10) == 0


def test_restart_appends_and_records_the_gap(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    args = ["--db", str(db), "--backend", "simulate:lab", "--interval", "10s", "--ticks", "5"]
    assert run_collector(*args, "--start", "2026-03-02T08:00:00").returncode == 0
    assert run_collector(*args, "--start", "2026-03-02T09:00:00").returncode == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM run").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM tick").fetchone()[0] == 10
        gap = conn.execute("SELECT ts_ms, end_ms, detail FROM event WHERE kind = 'gap'").fetchall()
        assert len(gap) == 1 and gap[0][2] == "collector stopped"
        assert gap[0][1] - gap[0][0] == 3600_000 - 40_000


def test_database_created_0640(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    old = os.umask(0o077)
    try:
        assert run_collector("--db", str(db), "--backend", "simulate", "--ticks", "1").returncode == 0
    finally:
        os.umask(old)
    assert db.stat().st_mode & 0o777 == 0o640


def test_kill_9_mid_run_leaves_every_committed_tick(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    proc = subprocess.Popen(
        collector_cmd("--db", str(db), "--backend", "simulate:lab8", "--interval", "1s"),
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        seen: list[tuple[int, int, int]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(seen) < 4:
            time.sleep(0.3)
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                    seen = conn.execute(
                        "SELECT t.tick_id, t.ts_ms, count(g.gpu_id) FROM tick t JOIN gpu_sample g USING (tick_id) GROUP BY t.tick_id"
                    ).fetchall()
            except sqlite3.OperationalError:
                continue
        assert len(seen) >= 4, "collector did not write ticks"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        after = {row[0]: row for row in conn.execute(
            "SELECT t.tick_id, t.ts_ms, count(g.gpu_id) FROM tick t JOIN gpu_sample g USING (tick_id) GROUP BY t.tick_id"
        )}
    for row in seen:
        assert after.get(row[0]) == row, f"committed tick {row} changed or vanished"
    # And the collector can carry on with the same file.
    from datetime import datetime, timedelta, timezone

    later = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
    proc = subprocess.run(collector_cmd("--db", str(db), "--backend", "simulate:lab8", "--ticks", "2", "--start", later),
                          env=clean_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(db) as conn:
        detail = conn.execute("SELECT detail FROM event WHERE kind = 'gap'").fetchall()
    assert len(detail) == 1 and "did not stop cleanly" in detail[0][0], detail


def test_help_fits_80_columns_and_names_values(tmp_path: Path) -> None:
    proc = subprocess.run(collector_cmd("--help"), capture_output=True, text=True, timeout=30,
                          env=clean_env(COLUMNS="200"))
    assert proc.returncode == 0
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80, proc.stdout
    assert "--db PATH" in proc.stdout and "--interval DURATION" in proc.stdout and "--ticks N" in proc.stdout
