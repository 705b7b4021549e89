"""Window, threshold and time-zone parsing; heatmap cells; text layout and colour."""

from __future__ import annotations

import os
import pty
import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from gua_report import query
from gua_report.window import (
    HOUR_MS,
    MAX_MS,
    MIN_MS,
    WindowError,
    offset_segments,
    parse_bytes,
    parse_duration_ms,
    parse_instant,
    parse_percent_permille,
    zone,
)
from report_helpers import T0, G, HandDb, P, run_report

pytestmark = pytest.mark.timeout(60)

NOW = T0 + 12 * HOUR_MS + 34_000


@pytest.mark.parametrize("text,ms", [
    ("90m", 90 * 60_000), ("12h", 12 * HOUR_MS), ("7d", 7 * 24 * HOUR_MS), ("2w", 14 * 24 * HOUR_MS),
    ("30s", 30_000), ("1.5h", 90 * 60_000), (" 7D ", 7 * 24 * HOUR_MS),
    ("1h30m", 90 * 60_000), ("1h 30min", 90 * 60_000), ("2 days", 2 * 24 * HOUR_MS),
    ("0.001s", 1), ("1.0000000001h", HOUR_MS),
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
    for bad in ("yesterday-ish", "7x", "2024-02-30", "", "10:61", "2024-01-01 09:30 Mars/Base",
                "1e3h", "\u0667d", "7 d d"):
        with pytest.raises(WindowError):
            parse_instant(bad, NOW, UTC)


def test_journalctl_times():
    """systemd.time(7) forms, as journalctl --since takes them, in the report's zone."""
    berlin = ZoneInfo("Europe/Berlin")
    now = T0 + 12 * HOUR_MS + 34_000  # Monday 2024-01-01 12:00:34 UTC, 13:00:34 in Berlin
    assert parse_instant("today", now, UTC) == T0
    assert parse_instant("yesterday", now, UTC) == T0 - 24 * HOUR_MS
    assert parse_instant("Tomorrow", now, UTC) == T0 + 24 * HOUR_MS
    assert parse_instant("today", now, berlin) == T0 - HOUR_MS  # Berlin's midnight
    late = T0 + 23 * HOUR_MS + 30 * 60_000  # 23:30 UTC is already Tuesday in Berlin
    assert parse_instant("today", late, berlin) == T0 + 23 * HOUR_MS
    assert parse_instant("-2h", now, UTC) == now - 2 * HOUR_MS
    assert parse_instant("2h ago", now, UTC) == now - 2 * HOUR_MS
    assert parse_instant("-1h30m", now, UTC) == now - 90 * 60_000
    assert parse_instant("2024-01-01 10:00", now, UTC) == T0 + 10 * HOUR_MS
    assert parse_instant("2024-01-01 10:00:30", now, berlin) == T0 + 9 * HOUR_MS + 30_000
    assert parse_instant("2024-01-01 10:00 UTC", now, berlin) == T0 + 10 * HOUR_MS
    assert parse_instant("2024-01-01 10:00 Asia/Kolkata", now, UTC) == T0 + 4 * HOUR_MS + 30 * 60_000
    assert parse_instant("2024-01-01 UTC", now, berlin) == T0
    assert parse_instant("09:15", now, UTC) == T0 + 9 * HOUR_MS + 15 * 60_000
    assert parse_instant("@1704067200", now, berlin) == T0
    assert parse_instant("@1704067200.5", now, berlin) == T0 + 500


def test_since_duration_counts_from_until_journal_forms_from_now():
    until = NOW - 30 * 24 * HOUR_MS
    assert parse_instant("7d", NOW, UTC, until) == until - 7 * 24 * HOUR_MS
    assert parse_instant("-7d", NOW, UTC, until) == NOW - 7 * 24 * HOUR_MS
    assert parse_instant("7d ago", NOW, UTC, until) == NOW - 7 * 24 * HOUR_MS
    assert parse_instant("now", NOW, UTC, until) == NOW


def test_future_times_refused():
    for text in ("+2h", "+1d"):
        with pytest.raises(WindowError, match="future"):
            parse_instant(text, NOW, UTC)


@pytest.mark.parametrize("text", [
    "800000d", "9999999999999999999999w", "-800000d", "99999999999999999999999999999999999999s",
    "1" * 5000 + "s", "0001-01-01", "1899-12-31", "9999-06-01", "9999-12-31T23:59:59",
    "@99999999999999", "2000000h ago", "10000000w",
])
def test_out_of_range_instants_are_window_errors(text):
    with pytest.raises(WindowError):
        parse_instant(text, NOW, UTC)


def test_range_edges():
    assert parse_instant("1900-01-01", NOW, UTC) == MIN_MS
    assert parse_instant("1970-01-01", NOW, ZoneInfo("Europe/Berlin")) == -HOUR_MS  # before the epoch is fine
    assert parse_instant("9998-12-31T23:59:59", NOW, UTC) < MAX_MS


_NASTY = [
    "", " ", "-", "+", "@", "@-1", "--1d", "-+1d", ".5d", "5.d", "5..5d", "1e9d", "1E-3h", "nan", "inf",
    "-inf", "NaN%", "1_000", "0x10", "\x00", "7d\x00", "\x1b[2J", "\u202e7d", "7d\u202e", "\uff17d",
    "\u0661\u0660", "\U0001d7d5d", "9" * 30, "9" * 4301, "9" * 30 + "." + "9" * 30, "." * 100,
    "2024-01-01T", "2024-01-01T25:00", "2024-13-01", "0000-00-00", "10000-01-01", "-2024-01-01",
    "2024-01-01 10:00 ../../etc/passwd", "2024-01-01 10:00 /etc/localtime", "now now", "today UTC",
    "24:00", "99:99:99", "1h -1m", "1 h", "h", "5 ago", "ago", "1d ago ago", "+-1d", "-0s", "0s",
    "100%", "100.0001", "101%", "-0", "0.0", "5", "5 MB", "5 MiB ", "1000TB", "1000.000001TB",
    "1e3MB", "99999999999999999999999TB", "\t10\n", "10 %%", "%", "1e-9",
]


def test_fuzz_parsers_raise_only_window_errors():
    """Whatever is typed: a value in range or a WindowError (exit 2), never another exception."""
    import random

    rng = random.Random(1234)
    alphabet = "0123456789.:-+@ TZdhmswaognrtuyMBGiKk%\x1b\u202e\xa0/_"
    corpus = list(_NASTY)
    for _ in range(3000):
        corpus.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))))
    for a in list(_NASTY):
        for b in ("d", "h", "MB", "%", " ago", " UTC"):
            corpus.append(a + b)
    for text in corpus:
        for tz in (UTC, ZoneInfo("Pacific/Kiritimati"), ZoneInfo("Pacific/Pago_Pago")):
            for base in (None, NOW, MIN_MS + 1):
                try:
                    ms = parse_instant(text, NOW, tz, base)
                except WindowError:
                    continue
                assert MIN_MS <= ms < MAX_MS, (text, ms)
        try:
            pm = parse_percent_permille(text)
            assert 0 <= pm <= 1000, (text, pm)
        except WindowError:
            pass
        try:
            b = parse_bytes(text)
            assert 0 <= b <= 10**15, (text, b)
        except WindowError:
            pass
        try:
            zone(text)
        except WindowError:
            pass


def test_thresholds():
    assert parse_percent_permille("10") == 100
    assert parse_percent_permille("7.5%") == 75
    assert parse_percent_permille("7.55") == 76  # half up, exactly (no float)
    assert parse_percent_permille("100") == 1000
    assert parse_bytes("100MB") == 100_000_000
    assert parse_bytes("1.5 kB") == 1500
    assert parse_bytes("0.5KiB") == 512
    assert parse_bytes("1000TB") == 10**15
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1GB") == 10**9
    assert parse_bytes("2 GiB") == 2 * 2**30
    assert parse_bytes("0") == 0
    for bad in ("-5", "101", "x", "nan", "inf", "1e1", "100.01"):
        with pytest.raises(WindowError):
            parse_percent_permille(bad)
    for bad in ("12 parsecs", "1001TB", "99999999999999999999999TB", "-1MB", "1e3MB"):
        with pytest.raises(WindowError):
            parse_bytes(bad)


@pytest.mark.parametrize("text", ["5", "100", "0.5", " 7 "])
def test_size_without_unit_is_refused(text):
    """5 bytes, 5 MB or 5 GB? A wrong guess changes every idle-held number silently."""
    with pytest.raises(WindowError, match="no unit"):
        parse_bytes(text)


def test_zero_size_needs_no_unit():
    assert parse_bytes("0") == 0
    assert parse_bytes("0.0") == 0


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
    env["TERM"] = "xterm-256color"
    assert "\x1b[" in _run_in_pty(args, env)
    assert "\x1b[" not in _run_in_pty(args, {**env, "NO_COLOR": "1"})
    assert "\x1b[" not in run_report(*args).stdout  # a pipe


def test_color_option_and_environment(busy_db):
    """--color=auto|always|never; auto: a TTY, TERM not dumb, NO_COLOR empty or unset."""
    args = ["--db", busy_db, "--since", "2024-01-01", "--until", "2024-01-02", "--tz", "UTC"]
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["TERM"] = "xterm"
    plain = run_report(*args).stdout
    assert "\x1b[" in _run_in_pty([*args, "--color=auto"], env)
    assert "\x1b[" in _run_in_pty(args, {**env, "NO_COLOR": ""})  # empty: does not count (no-color.org)
    assert "\x1b[" not in _run_in_pty(args, {**env, "TERM": "dumb"})
    assert "\x1b[" not in _run_in_pty(args, {k: v for k, v in env.items() if k != "TERM"})
    never = _run_in_pty([*args, "--color", "never"], env)
    assert "\x1b[" not in never
    assert never.replace("\r\n", "\n") == plain  # same layout, only the escapes differ
    always = run_report(*args, "--color=always").stdout  # a pipe, but asked for
    assert "\x1b[" in always
    assert "\x1b[" in run_report(*args, "--color=always", env={"NO_COLOR": "1", "TERM": "dumb"}).stdout
    assert re.sub(r"\x1b\[[0-9;]*m", "", always) == plain
    assert "\x1b[" not in run_report(*args, "--color=always", "--format", "csv").stdout
    r = run_report(*args, "--color=sometimes")
    assert r.returncode == 2 and "--color" in r.stderr
