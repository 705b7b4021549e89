"""Rollups and raw rows give identical reports on multi-day simulated DBs.

Each DB is written by the collector's own Store (which writes the hourly
rollups), with the simulator's workloads (lab8; mig, where per-process SM is
unknown), a restart in the middle and a window crossing the 2024 European
DST change. Each case runs gua-report with and without --no-rollups and
compares the whole JSON but `source`.
"""

from __future__ import annotations

import pytest

from report_helpers import HOUR, rolled_and_raw, run_report, sim_ticks

pytestmark = pytest.mark.timeout(120)

START = 1_711_670_400_000  # 2024-03-29 00:00 UTC, Friday; Berlin DST starts 2024-03-31 01:00 UTC
DAYS = 4
INTERVAL = 30_000


def build_sim(path: str, scenario: str) -> str:
    from gua_collector.store import Store

    mid = START + 37 * HOUR + 1_234_567  # a restart at an odd time, with a 40 min hole
    store = Store.open(path, now_ms=START)
    store.begin_run(START, INTERVAL, f"simulate:{scenario}", "gpu01", "test")
    batch = []
    for t in sim_ticks(START, mid, INTERVAL, scenario):
        batch.append(t)
        if len(batch) == 500:
            store.write_ticks(batch)
            batch = []
    store.write_ticks(batch)
    store.close()  # no end_run: an unclean stop
    store = Store.open(path, now_ms=mid + 2_400_000)
    store.begin_run(mid + 2_400_000, INTERVAL, f"simulate:{scenario}", "gpu01", "test")
    batch = []
    for t in sim_ticks(mid + 2_400_000, START + DAYS * 24 * HOUR, INTERVAL, scenario):
        batch.append(t)
        if len(batch) == 500:
            store.write_ticks(batch)
            batch = []
    store.write_ticks(batch)
    store.end_run(START + DAYS * 24 * HOUR)
    store.close()
    return path


@pytest.fixture(scope="module")
def sim_db(tmp_path_factory) -> str:
    return build_sim(str(tmp_path_factory.mktemp("rollup") / "gua.db"), "lab8")


@pytest.fixture(scope="module")
def mig_db(tmp_path_factory) -> str:
    return build_sim(str(tmp_path_factory.mktemp("rollup_mig") / "gua.db"), "mig")


WINDOWS = [
    ("--since", "2024-03-29T00:00Z", "--until", "2024-04-02T00:00Z", "--tz", "UTC"),
    ("--since", "2024-03-29T05:17:13Z", "--until", "2024-04-01T21:42:05Z", "--tz", "Europe/Berlin"),
    ("--since", "2024-03-29T05:17:13Z", "--until", "2024-04-01T21:42:05Z", "--tz", "Asia/Kolkata"),
]


@pytest.mark.parametrize("args", [
    *WINDOWS,
    ("--since", "2024-03-30T10:00Z", "--until", "2024-03-31T10:00Z", "--tz", "America/New_York",
     "--gpu", "2", "--gpu", "6", "--user", "bob"),
])
def test_rollup_equals_raw(sim_db, args):
    rolled, raw = rolled_and_raw(sim_db, *args)
    assert rolled["source"]["rollup_hours"] > 10
    assert raw["source"]["rollup_hours"] == 0
    del rolled["source"], raw["source"]
    assert rolled == raw


@pytest.mark.parametrize("args", [*WINDOWS, ("--since", "2024-03-29T00:00Z", "--until", "2024-04-02T00:00Z",
                                             "--tz", "UTC", "--gpu", "0", "--user", "bob")])
def test_rollup_equals_raw_with_sm_unknown(mig_db, args):
    rolled, raw = rolled_and_raw(mig_db, *args)
    assert rolled["source"]["rollup_hours"] > 10
    assert rolled["data_quality"]["sm_unknown_ms"] > 0
    del rolled["source"], raw["source"]
    assert rolled == raw


def test_mig_holders_are_sm_unknown_not_busy(mig_db):
    rolled, _ = rolled_and_raw(mig_db, "--since", "2024-03-29T00:00Z", "--until", "2024-04-02T00:00Z", "--tz", "UTC")
    users = {u["user"]: u for u in rolled["identities"]["users"]}
    # alice trains, bob idles, both on MIG instances: neither looks busy
    for name in ("alice", "bob"):
        assert users[name]["sm_unknown_ms"] == users[name]["held_ms"] > 0
        assert users[name]["idle_held_ms"] == 0
    # carol's job runs on the ordinary card: her SM is known
    assert users["carol"]["sm_unknown_ms"] == 0 and users["carol"]["held_ms"] > 0
    dq = rolled["data_quality"]
    assert dq["sm_unknown_users"] == 2 and dq["sm_recorded_since_ms"] is None
    text = run_report("--db", mig_db, "--since", "2024-03-29T00:00Z", "--until", "2024-04-02T00:00Z",
                      "--tz", "UTC").stdout
    bob = next(line for line in text.splitlines() if line.startswith("  bob "))
    assert bob.split()[2:5] == ["?", "?", "100%"], bob
    assert all(len(line) <= 80 for line in text.splitlines())


def test_sane_numbers(sim_db):
    rolled, _ = rolled_and_raw(sim_db, "--since", "2024-03-29T00:00Z", "--until", "2024-04-02T00:00Z", "--tz", "UTC")
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


@pytest.mark.parametrize("args", [("--active-threshold", "50"), ("--held-threshold", "1000MiB"),
                                  ("--active-threshold", "25", "--held-threshold", "0")])
def test_other_thresholds_use_the_histograms(sim_db, args):
    """More in tests/test_report_hist.py."""
    rolled, raw = rolled_and_raw(sim_db, *WINDOWS[1], *args)
    assert rolled["source"]["rollups"] == "histograms" and rolled["source"]["rollup_hours"] > 10
    assert rolled["rules"]["note"] is None
    del rolled["source"], raw["source"]
    assert rolled == raw
