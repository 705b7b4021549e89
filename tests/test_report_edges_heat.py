"""The heatmap after retention: quarter-hour rollups place every hour in every zone.

Retention removes raw rows; the rollups stay. GPU-hours then come from the
hourly rollups, and the weekday x hour heatmap from them where the zone's
offset is whole hours. In a half-hour zone (India, +05:30) a UTC hour falls
into two local hours: the collector's quarter-hour rollups (quarter_gpu)
place it exactly, so the heatmap equals the unpruned database's.

A database upgraded from gua 0.1.0 has no quarter hours for the hours it
rolled up before the upgrade: where retention had removed their raw rows,
those hours cannot be placed in such a zone. The report says why, in text
and JSON, and does not fill cells it cannot place exactly.
"""

from __future__ import annotations

import shutil

import pytest

from report_helpers import HOUR, T0, make_v1, prune_raw, report_json, run_report, sim_ticks, store_run

pytestmark = pytest.mark.timeout(120)

START = T0 + 7 * 24 * HOUR  # 2024-01-08 00:00 UTC, a Monday
INTERVAL = 60_000
CUT = START + 24 * HOUR + 30 * 60_000  # retention's cut: Tuesday 00:30 UTC
WINDOW = ("--since", "2024-01-08T00:00Z", "--until", "2024-01-10T00:00Z")
FRACTIONAL = [("Asia/Kolkata", "+05:30"), ("Asia/Kathmandu", "+05:45"), ("America/St_Johns", "-03:30"),
              ("Pacific/Chatham", "+13:45")]


def prune(path: str, before_ms: int) -> None:
    prune_raw(path, before_ms, START + 48 * HOUR)


@pytest.fixture(scope="module")
def dbs(tmp_path_factory) -> tuple[str, str, str]:
    """Two days of the lab scenario through the collector's Store; a copy pruned by its retention;
    and the same pruned by gua 0.1.0 (schema 1) before the upgrade to schema 2."""
    import sqlite3

    from gua_collector.store import Store

    d = tmp_path_factory.mktemp("heat")
    whole = str(d / "whole.db")
    store = Store.open(whole, now_ms=START)
    try:
        store_run(store, sim_ticks(START, START + 48 * HOUR, INTERVAL, "lab"), interval_ms=INTERVAL,
                  stop_ms=START + 48 * HOUR)
    finally:
        store.close()
    pruned = str(d / "pruned.db")
    shutil.copy(whole, pruned)
    prune(pruned, CUT)
    # gua 0.1.0's database: its own retention ran, then the collector of schema 2 started.
    old = str(d / "old.db")
    make_v1(whole, old)
    conn = sqlite3.connect(old, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("DELETE FROM proc_sample WHERE tick_id IN (SELECT tick_id FROM tick WHERE ts_ms < ?)", (CUT,))
    conn.execute("DELETE FROM gpu_sample WHERE tick_id IN (SELECT tick_id FROM tick WHERE ts_ms < ?)", (CUT,))
    conn.execute("DELETE FROM tick WHERE ts_ms < ?", (CUT,))
    conn.execute("INSERT INTO meta (key, value) VALUES ('raw_pruned_before_ms', ?)", (str(CUT),))
    conn.execute("COMMIT")
    conn.close()
    Store.open(old, now_ms=START + 48 * HOUR).close()  # the upgrade
    return whole, pruned, old


def known_before_cut(whole: str) -> int:
    """Known GPU time of the ticks retention removed (from the unpruned copy)."""
    rep = report_json(whole, "--since", "2024-01-08T00:00Z", "--until", "2024-01-09T00:30Z")
    return rep["headline"]["known_ms"]


@pytest.mark.parametrize("tz, offset", FRACTIONAL)
def test_fractional_zones_place_every_hour_after_retention(dbs, tz, offset):
    whole, pruned, _ = dbs
    full = report_json(whole, *WINDOW, "--tz", tz)
    rep = report_json(pruned, *WINDOW, "--tz", tz)
    assert rep["source"]["heatmap"] == "quarter"
    assert rep["headline"] == full["headline"]
    assert rep["heatmap"] == full["heatmap"]
    hm = rep["heatmap"]
    assert hm["unplaced_known_ms"] == 0 and hm["note"] is None and hm["unplaced_before_ms"] is None
    assert sum(map(sum, hm["known_ms"])) == rep["headline"]["known_ms"]
    # also at other thresholds (the heatmap counts active time at 50 % there)
    other = report_json(pruned, *WINDOW, "--tz", tz, "--active-threshold", "50")
    assert other["heatmap"] == report_json(whole, *WINDOW, "--tz", tz, "--active-threshold", "50")["heatmap"]
    r = run_report("--db", pruned, *WINDOW, "--tz", tz)
    assert r.returncode == 0, r.stderr
    assert "heatmap:" not in r.stdout


def test_whole_hour_zone_fills_the_heatmap_from_rollups(dbs):
    whole, pruned, _ = dbs
    rep = report_json(pruned, *WINDOW, "--tz", "Europe/Berlin")
    full = report_json(whole, *WINDOW, "--tz", "Europe/Berlin")
    assert rep["source"]["heatmap"] == "hour"
    assert rep["heatmap"] == full["heatmap"]
    assert rep["heatmap"]["unplaced_known_ms"] == 0 and rep["heatmap"]["note"] is None
    r = run_report("--db", pruned, *WINDOW, "--tz", "Europe/Berlin")
    assert "heatmap:" not in r.stdout


def test_gua_0_1_hours_say_why_the_heatmap_is_partial(dbs):
    whole, _, old = dbs
    full = report_json(whole, *WINDOW, "--tz", "Asia/Kolkata")
    rep = report_json(old, *WINDOW, "--tz", "Asia/Kolkata")
    # GPU-hours come from the rollups: nothing lost
    assert rep["headline"] == full["headline"]
    hm = rep["heatmap"]
    placed = sum(map(sum, hm["known_ms"]))
    missing = known_before_cut(whole)
    assert missing > 20 * HOUR  # 4 GPUs, mostly known
    assert hm["unplaced_known_ms"] == missing == rep["headline"]["known_ms"] - placed
    assert hm["unplaced_before_ms"] == CUT
    assert "+05:30 zone cannot place them in local hours" in hm["note"]
    assert "before 2024-01-09 06:00" in hm["note"]  # the cut, in Kolkata time
    # Cells it did fill are exact: Wednesday 05:30 local onwards equals the whole DB's.
    assert hm["known_ms"][2] == full["heatmap"]["known_ms"][2]
    assert full["heatmap"]["unplaced_known_ms"] == 0 and full["heatmap"]["note"] is None

    r = run_report("--db", old, *WINDOW, "--tz", "Asia/Kolkata")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert ("heatmap: hours before 2024-01-09 06:00 exist only as UTC-hour rollups of gua 0.1.0 "
            "(retention removed their raw samples before the upgrade); a +05:30 zone cannot place them "
            f"in local hours, so {missing / HOUR:.2f} GPU-h of known time is not in the heatmap") in text
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    # a whole-hour zone places them from the hourly rollups
    berlin = report_json(old, *WINDOW, "--tz", "Europe/Berlin")["heatmap"]
    assert berlin == report_json(whole, *WINDOW, "--tz", "Europe/Berlin")["heatmap"]


@pytest.mark.parametrize("tz, offset", FRACTIONAL[1:])
def test_gua_0_1_hours_in_other_fractional_zones(dbs, tz, offset):
    _, _, old = dbs
    hm = report_json(old, *WINDOW, "--tz", tz)["heatmap"]
    assert hm["unplaced_known_ms"] > 0
    assert f"a {offset} zone cannot place them" in hm["note"]
