"""A heatmap the hourly rollups cannot fill says so, and by how much.

Retention removes raw rows; the UTC-hour rollups stay. GPU-hours then come
from the rollups, and so does the weekday x hour heatmap where the zone's
offset is whole hours. In a half-hour zone (India, +05:30) a UTC hour falls
into two local hours, so those hours cannot be placed: the heatmap has
blank cells that are not "no data". The report must say why, in text and
JSON, and must not fill cells it cannot place exactly.
"""

from __future__ import annotations

import shutil

import pytest

from report_helpers import HOUR, T0, report_json, run_report, sim_ticks, store_run

pytestmark = pytest.mark.timeout(120)

START = T0 + 7 * 24 * HOUR  # 2024-01-08 00:00 UTC, a Monday
INTERVAL = 60_000
CUT = START + 24 * HOUR + 30 * 60_000  # retention's cut: Tuesday 00:30 UTC
WINDOW = ("--since", "2024-01-08T00:00Z", "--until", "2024-01-10T00:00Z")


@pytest.fixture(scope="module")
def dbs(tmp_path_factory) -> tuple[str, str]:
    """Two days of the lab scenario through the collector's Store; a copy pruned by its retention."""
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
    store = Store.open(pruned, now_ms=START + 48 * HOUR)
    try:
        while store.prune(CUT):
            pass
    finally:
        store.close()
    return whole, pruned


def known_before_cut(whole: str) -> int:
    """Known GPU time of the ticks retention removed (from the unpruned copy)."""
    rep = report_json(whole, "--since", "2024-01-08T00:00Z", "--until", "2024-01-09T00:30Z")
    return rep["headline"]["known_ms"]


def test_half_hour_zone_says_why_the_heatmap_is_partial(dbs):
    whole, pruned = dbs
    full = report_json(whole, *WINDOW, "--tz", "Asia/Kolkata")
    rep = report_json(pruned, *WINDOW, "--tz", "Asia/Kolkata")
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

    r = run_report("--db", pruned, *WINDOW, "--tz", "Asia/Kolkata")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert ("heatmap: hours before 2024-01-09 06:00 exist only as UTC-hour rollups (retention "
            "removed their raw samples); a +05:30 zone cannot place them in local hours, so "
            f"{missing / HOUR:.2f} GPU-h of known time is not in the heatmap") in text
    assert all(len(line) <= 80 for line in r.stdout.splitlines())


def test_whole_hour_zone_fills_the_heatmap_from_rollups(dbs):
    whole, pruned = dbs
    rep = report_json(pruned, *WINDOW, "--tz", "Europe/Berlin")
    full = report_json(whole, *WINDOW, "--tz", "Europe/Berlin")
    assert rep["heatmap"] == full["heatmap"]
    assert rep["heatmap"]["unplaced_known_ms"] == 0 and rep["heatmap"]["note"] is None
    r = run_report("--db", pruned, *WINDOW, "--tz", "Europe/Berlin")
    assert "heatmap:" not in r.stdout


@pytest.mark.parametrize("tz, offset", [("Asia/Kathmandu", "+05:45"), ("America/St_Johns", "-03:30")])
def test_other_fractional_zones(dbs, tz, offset):
    _, pruned = dbs
    hm = report_json(pruned, *WINDOW, "--tz", tz)["heatmap"]
    assert hm["unplaced_known_ms"] > 0
    assert f"a {offset} zone cannot place them" in hm["note"]
