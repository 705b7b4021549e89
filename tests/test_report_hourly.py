"""`gua-report --format csv --table hour`: each GPU's state time per local hour, a time series.

The rows must add up exactly, GPU by GPU, to the JSON of the same command,
whatever the zone (+05:30 and +05:45 split UTC hours; Europe/Berlin skips
an hour on 2024-03-31), the thresholds (hourly rollups, histograms) and the
data source (--no-rollups); they are also held to an independent Python
classification of the raw rows by local hour (zoneinfo). After retention,
in a zone whose hours are not UTC hours, rolled-up hours without raw rows
are placed whole (the rows say so) and still add up.
"""

from __future__ import annotations

import csv
import io
import shutil
import sqlite3
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from gua_report import render_table
from report_helpers import HOUR, G, HandDb, P, build_store_db, prune_raw, run_report
from test_report_csv_tables import by_name, epoch_ms, report
from test_report_edges_overlap import step_back_db
from test_report_startup import COSTLY, modules_after

pytestmark = pytest.mark.timeout(180)

START = 1_711_821_600_000  # 2024-03-30T18:00Z, a Saturday; Berlin goes to summer time at 2024-03-31T01:00Z
INTERVAL = 60_000
# Neither end on a whole hour, or quarter hour, in any of the zones.
WINDOW = ("--since", "2024-03-30T18:07:13Z", "--until", "2024-03-31T23:52Z")
SINCE, UNTIL = epoch_ms("2024-03-30T18:07:13+00:00"), epoch_ms("2024-03-31T23:52:00+00:00")
ZONES = ("UTC", "Asia/Kolkata", "Asia/Kathmandu", "Europe/Berlin")
THRESHOLDS = {"default": (), "other": ("--active-threshold", "30", "--held-threshold", "500MB")}
CUT = START + 10 * HOUR + 20 * 60_000  # retention's cut in the pruned copy: 2024-03-31T04:20Z
STATES = ("ticks", "total_ms", "active_ms", "idle_held_ms", "idle_ms", "unknown_ms")


def prune(path: str, before_ms: int) -> None:
    prune_raw(path, before_ms, START + 30 * HOUR)


@pytest.fixture(scope="module")
def dbs(tmp_path_factory) -> dict[str, str]:
    """30 hours of the lab scenario (and of the MIG scenario) through the collector's Store,
    and a copy of the lab's that retention pruned up to CUT."""
    d = tmp_path_factory.mktemp("hourly")
    lab = build_store_db(str(d / "lab.db"), "lab", START, START + 30 * HOUR, INTERVAL)
    mig = build_store_db(str(d / "mig.db"), "mig", START, START + 30 * HOUR, INTERVAL)
    pruned = str(d / "pruned.db")
    shutil.copy(lab, pruned)
    prune(pruned, CUT)
    return {"lab": lab, "mig": mig, "pruned": pruned}


def hour_table(db: str, *args: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "gua_report", "--db", db, "--format", "csv", "--table", "hour", *args],
                       capture_output=True, timeout=50)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    rows = list(csv.reader(io.StringIO(r.stdout.decode(), newline="")))
    assert tuple(rows[0]) == render_table.HOUR_COLUMNS
    assert {len(row) for row in rows} == {len(rows[0])}
    return by_name(rows)


def assert_adds_up(rows: list[dict], doc: dict) -> None:
    """Every GPU of the JSON has a row in every hour, and its rows add up to its numbers exactly."""
    gpus = doc["gpus"]
    assert rows and len(rows) % len(gpus) == 0
    for n in range(0, len(rows), len(gpus)):
        assert [r["uuid"] for r in rows[n:n + len(gpus)]] == [g["uuid"] for g in gpus]
        assert len({(r["hour"], r["start"], r["end"]) for r in rows[n:n + len(gpus)]}) == 1
    for g in gpus:
        mine = [r for r in rows if r["uuid"] == g["uuid"]]
        assert {r["index"] for r in mine} == {g["index"]}
        for column in STATES:
            assert sum(r[column] for r in mine) == g[column], (g["uuid"], column)
        for r in mine:
            assert r["known_ms"] == r["active_ms"] + r["idle_held_ms"] + r["idle_ms"]
            assert r["total_ms"] == r["known_ms"] + r["unknown_ms"]
            if r["known_ms"]:
                assert r["active_share"] == round(r["active_ms"] / r["known_ms"], 6)
            else:
                assert r["active_share"] is None


def assert_hours_tile_the_window(rows: list[dict], tz: str, since: int = SINCE, until: int = UNTIL) -> None:
    """Consecutive local hours, each [start, end) inside its hour and the window, in the zone's offsets."""
    zone = ZoneInfo(tz)
    spans = list(dict.fromkeys((r["hour"], r["start"], r["end"]) for r in rows))
    assert epoch_ms(spans[0][1]) >= since and epoch_ms(spans[-1][2]) <= until
    for (hour, start, end), nxt in zip(spans, [*spans[1:], None]):
        h, s, e = datetime.fromisoformat(hour), datetime.fromisoformat(start), datetime.fromisoformat(end)
        assert h.minute == h.second == 0 and h.utcoffset() == s.utcoffset()
        assert h <= s < e <= h + timedelta(hours=1)
        # every instant is written in the zone's own offset at that instant
        assert s.utcoffset() == datetime.fromtimestamp(s.timestamp(), zone).utcoffset()
        if nxt is not None:
            assert end == nxt[1] or epoch_ms(end) == epoch_ms(nxt[1]), (end, nxt)


@pytest.mark.parametrize("thresholds", sorted(THRESHOLDS))
@pytest.mark.parametrize("tz", ZONES)
def test_hours_add_up_to_the_json_on_both_paths(dbs, tz, thresholds):
    args = (*WINDOW, "--tz", tz, *THRESHOLDS[thresholds])
    doc = report(dbs["lab"], *args)
    assert doc["source"]["rollups"] == ("hourly" if thresholds == "default" else "histograms")
    rows = hour_table(dbs["lab"], *args)
    assert_adds_up(rows, doc)
    assert_hours_tile_the_window(rows, tz)
    assert all(r["note"] is None for r in rows)
    assert all(r["tz"] == tz for r in rows)
    # the raw path gives the same table, row by row
    raw = hour_table(dbs["lab"], *args, "--no-rollups")
    assert raw == rows
    assert_adds_up(raw, report(dbs["lab"], *args, "--no-rollups"))


def classify_raw(db: str, tz: str, active_pm: int, held_bytes: int) -> dict[tuple[str, str], dict[str, int]]:
    """(uuid, local hour ISO) -> ms by state, straight from the raw rows by SCHEMA.md's rules."""
    zone = ZoneInfo(tz)
    conn = sqlite3.connect(db)
    out: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rows = conn.execute(
        """SELECT t.tick_id, t.ts_ms, t.duration_ms, g.gpu_id, gpu.uuid, g.status, g.util_permille,
                  (SELECT count(*) > count(ps.mem_mib) FROM proc_sample ps
                   WHERE ps.tick_id = g.tick_id AND ps.gpu_id = g.gpu_id AND ps.kind & 1),
                  (SELECT coalesce(sum(ps.mem_mib), 0) FROM proc_sample ps
                   WHERE ps.tick_id = g.tick_id AND ps.gpu_id = g.gpu_id AND ps.kind & 1)
           FROM tick t JOIN gpu_sample g ON g.tick_id = t.tick_id JOIN gpu ON gpu.gpu_id = g.gpu_id
           WHERE t.ts_ms >= ? AND t.ts_ms < ?""", (SINCE, UNTIL)).fetchall()
    conn.close()
    for _, ts, d, _, uuid, status, util, mem_null, mem in rows:
        if status != 0 or util is None:
            state = "unknown_ms"
        elif util >= active_pm:
            state = "active_ms"
        elif mem_null or mem * 1_048_576 > held_bytes:
            state = "idle_held_ms"
        else:
            state = "idle_ms"
        local = datetime.fromtimestamp(ts / 1000, zone).replace(minute=0, second=0, microsecond=0)
        cell = out[(uuid, local.isoformat())]
        cell[state] += d
        cell["total_ms"] += d
        cell["ticks"] += 1
    return out


@pytest.mark.parametrize("tz", ZONES)
def test_hours_are_the_raw_rows_classified_by_local_hour(dbs, tz):
    """An independent oracle: each raw row classified in Python and placed by zoneinfo."""
    for thresholds, (active_pm, held) in (("default", (100, 100_000_000)), ("other", (300, 500_000_000))):
        expected = classify_raw(dbs["lab"], tz, active_pm, held)
        rows = hour_table(dbs["lab"], *WINDOW, "--tz", tz, *THRESHOLDS[thresholds])
        got = {(r["uuid"], r["hour"]): r for r in rows}
        assert set(expected) <= set(got)
        for key, r in got.items():
            want = expected.get(key, {})
            assert {s: r[s] for s in STATES} == {s: want.get(s, 0) for s in STATES}, (tz, thresholds, key)


def test_a_dst_change_skips_the_hour_it_skips(dbs):
    """Europe/Berlin 2024-03-31: 01:00+01:00 is followed by 03:00+02:00; 02:00 does not exist."""
    hours = list(dict.fromkeys(r["hour"] for r in hour_table(dbs["lab"], *WINDOW, "--tz", "Europe/Berlin")))
    i = hours.index("2024-03-31T01:00:00+01:00")
    assert hours[i + 1] == "2024-03-31T03:00:00+02:00"
    assert not any(h.startswith("2024-03-31T02:") for h in hours)
    assert hours[0] == "2024-03-30T19:00:00+01:00" and hours[-1] == "2024-04-01T01:00:00+02:00"


@pytest.mark.parametrize("rolled_up", [False, True])
def test_a_dst_change_repeats_the_hour_it_repeats(tmp_path, rolled_up):
    """Europe/Berlin 2024-10-27: 02:00 local twice, at +02:00 and then at +01:00: two hours, two rows."""
    fall = epoch_ms("2024-10-27T00:00:00+00:00")  # 02:00+02:00; at 01:00Z the clocks go back to 02:00+01:00
    path = str(tmp_path / "fall.db")
    db = HandDb(path, created_ms=fall - HOUR)
    g = db.gpu(0)
    p = db.process(100, db.account("alice", 1001))
    r = db.run(fall)
    db.tick(r, fall, 0, G(g, util=500))
    db.ticks(r, fall, 5, 600_000, G(g, util=500))  # active, ending 00:10Z .. 00:50Z
    db.ticks(r, fall + 50 * 60_000, 12, 600_000, G(g, util=0, procs=(P(p, mem=2000),)))  # idle-held, to 02:50Z
    if rolled_up:
        db.roll_up(fall // HOUR + 3)
    db.close()
    args = ("--since", "2024-10-27T00:00Z", "--until", "2024-10-27T03:00Z", "--tz", "Europe/Berlin")
    doc = report(path, *args)
    assert doc["source"]["rollups"] == ("hourly" if rolled_up else "none")
    rows = hour_table(path, *args)
    assert_adds_up(rows, doc)
    assert [(r["hour"], r["start"], r["active_ms"], r["idle_held_ms"]) for r in rows] == [
        ("2024-10-27T02:00:00+02:00", "2024-10-27T02:00:00+02:00", 5 * 600_000, 0),
        ("2024-10-27T02:00:00+01:00", "2024-10-27T02:00:00+01:00", 0, HOUR),
        ("2024-10-27T03:00:00+01:00", "2024-10-27T03:00:00+01:00", 0, HOUR),
    ]


def test_partial_first_and_last_hours_are_clipped_to_the_window(dbs):
    rows = hour_table(dbs["lab"], *WINDOW, "--tz", "Asia/Kathmandu")
    first, last = rows[0], rows[-1]
    assert (first["hour"], first["start"], first["end"]) == (
        "2024-03-30T23:00:00+05:45", "2024-03-30T23:52:13+05:45", "2024-03-31T00:00:00+05:45")
    assert (last["hour"], last["start"], last["end"]) == (
        "2024-04-01T05:00:00+05:45", "2024-04-01T05:00:00+05:45", "2024-04-01T05:37:00+05:45")
    assert 0 < first["total_ms"] <= 8 * 60_000 and 0 < last["total_ms"] <= 37 * 60_000


@pytest.mark.parametrize("thresholds", sorted(THRESHOLDS))
@pytest.mark.parametrize("tz", ZONES)
def test_after_retention_the_hours_still_add_up(dbs, tz, thresholds):
    """Rolled-up hours whose raw rows are gone: exact where local hours are UTC hours; elsewhere
    placed whole in the local hour of their start, flagged, and still adding up."""
    args = (*WINDOW, "--tz", tz, *THRESHOLDS[thresholds])
    doc = report(dbs["pruned"], *args)
    rows = hour_table(dbs["pruned"], *args)
    assert_adds_up(rows, doc)
    assert_hours_tile_the_window(rows, tz)
    full = {(r["uuid"], r["hour"]): r for r in hour_table(dbs["lab"], *args)}
    flagged = {r["hour"] for r in rows if r["note"] is not None}
    assert all(r["note"] in (None, render_table.APPROXIMATE_NOTE) for r in rows)
    if tz in ("UTC", "Europe/Berlin"):
        # Exact: every hour left is the unpruned database's (the pruned raw rows before the
        # first rolled-up hour, 19:00Z, are gone from both the report and the table).
        assert not flagged and epoch_ms(rows[0]["start"]) == START + HOUR
        for r in rows:
            assert r == full[(r["uuid"], r["hour"])]
        return
    # Flagged: the local hours that touch a rolled-up UTC hour before the cut (19:00Z to 04:00Z).
    zone = ZoneInfo(tz)
    touched = {datetime.fromtimestamp(ms / 1000, zone).replace(minute=0, second=0, microsecond=0).isoformat()
               for h in range(START // HOUR + 1, CUT // HOUR + 1) for ms in (h * HOUR, (h + 1) * HOUR - 1)}
    assert flagged == touched
    # After them, the rows are the unpruned database's.
    last = max(epoch_ms(h) for h in touched)
    after = [r for r in rows if epoch_ms(r["hour"]) > last]
    assert len(after) > len(rows) // 2
    for r in after:
        assert r == full[(r["uuid"], r["hour"])]


def test_mig_instances_and_gpu_filter(dbs):
    args = (*WINDOW, "--tz", "Asia/Kolkata")
    doc = report(dbs["mig"], *args)
    rows = hour_table(dbs["mig"], *args)
    assert_adds_up(rows, doc)
    mig = [r for r in rows if r["mig.parent_uuid"] is not None]
    assert {r["mig.slot"] for r in mig} == {0, 1} and all(r["unknown_ms"] == r["total_ms"] for r in mig)
    only = hour_table(dbs["mig"], *args, "--gpu", "1")
    assert {r["index"] for r in only} == {1} and len({r["uuid"] for r in only}) == 1
    assert_adds_up(only, report(dbs["mig"], *args, "--gpu", "1"))
    parent = hour_table(dbs["mig"], *args, "--gpu", "0")
    assert len({r["uuid"] for r in parent}) == 3  # the card and its two instances


@pytest.mark.parametrize("tz", ["UTC", "Asia/Kolkata"])
def test_overlapping_ticks_are_counted_once_per_hour(tmp_path, tz):
    """The clock stepped back: the report counts each GPU's time once (clipped); so do the hours."""
    path = str(tmp_path / "step.db")
    step_back_db(path, -5_000)
    args = ("--since", "2024-01-01T00:00Z", "--until", "2024-01-01T02:00Z", "--tz", tz)
    doc = report(path, *args)
    assert doc["source"]["overlap_ranges_ms"]
    rows = hour_table(path, *args)
    assert_adds_up(rows, doc)
    assert sum(r["total_ms"] for r in rows) <= 2 * HOUR
    assert hour_table(path, *args, "--no-rollups") == rows


def test_only_the_hour_table_reads_the_series(dbs):
    loaded = modules_after("--db", dbs["lab"], *WINDOW, "--tz", "Asia/Kolkata", "--format", "csv", "--table", "hour")
    assert "gua_report.hourly" in loaded
    assert not loaded & set(COSTLY), loaded & set(COSTLY)
    for argv in (("--format", "json"), ("--format", "csv"), ("--format", "csv", "--table", "heatmap"),
                 ("--format", "text")):
        loaded = modules_after("--db", dbs["lab"], *WINDOW, *argv)
        assert "gua_report.hourly" not in loaded, argv


def test_hour_table_of_an_empty_window_fails_as_the_report_does(dbs):
    r = run_report("--db", dbs["lab"], "--since", "2024-01-01T00:00Z", "--until", "2024-01-01T01:00Z",
                   "--format", "csv", "--table", "hour")
    assert r.returncode == 8 and r.stdout == "" and "no samples" in r.stderr, (r.returncode, r.stderr)
