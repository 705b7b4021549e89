"""Rollups and raw rows give identical reports on a multi-day simulated DB.

The DB is written by the collector's own Store (which writes the hourly
rollups), with the simulator's lab8 workloads, a restart in the middle and
a window crossing the 2024 European DST change. Each case runs gua-report
with and without --no-rollups and compares the whole JSON but `source`.
"""

from __future__ import annotations

import json

import pytest

from report_helpers import HOUR, run_report, sim_ticks

pytestmark = pytest.mark.timeout(120)

START = 1_711_670_400_000  # 2024-03-29 00:00 UTC, Friday; Berlin DST starts 2024-03-31 01:00 UTC
DAYS = 4
INTERVAL = 30_000


@pytest.fixture(scope="module")
def sim_db(tmp_path_factory) -> str:
    from gua_collector.store import Store

    path = str(tmp_path_factory.mktemp("rollup") / "gua.db")
    mid = START + 37 * HOUR + 1_234_567  # a restart at an odd time, with a 40 min hole
    store = Store.open(path, now_ms=START)
    store.begin_run(START, INTERVAL, "simulate:lab8", "gpu01", "test")
    batch = []
    for t in sim_ticks(START, mid, INTERVAL, "lab8"):
        batch.append(t)
        if len(batch) == 500:
            store.write_ticks(batch)
            batch = []
    store.write_ticks(batch)
    store.close()  # no end_run: an unclean stop
    store = Store.open(path, now_ms=mid + 2_400_000)
    store.begin_run(mid + 2_400_000, INTERVAL, "simulate:lab8", "gpu01", "test")
    batch = []
    for t in sim_ticks(mid + 2_400_000, START + DAYS * 24 * HOUR, INTERVAL, "lab8"):
        batch.append(t)
        if len(batch) == 500:
            store.write_ticks(batch)
            batch = []
    store.write_ticks(batch)
    store.end_run(START + DAYS * 24 * HOUR)
    store.close()
    return path


def both(path: str, *args: str) -> tuple[dict, dict]:
    out = []
    for extra in ((), ("--no-rollups",)):
        r = run_report("--db", path, "--format", "json", *args, *extra)
        assert r.returncode == 0, r.stderr
        out.append(json.loads(r.stdout))
    return out[0], out[1]


@pytest.mark.parametrize("args", [
    ("--since", "2024-03-29T00:00Z", "--until", "2024-04-02T00:00Z", "--tz", "UTC"),
    ("--since", "2024-03-29T05:17:13Z", "--until", "2024-04-01T21:42:05Z", "--tz", "Europe/Berlin"),
    ("--since", "2024-03-29T05:17:13Z", "--until", "2024-04-01T21:42:05Z", "--tz", "Asia/Kolkata"),
    ("--since", "2024-03-30T10:00Z", "--until", "2024-03-31T10:00Z", "--tz", "America/New_York",
     "--gpu", "2", "--gpu", "6", "--user", "bob"),
])
def test_rollup_equals_raw(sim_db, args):
    rolled, raw = both(sim_db, *args)
    assert rolled["source"]["rollup_hours"] > 10
    assert raw["source"]["rollup_hours"] == 0
    del rolled["source"], raw["source"]
    assert rolled == raw


def test_sane_numbers(sim_db):
    rolled, _ = both(sim_db, "--since", "2024-03-29T00:00Z", "--until", "2024-04-02T00:00Z", "--tz", "UTC")
    h = rolled["headline"]
    assert len(rolled["gpus"]) == 8
    assert h["active_ms"] > 0 and h["idle_held_ms"] > 0 and h["idle_ms"] > 0
    assert h["total_ms"] == h["known_ms"] + h["unknown_ms"]
    # the 40 min restart hole is found, and the unclean stop
    holes = rolled["data_quality"]["holes"]
    assert len(holes) == 1 and 2_390_000 <= holes[0]["end_ms"] - holes[0]["start_ms"] <= 2_410_000
    assert rolled["data_quality"]["unclean_stops"] == 1
    users = {u["user"] for u in rolled["identities"]["users"]}
    assert users == {"alice", "bob", "carol"}


def test_other_thresholds_use_raw(sim_db):
    r = run_report("--db", sim_db, "--format", "json", "--since", "2024-03-29T00:00Z",
                   "--until", "2024-04-02T00:00Z", "--tz", "UTC", "--active-threshold", "50")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["source"]["rollup_hours"] == 0
    assert "thresholds" in rep["source"]["note"]
