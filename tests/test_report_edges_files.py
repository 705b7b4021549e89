"""The database file as it really is: cut short, or changed under a report by a starting collector.

- A file shorter than its header says (bytes 28-31 pages of bytes 16-17
  bytes, valid when bytes 24-27 equal bytes 92-95) is corrupt: exit 7, not a
  report with rows silently missing. SQLite itself reads the missing pages
  as zeros.
- While no collector runs, gua-report reads without locks (immutable=1). A
  collector that starts (and stops) during the report checkpoints pages into
  the file under it; the report must then read again, never call the healthy
  database corrupt. The collector here is the real one, in a subprocess; the
  report is paused (SIGSTOP) in the middle of its read while the collector
  starts, writes ticks and, in one variant, stops, so the interleaving is
  the same on every run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from collector_helpers import clean_env, collector_cmd, run_collector

pytestmark = pytest.mark.timeout(300)

TICKS = 2 * 8640  # two days of 10 s ticks, ending now


@pytest.fixture(scope="module")
def stopped_db(tmp_path_factory) -> str:
    """Two days written by the real collector (fast-forward, ending now), stopped cleanly."""
    path = str(tmp_path_factory.mktemp("files") / "gua.db")
    r = run_collector("--db", path, "--backend", "simulate:lab", "--ticks", str(TICKS), "--interval", "10s",
                      timeout=240)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(path + "-wal")
    return path


def copy_of(src: str, directory) -> str:
    dst = str(directory / "gua.db")
    shutil.copy(src, dst)
    return dst


def report(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gua_report", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env())


def iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def tick_range(path: str) -> tuple[int, int]:
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return conn.execute("SELECT min(ts_ms), max(ts_ms) FROM tick").fetchone()
    finally:
        conn.close()


# ---------------------------------------------------------------- a file cut short

@pytest.mark.parametrize("cut", [100, 700, 1300, 2000, 4096, 3 * 4096 + 5])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_truncated_file_is_corrupt(stopped_db, tmp_path, cut, fmt):
    path = copy_of(stopped_db, tmp_path)
    os.truncate(path, os.path.getsize(path) - cut)
    r = subprocess.run([sys.executable, "-m", "gua_report", "--db", path, "--since", "1d", "--format", fmt],
                       capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 7, (r.returncode, r.stderr, r.stdout[:300])
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("gua-report: error: ")
    assert "is corrupt (truncated: " in r.stderr
    assert "but its header counts" in r.stderr
    if fmt == "text":
        assert r.stdout == ""


def test_healthy_and_header_size_rules(stopped_db, tmp_path):
    """The same file whole reports; a header page count that is not valid is not used."""
    path = copy_of(stopped_db, tmp_path)
    r = subprocess.run([sys.executable, "-m", "gua_report", "--db", path, "--since", "1d", "--format", "json"],
                       capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert all(g["last_status"] == "ok" for g in json.loads(r.stdout)["gpus"])
    # Version-valid-for (92-95) no longer equal to the change counter (24-27): SQLite
    # ignores the header's page count and uses the file's size, and so does the check.
    with open(path, "r+b") as f:
        f.seek(92)
        valid_for = int.from_bytes(f.read(4), "big")
        f.seek(92)
        f.write((valid_for + 1).to_bytes(4, "big"))
    os.truncate(path, os.path.getsize(path) + 4096)  # one more (empty) page than the header counts
    r = subprocess.run([sys.executable, "-m", "gua_report", "--db", path, "--since", "1d", "--format", "json"],
                       capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    # ...but a partial page at the end is still a file cut short
    os.truncate(path, os.path.getsize(path) - 100)
    r = subprocess.run([sys.executable, "-m", "gua_report", "--db", path, "--since", "1d"],
                       capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 7 and "not a whole number of 4096-byte pages" in r.stderr, r.stderr


# ---------------------------------------------------------------- a collector starting during a report

def wait_until(check, timeout: float = 30.0, step: float = 0.005) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(step)


def has_open(pid: int, path: str) -> bool:
    """Whether process `pid` has `path` open (it is reading the database)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return False
    for name in names:
        try:
            if os.readlink(os.path.join(fd_dir, name)) == path:
                return True
        except OSError:
            continue
    return False


SAME = ("headline", "gpus", "identities", "heatmap", "energy", "idle_capacity")


@pytest.mark.parametrize("then_stop", [True, False], ids=["collector-stops", "collector-runs-on"])
@pytest.mark.parametrize("pause_s", [0.0, 0.05, 0.15, 0.3])
def test_collector_starting_during_a_report(stopped_db, tmp_path, then_stop, pause_s):
    """The report is paused mid-read; the real collector starts, writes, maybe stops; the report goes on.

    The window ends at the stopped database's last tick, so the collector's
    new ticks are outside it: the report must equal the one made before.
    (Without a second read this failed "database disk image is malformed",
    exit 7, every time the collector stopped before the report went on.)
    """
    path = copy_of(stopped_db, tmp_path)
    first, last = tick_range(path)
    window = ("--db", path, "--format", "json", "--tz", "UTC",
              "--since", iso(first), "--until", iso(last + 1), "--no-rollups")
    base = report(*window)
    out, err = base.communicate(timeout=120)
    assert base.returncode == 0, err
    expected = json.loads(out)

    rep = report(*window)
    collector = None
    try:
        wait_until(lambda: has_open(rep.pid, path) or rep.poll() is not None)
        time.sleep(pause_s)
        rep.send_signal(signal.SIGSTOP)
        collector = subprocess.Popen(
            collector_cmd("--db", path, "--backend", "simulate:lab", "--interval", "1s"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
        # its first ticks are committed to the -wal ...
        wait_until(lambda: os.path.exists(path + "-wal") and os.path.getsize(path + "-wal") > 0)
        time.sleep(1.5)
        if then_stop:
            # ... and a clean stop checkpoints them into the file under the paused report
            collector.send_signal(signal.SIGTERM)
            assert collector.wait(timeout=30) == 0
            assert not os.path.exists(path + "-wal")
        rep.send_signal(signal.SIGCONT)
        out, err = rep.communicate(timeout=120)
    finally:
        if rep.poll() is None:
            rep.send_signal(signal.SIGCONT)
            rep.kill()
        if collector is not None and collector.poll() is None:
            collector.send_signal(signal.SIGTERM)
            collector.wait(timeout=30)
    assert rep.returncode == 0, err
    got = json.loads(out)
    assert {k: got[k] for k in SAME} == {k: expected[k] for k in SAME}
    assert tick_range(path)[1] > last  # the collector did write


def test_reads_again_at_most_read_tries(stopped_db, tmp_path, monkeypatch):
    """Files that change under every lock-free read: a bounded number of reads, then one
    line that does not call the database corrupt (it may be healthy)."""
    from zoneinfo import ZoneInfo

    from gua_report import classify, opendb
    from gua_report.errors import ReportError

    path = copy_of(stopped_db, tmp_path)
    first, last = tick_range(path)
    opens = []
    real_open = opendb.open_readonly

    def counting_open(p: str) -> opendb.OpenedDb:
        opens.append(p)
        return real_open(p)

    monkeypatch.setattr(opendb, "open_readonly", counting_open)
    monkeypatch.setattr(opendb, "changed_under", lambda conn: True)
    monkeypatch.setattr(opendb, "settle", lambda attempt: None)
    db = real_open(path)
    assert db.immutable  # no collector: read without locks
    opts = classify.Options(since_ms=first, until_ms=last + 1, tz=ZoneInfo("UTC"), tz_name="UTC")
    with pytest.raises(ReportError) as info:
        classify.build(db.conn, path, db.schema_version, opts)
    db.conn.close()
    assert len(opens) == opendb.READ_TRIES - 1
    assert "changed during each of" in info.value.message and "not known to be corrupt" in info.value.message
