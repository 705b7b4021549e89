"""Window, threshold and time-zone parsing; heatmap cells; text layout and colour."""

from __future__ import annotations

import os
import pty
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from gua_report import query
from gua_report.window import (
    HOUR_MS,
    WindowError,
    offset_segments,
    parse_bytes,
    parse_duration_ms,
    parse_instant,
    parse_percent_permille,
)
from report_helpers import T0, G, HandDb, P, run_report

pytestmark = pytest.mark.timeout(60)

NOW = T0 + 12 * HOUR_MS + 34_000


@pytest.mark.parametrize("text,ms", [
    ("90m", 90 * 60_000), ("12h", 12 * HOUR_MS), ("7d", 7 * 24 * HOUR_MS), ("2w", 14 * 24 * HOUR_MS),
    ("30s", 30_000), ("1.5h", 90 * 60_000), (" 7D ", 7 * 24 * HOUR_MS),
])
def test_durations(text, ms):
    assert parse_duration_ms(text) == ms
    assert parse_instant(text, NOW, UTC) == NOW - ms


def test_iso_instants():
    berlin = ZoneInfo("Europe/Berlin")
    assert parse_instant("2024-01-01", NOW, UTC) == T0
    assert parse_instant("2024-01-01", NOW, berlin) == T0 - HOUR_MS  # local midnight
    assert parse_instant("2024-07-01", NOW, berlin) == int(
        datetime(2024, 6, 30, 22, tzinfo=UTC).timestamp() * 1000)  # CEST
    assert parse_instant("2024-01-01T09:30", NOW, UTC) == T0 + 9 * HOUR_MS + 30 * 60_000
    assert parse_instant("2024-01-01T09:30Z", NOW, berlin) == T0 + 9 * HOUR_MS + 30 * 60_000
    assert parse_instant("2024-01-01 09:30+02:00", NOW, berlin) == T0 + 7 * HOUR_MS + 30 * 60_000
    assert parse_instant("now", NOW, berlin) == NOW
    for bad in ("yesterday", "7x", "2024-02-30", ""):
        with pytest.raises(WindowError):
            parse_instant(bad, NOW, UTC)


def test_thresholds():
    assert parse_percent_permille("10") == 100
    assert parse_percent_permille("7.5%") == 75
    assert parse_bytes("100MB") == 100_000_000
    assert parse_bytes("100") == 100_000_000
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1GB") == 10**9
    assert parse_bytes("2 GiB") == 2 * 2**30
    assert parse_bytes("0") == 0
    for bad in ("-5", "101", "x"):
        with pytest.raises(WindowError):
            parse_percent_permille(bad)
    with pytest.raises(WindowError):
        parse_bytes("12 parsecs")


def test_offset_segments_follow_dst():
    berlin = ZoneInfo("Europe/Berlin")
    start = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1000)
    end = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000)
    segs = offset_segments(berlin, start, end)
    assert [(datetime.fromtimestamp(s.start_ms / 1000, UTC).isoformat(), s.offset_ms // 60_000)
            for s in segs] == [
        ("2024-01-01T00:00:00+00:00", 60),
        ("2024-03-31T01:00:00+00:00", 120),
        ("2024-10-27T01:00:00+00:00", 60),
    ]
    assert len(offset_segments(UTC, start, end)) == 1


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "Asia/Kolkata", "America/St_Johns",
                                "Australia/Lord_Howe"])
def test_cell_expression_matches_python(tz):
    """The SQL weekday/hour of a timestamp equals Python's, across a year of DST changes."""
    zone = ZoneInfo(tz)
    start = T0
    end = T0 + 366 * 24 * HOUR_MS
    segs = offset_segments(zone, start, end)
    conn = sqlite3.connect(":memory:")
    expr = query.cell_expr(":ts", segs)
    step = 24 * HOUR_MS // 7 + 1_234_567  # wanders through every hour and minute
    for ts in range(start, end, step):
        dt = datetime.fromtimestamp(ts / 1000, zone)
        assert conn.execute(f"SELECT {expr}", {"ts": ts}).fetchone()[0] == dt.weekday() * 24 + dt.hour, (
            tz, dt.isoformat())


@pytest.fixture(scope="module")
def busy_db(tmp_path_factory) -> str:
    """Many users, long names, a long unit: the text must still fit 80 columns."""
    path = str(tmp_path_factory.mktemp("layout") / "gua.db")
    db = HandDb(path)
    gpus = [db.gpu(i, name="NVIDIA GeForce RTX 4090 Laptop GPU Extra Long Name") for i in range(3)]
    procs = []
    for n in range(14):
        a = db.account(f"user-with-a-rather-long-name-{n:02d}", 2000 + n)
        procs.append(db.process(1000 + n, a, unit=f"container:docker/{'ab' * 32}" if n % 3 == 0 else ""))
    r = db.run(T0)
    for t in range(1, 200):
        samples = []
        for i, g in enumerate(gpus):
            mine = tuple(P(p, mem=1000 + 10 * n, sm=(t * n) % 30) for n, p in enumerate(procs) if n % 3 == i)
            samples.append(G(g, util=(t * 37 + i * 101) % 1000, energy=250 * 10_000, procs=mine))
        db.tick(r, T0 + t * 10_000 + (3 * HOUR_MS if t > 100 else 0), 10_000, *samples)
    db.event(T0 + 5000, "init_failed", r, detail="NVML_ERROR_DRIVER_NOT_LOADED " + "x" * 100)
    db.close()
    return path


def test_text_fits_80_columns(busy_db):
    r = run_report("--db", busy_db, "--since", "2024-01-01", "--until", "2024-01-02", "--tz",
                   "Asia/Kolkata")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(x) for x in lines) <= 80, max(lines, key=len)
    assert "... 4 more" in r.stdout  # top 10 users shown, the rest summed
    assert "init_failed" in r.stdout
    assert r.stdout.isascii()


def _run_in_pty(args: list[str], env: dict[str, str]) -> str:
    """Run gua-report with stdout on a pseudo-terminal; return what it wrote."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "gua_report", *args], stdout=slave,
                         stderr=subprocess.PIPE, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    p.wait(timeout=30)
    os.close(master)
    assert p.returncode == 0, p.stderr.read()
    return b"".join(chunks).decode()


def test_colour_only_on_tty_without_no_color(busy_db):
    args = ["--db", busy_db, "--since", "2024-01-01", "--until", "2024-01-02", "--tz", "UTC"]
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    assert "\x1b[" in _run_in_pty(args, env)
    assert "\x1b[" not in _run_in_pty(args, {**env, "NO_COLOR": "1"})
    assert "\x1b[" not in run_report(*args).stdout  # a pipe
