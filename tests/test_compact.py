"""Compacted raw rows (schema 5): the collector moves old hours into raw_chunk; reports do not change.

Every report here runs on a compacted database and on its twin whose rows
stayed rows (the same file before compaction, or with its chunks expanded
back), and the two JSON documents must be equal but for the path: windows
with partial edge hours, half-hour zones, thresholds the histograms answer
and ones only raw rows answer, --no-rollups, overlapping ticks (the clipped
queries that look back past a window's start), retention, the CSV time
series. Then what a broken host or a damaged file can make of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3

import pytest

from collector_helpers import run_collector
from gua_collector import compact
from report_helpers import (
    HOUR,
    T0,
    build_store_db,
    compact_all,
    expand_chunks,
    prune_raw,
    report_json,
    run_report,
)
from test_report_edges_overlap import step_back_db

pytestmark = pytest.mark.timeout(180)

INTERVAL = 60_000
START = 1_712_318_400_000  # 2024-04-05 12:00 UTC: Adelaide leaves DST 2024-04-06
END = START + 30 * HOUR
WINDOWS = {
    "whole": ("--since", "2024-04-05T12:00Z", "--until", "2024-04-06T18:00Z"),
    "partial edges": ("--since", "2024-04-05T13:17:13Z", "--until", "2024-04-06T11:42:05Z"),
    "inside one hour": ("--since", "2024-04-05T15:05Z", "--until", "2024-04-05T15:35Z"),
}
ARGS = {
    "default": (),
    "Adelaide": ("--tz", "Australia/Adelaide"),
    "Kathmandu, active 50%": ("--tz", "Asia/Kathmandu", "--active-threshold", "50"),
    "active 7.5% (raw)": ("--active-threshold", "7.5"),
    "held 2GB (raw)": ("--held-threshold", "2GB"),
    "no rollups": ("--no-rollups",),
    "bob": ("--user", "bob", "--tz", "Asia/Kolkata"),
}


def used_pages(path: str) -> int:
    conn = sqlite3.connect(path)
    used = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    conn.close()
    return used


def without_path(doc: dict) -> dict:
    doc = dict(doc)
    doc["database"] = {k: v for k, v in doc["database"].items() if k != "path"}
    return doc


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[str, str]:
    """30 hours of lab8 with a crash and a 40 min hole: as written, and compacted but for the last two hours.

    (The collector keeps the last compact.HEAD_HOURS as rows; keeping two
    here puts nearly every window of these tests on decoded chunks.)
    """
    d = tmp_path_factory.mktemp("twins")
    plain = build_store_db(str(d / "plain.db"), "lab8", START, END, INTERVAL, hole_at_ms=START + 17 * HOUR + 1_234_567)
    packed = str(d / "packed.db")
    shutil.copy(plain, packed)
    assert compact_all(packed, now_ms=END, head_hours=2) == 28
    return plain, packed


def hours_of(path: str) -> tuple[set[int], set[int], list[int], int]:
    """(hours with gpu_sample rows, hours with proc_sample rows, chunk hours in order, newest tick's hour)."""
    conn = sqlite3.connect(path)
    newest_hour = conn.execute("SELECT max(ts_ms) FROM tick").fetchone()[0] // HOUR
    row_hours = {h for (h,) in conn.execute(
        "SELECT DISTINCT t.ts_ms / 3600000 FROM gpu_sample g JOIN tick t USING (tick_id)")}
    proc_hours = {h for (h,) in conn.execute(
        "SELECT DISTINCT t.ts_ms / 3600000 FROM proc_sample p JOIN tick t USING (tick_id)")}
    chunk_hours = [h for (h,) in conn.execute("SELECT hour FROM raw_chunk ORDER BY hour")]
    conn.close()
    return row_hours, proc_hours, chunk_hours, newest_hour


def test_compaction_keeps_the_last_day_as_rows(twins, tmp_path):
    db = str(tmp_path / "gua.db")
    shutil.copy(twins[0], db)
    assert compact_all(db, now_ms=END) == 30 - compact.HEAD_HOURS
    rows, procs, chunks, newest = hours_of(db)
    assert rows == procs == set(range(newest - compact.HEAD_HOURS + 1, newest + 1))
    # The 40 min hole ends inside an hour: every hour has its chunk, once.
    assert chunks == list(range(START // HOUR, newest - compact.HEAD_HOURS + 1))


def test_compacted_hours_hold_every_row_once(twins):
    plain, packed = twins
    rows, procs, chunks, newest = hours_of(packed)
    assert rows == procs == {newest - 1, newest}
    assert chunks == list(range(START // HOUR, newest - 1))
    conn = sqlite3.connect(packed)
    rows_now = conn.execute("SELECT count(*) FROM gpu_sample").fetchone()[0]
    conn.close()
    before = sqlite3.connect(plain)
    assert before.execute("SELECT count(*) FROM gpu_sample").fetchone()[0] > 10 * rows_now
    before.close()
    # The file keeps its size (freed pages are reused by the ticks to come); the pages in use are fewer.
    assert used_pages(packed) < used_pages(plain) / 2


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("args", ARGS)
def test_reports_on_compacted_hours_are_unchanged(twins, window, args):
    plain, packed = twins
    a = report_json(plain, *WINDOWS[window], *ARGS[args])
    b = report_json(packed, *WINDOWS[window], *ARGS[args])
    assert a["headline"]["known_ms"] > 0
    assert without_path(a) == without_path(b)


def test_the_hourly_csv_series_is_unchanged(twins):
    plain, packed = twins
    out = []
    for db in twins:
        r = run_report("--db", db, *WINDOWS["partial edges"], "--format", "csv", "--table", "hour",
                       "--tz", "Asia/Kolkata", "--active-threshold", "7.5")
        assert r.returncode == 0, r.stderr
        out.append(r.stdout)
    assert out[0] == out[1] and out[0].count("\n") > 8 * 20


def test_a_report_that_decodes_chunks_writes_nothing(twins, tmp_path):
    _, packed = twins
    db = tmp_path / "gua.db"
    shutil.copy(packed, db)
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    os.chmod(db, 0o440)
    os.chmod(tmp_path, 0o550)
    try:
        doc = report_json(str(db), *WINDOWS["partial edges"], "--no-rollups")
    finally:
        os.chmod(tmp_path, 0o750)
    assert doc["headline"]["known_ms"] > 0
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gua.db"]


@pytest.mark.parametrize("shift_ms", [0, -5_000])
def test_overlapping_ticks_read_the_same_from_chunks(tmp_path, shift_ms):
    """The clipped queries look back from a window's first tick: across into a compacted hour."""
    plain, packed = str(tmp_path / "plain.db"), str(tmp_path / "packed.db")
    step_back_db(plain, shift_ms)
    shutil.copy(plain, packed)
    assert compact_all(packed, now_ms=T0 + 2 * HOUR, head_hours=0) == 2
    for window in (("--since", "2024-01-01T00:00Z", "--until", "2024-01-01T02:00Z"),
                   ("--since", "2024-01-01T01:00:03Z", "--until", "2024-01-01T01:40Z")):
        for extra in ((), ("--no-rollups",)):
            a, b = report_json(plain, *window, *extra), report_json(packed, *window, *extra)
            assert a["data_quality"] == b["data_quality"]
            assert without_path(a) == without_path(b)


def test_retention_drops_whole_compacted_hours(twins, tmp_path):
    plain, packed = str(tmp_path / "plain.db"), str(tmp_path / "packed.db")
    shutil.copy(twins[0], plain)
    shutil.copy(twins[1], packed)
    cut = START + 5 * HOUR + 1_800_000  # inside an hour: that hour's chunk stays, its ticks before the cut go
    for db in (plain, packed):
        prune_raw(db, cut, now_ms=END)
    conn = sqlite3.connect(packed)
    assert conn.execute("SELECT min(hour) FROM raw_chunk").fetchone()[0] == cut // HOUR
    conn.close()
    window = ("--since", "2024-04-05T15:10Z", "--until", "2024-04-06T02:00Z", "--no-rollups")
    assert without_path(report_json(plain, *window)) == without_path(report_json(packed, *window))


def test_expanding_the_chunks_gives_back_the_original_rows(twins, tmp_path):
    twin = str(tmp_path / "expanded.db")
    shutil.copy(twins[1], twin)
    expand_chunks(twin)
    query = ("SELECT * FROM gpu_sample ORDER BY tick_id, gpu_id",
             "SELECT * FROM proc_sample ORDER BY tick_id, gpu_id, proc_id")
    got, want = sqlite3.connect(twin), sqlite3.connect(twins[0])
    for q in query:
        assert got.execute(q).fetchall() == want.execute(q).fetchall()


def test_an_hour_that_cannot_be_encoded_stays_rows_and_the_next_is_compacted(twins, tmp_path):
    """A REAL where an integer belongs (a hand-edited or damaged row): kept as rows, never lost or rounded."""
    plain, packed = str(tmp_path / "plain.db"), str(tmp_path / "packed.db")
    shutil.copy(twins[0], plain)
    conn = sqlite3.connect(plain)
    tick = conn.execute("SELECT min(tick_id) FROM tick WHERE ts_ms >= ?", (START + HOUR,)).fetchone()[0]
    conn.execute("UPDATE gpu_sample SET energy_mj = 123.25 WHERE tick_id = ? AND gpu_id = 1", (tick,))
    conn.commit()
    conn.close()
    shutil.copy(plain, packed)
    from gua_collector.store import Store

    store = Store.open(packed, now_ms=END)
    try:
        first, second, third = store.compact(), store.compact(), store.compact()
    finally:
        store.close()
    assert first and second and third
    assert not first.kept and first.hour == START // HOUR
    assert second.hour == START // HOUR + 1 and "gpu_sample.energy_mj: float value" in second.kept
    assert not third.kept and third.hour == START // HOUR + 2
    conn = sqlite3.connect(packed)
    assert conn.execute("SELECT energy_mj FROM gpu_sample WHERE tick_id = ? AND gpu_id = 1", (tick,)).fetchone() \
        == (123.25,)
    conn.close()
    window = ("--since", "2024-04-05T12:30Z", "--until", "2024-04-05T15:30Z", "--no-rollups")
    assert without_path(report_json(plain, *window)) == without_path(report_json(packed, *window))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "text"])
def test_a_damaged_chunk_is_a_corrupt_database_in_one_line(twins, tmp_path, damage):
    db = str(tmp_path / "gua.db")
    shutil.copy(twins[1], db)
    conn = sqlite3.connect(db)
    hour = START // HOUR + 3
    if damage == "text":
        conn.execute("UPDATE raw_chunk SET data = 'not a blob' WHERE hour = ?", (hour,))
    else:
        data = conn.execute("SELECT data FROM raw_chunk WHERE hour = ?", (hour,)).fetchone()[0]
        bad = os.urandom(len(data)) if damage == "garbage" else data[: len(data) // 2]
        conn.execute("UPDATE raw_chunk SET data = ? WHERE hour = ?", (bad, hour))
    conn.commit()
    conn.close()
    r = run_report("--db", db, "--since", "2024-04-05T15:10Z", "--until", "2024-04-05T15:50Z")
    assert r.returncode == 7, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "is corrupt" in r.stderr and "raw_chunk of the hour 2024-04-05T15:00Z" in r.stderr
    # Hours away from the damage still report.
    ok = run_report("--db", db, "--since", "2024-04-06T01:10Z", "--until", "2024-04-06T01:50Z")
    assert ok.returncode == 0, ok.stderr


def test_the_collector_compacts_as_it_runs(tmp_path):
    """Through the real service loop: two days of lab8 at 30 s ticks; every GPU-tick is stored once."""
    db = tmp_path / "gua.db"
    r = run_collector("--db", str(db), "--backend", "simulate:lab8", "--interval", "30s", "--ticks", "5760",
                      "--start", "2026-01-01T00:00:00Z", timeout=120)
    assert r.returncode == 0, r.stderr
    conn = sqlite3.connect(db)
    newest_hour = conn.execute("SELECT max(ts_ms) FROM tick").fetchone()[0] // HOUR
    rows = conn.execute("SELECT count(*) FROM gpu_sample").fetchone()[0]
    chunks = conn.execute("SELECT hour, data FROM raw_chunk ORDER BY hour").fetchall()
    oldest_row_hour = conn.execute(
        "SELECT min(t.ts_ms) / 3600000 FROM gpu_sample g JOIN tick t USING (tick_id)").fetchone()[0]
    conn.close()
    from gua_collector import rawchunk

    in_chunks = sum(len(t.rows) for _, data in chunks for t in rawchunk.decode(data) if t.name == "gpu_sample")
    assert rows + in_chunks == 5760 * 8
    # Maintenance runs hourly: at most one hour more than the day kept is still rows.
    assert newest_hour - compact.HEAD_HOURS <= oldest_row_hour <= newest_hour - compact.HEAD_HOURS + 1
    assert [h for h, _ in chunks] == list(range(chunks[0][0], oldest_row_hour))
    assert len(chunks) >= 23
    expanded = str(tmp_path / "expanded.db")
    shutil.copy(db, expanded)
    expand_chunks(expanded)
    window = ("--since", "2026-01-01T00:00Z", "--until", "2026-01-02T23:59:30Z", "--active-threshold", "7.5")
    a, b = report_json(str(db), *window), report_json(expanded, *window)
    assert a["source"]["rollups"] == "none"  # 7.5 %: every hour read raw, the first day from chunks
    assert without_path(a) == without_path(b)
    assert json.dumps(a).count("idle_held") > 0
    assert used_pages(str(db)) < used_pages(expanded) * 0.7  # half the ticks are still rows (the day kept)


def summed(rows: list[tuple], keys: int) -> dict:
    out: dict = {}
    for row in rows:
        k, values = row[:keys], row[keys:]
        old = out.get(k)
        out[k] = values if old is None else tuple(
            None if a is None and b is None else (a or 0) + (b or 0) for a, b in zip(old, values))
    return out


def test_a_long_raw_range_is_read_a_slice_at_a_time(twins, monkeypatch):
    """Past rawload.MAX_LOADED_HOURS the temp tables hold one slice at a time; the sums are the same."""
    from gua_report import query, rawload

    plain, packed = twins
    lo, hi = START + 1_234_567, END - 2 * HOUR - 999
    results = []
    for db, most in ((plain, rawload.MAX_LOADED_HOURS), (packed, rawload.MAX_LOADED_HOURS), (packed, 5)):
        monkeypatch.setattr(rawload, "MAX_LOADED_HOURS", most)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
        conn.execute("BEGIN")
        state = query.gpu_state_raw(conn, lo, hi, 75, 2_000_000_000, None, None)
        ident = query.identity_raw(conn, lo, hi, 75, 2_000_000_000, None, False)
        loaded = conn.execute("SELECT count(*) FROM temp.gua_loaded_hour").fetchone()[0] if db == packed else 0
        conn.close()
        results.append((summed(state, 2), summed(ident, 3)))
        assert loaded <= max(most, 1) + 1
    assert results[0] == results[1] == results[2]
    assert len(results[0][0]) == 8 and len(results[0][1]) > 3  # per GPU (no heatmap cells); per holder


def test_a_backlog_of_rows_is_compacted_by_the_running_collector(twins, tmp_path):
    """An upgraded database holds every hour as rows: the service compacts them between its next ticks."""
    db = str(tmp_path / "gua.db")
    shutil.copy(twins[0], db)
    r = run_collector("--db", db, "--backend", "simulate:lab8", "--interval", "10s", "--ticks", "3", "--retention", "1000d",
                      "--unit-retention", "1000d",
                      timeout=60)
    assert r.returncode == 0, r.stderr
    rows, procs, chunks, newest = hours_of(db)
    # The run continued after the last stored tick (2024): the whole backlog is more than a day old.
    assert chunks == list(range(START // HOUR, END // HOUR))
    assert rows == procs == {newest}
    window = (*WINDOWS["partial edges"], "--no-rollups", "--tz", "Australia/Adelaide")
    a, b = report_json(twins[0], *window), report_json(db, *window)
    for doc in (a, b):  # the new run's start and stop are later than the window, its gap is not
        doc["data_quality"].pop("runs", None)
    assert without_path(a) == without_path(b)


def test_the_loaders_probes_seek(twins):
    """rawload runs before every raw query: its probes must seek, never walk tick_ts (3 M entries a year)."""
    from gua_report import rawload

    conn = sqlite3.connect(f"file:{twins[1]}?mode=ro", uri=True)
    conn.execute(f"CREATE TEMP TABLE {rawload.LOADED} (hour INTEGER PRIMARY KEY)")
    probes = {rawload.Q_TICK_SPAN: (), rawload.Q_LONGEST_TICK: (START, END), rawload.Q_ANY_CHUNK: (1, 2),
              rawload.Q_LOADED: (1, 2), rawload.Q_CHUNKS: (1, 2)}
    for sql, params in probes.items():
        plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
        assert not [step for step in plan if step.startswith("SCAN") and "CONSTANT ROW" not in step], (sql, plan)
    plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + rawload.Q_ANY_CHUNK_AT_ALL)]
    assert len(plan) == 1 and plan[0].startswith("SCAN main.raw_chunk")  # LIMIT 1: the first entry only
    conn.close()


def test_a_long_raw_report_decodes_each_hour_once_a_slice_at_a_time(twins, monkeypatch, capsys):
    """A report read raw (7.5 %) in 5-hour slices: the same JSON, each chunk decoded once for its three queries."""
    from gua_report import cli, rawchunk, rawload

    decoded: list[int] = []
    real = rawchunk.decode_flat

    def counting(blob: bytes):
        decoded.append(len(blob))
        return real(blob)

    argv = ["--db", twins[1], *WINDOWS["partial edges"], "--active-threshold", "7.5", "--tz", "UTC", "--format", "json"]
    docs = []
    for most in (rawload.MAX_LOADED_HOURS, 5):
        monkeypatch.setattr(rawload, "MAX_LOADED_HOURS", most)
        monkeypatch.setattr(rawchunk, "decode_flat", counting)
        decoded.clear()
        assert cli.run(argv) == 0
        docs.append(json.loads(capsys.readouterr().out))
        # 22 hours in the window, a chunk each; slices of 5 hours put the window's
        # edge hours and the hole's in a second slice at most once more.
        assert 22 <= len(decoded) <= 22 + 5, (most, len(decoded))
    assert docs[0]["source"]["rollups"] == "none"
    assert without_path(docs[0]) == without_path(docs[1]) == without_path(report_json(twins[0], *argv[2:-2]))


def test_check_says_how_many_hours_wait_to_be_compacted(twins, tmp_path):
    """gua-collector --check on an upgraded database: the backlog in hours, then that it is done."""
    from gua_collector import check
    from gua_collector.clock import RealClock
    from gua_collector.simulate import SimBackend

    db = str(tmp_path / "gua.db")
    shutil.copy(twins[0], db)
    host = check.Host(proc_root="/proc", clock_synchronised=lambda: True, service_user="root")

    def line() -> check.Finding:
        found = check.run_checks(db, 60_000, "", SimBackend("lab8", RealClock()), END, host)
        return next(f for f in found if f.subject == "raw rows")

    waiting = line()
    assert waiting.level == check.OK
    assert waiting.detail.startswith(f"{30 - compact.HEAD_HOURS} h older than a day not compacted yet")
    compact_all(db, now_ms=END)
    done = line()
    assert done.level == check.OK and done.detail.startswith("compacted once a day old")


def test_a_chunk_naming_a_hostile_table_is_reported_escaped(twins, tmp_path):
    """The error quotes a name from the blob's header: terminal controls in it reach stderr escaped."""
    import zlib

    from gua_collector import rawchunk as writer

    db = str(tmp_path / "gua.db")
    shutil.copy(twins[1], db)
    head = json.dumps({"tables": [{"name": "gpu_sample\x1b[2J\x1b]0;owned\x07", "columns": ["tick_id"], "rows": 0}]})
    blob = zlib.compress(writer.MAGIC + len(head).to_bytes(4, "little") + head.encode() + b"\x02")
    conn = sqlite3.connect(db)
    conn.execute("UPDATE raw_chunk SET data = ? WHERE hour = ?", (blob, START // HOUR + 3))
    conn.commit()
    conn.close()
    r = run_report("--db", db, "--since", "2024-04-05T15:10Z", "--until", "2024-04-05T15:50Z")
    assert r.returncode == 7, r.stderr
    assert "rows of an unknown table or column" in r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and r.stderr.count("\n") == 1


def test_a_write_failing_inside_compaction_loses_nothing_and_the_collector_goes_on(twins, tmp_path):
    """A full disk (here a trigger failing the row deletes) rolls the whole step back; ticks keep being written."""
    db = str(tmp_path / "gua.db")
    shutil.copy(twins[0], db)
    conn = sqlite3.connect(db)
    rows_before = conn.execute("SELECT count(*) FROM gpu_sample").fetchone()[0]
    conn.execute("CREATE TRIGGER full BEFORE DELETE ON gpu_sample BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END")
    conn.commit()
    conn.close()
    r = run_collector("--db", db, "--backend", "simulate:lab8", "--interval", "10s", "--ticks", "3", "--retention",
                      "1000d", "--unit-retention", "1000d", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "compacting raw rows failed: database or disk is full" in r.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM raw_chunk").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM gpu_sample").fetchone()[0] == rows_before + 3 * 8
    assert conn.execute("SELECT value FROM meta WHERE key = 'compact_next_tick'").fetchone() is None
    conn.close()
