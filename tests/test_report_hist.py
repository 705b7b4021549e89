"""Any zone and any thresholds read rollups: the histograms give exactly the raw rows' numbers.

The collector writes, beside the hourly rollups classified with its
thresholds, histograms of the facts the classification reads
(hour_gpu_hist, hour_account_hist, hour_unit_hist) and the heatmap's known
and active time per UTC quarter hour (quarter_gpu). gua-report classifies
those with the report's thresholds and places quarter hours in the zone's
local hours. Each case here runs gua-report with and without --no-rollups
on databases the collector's own Store wrote, and compares the whole JSON
but `source`: zones whose offset is half or three quarters of an hour off
UTC, across their DST changes (Adelaide +10:30 -> +09:30, Lord Howe +11:00
-> +10:30, Chatham +13:45 -> +12:45, all on 2024-04-06 UTC; St John's
-02:30 -> -03:30 on 2024-11-03), thresholds of every kind the histograms
serve, and the one kind they do not (an active threshold such as 7.5 %).
"""

from __future__ import annotations

import sqlite3

import pytest

from gua_collector import schema
from report_helpers import HOUR, build_store_db, rolled_and_raw, run_report

pytestmark = pytest.mark.timeout(180)

INTERVAL = 60_000
SOUTH_START = 1_712_318_400_000  # 2024-04-05 12:00 UTC
SOUTH_WINDOW = ("--since", "2024-04-05T13:17:13Z", "--until", "2024-04-06T23:42:05Z")
NORTH_START = 1_730_570_400_000  # 2024-11-02 18:00 UTC
NORTH_WINDOW = ("--since", "2024-11-02T19:08:41Z", "--until", "2024-11-03T17:51:20Z")

DEFAULT: tuple[str, ...] = ()
THRESHOLDS = {
    "default": DEFAULT,
    "active 50%": ("--active-threshold", "50"),
    "active 0%": ("--active-threshold", "0"),
    "active 100%": ("--active-threshold", "100"),
    "held 1GiB": ("--held-threshold", "1GiB"),
    "held 0": ("--held-threshold", "0"),
    "held 8GiB exactly": ("--held-threshold", "8GiB"),  # bob's notebook holds exactly 8 GiB: not above it
    "held 300MB, active 25%": ("--active-threshold", "25", "--held-threshold", "300MB"),
    "held 12 GB + 1 B": ("--held-threshold", "12000000001B"),
    "held 1023MiB": ("--held-threshold", "1023MiB"),
    "active 60%": ("--active-threshold", "60"),  # schema 4: tens of percent above the cap
    "active 55%": ("--active-threshold", "55"),
    "held 2GiB": ("--held-threshold", "2GiB"),  # schema 4: whole GiB above the cap
    "held 2GB": ("--held-threshold", "2GB"),
}
# Above the histograms' caps (utilization 50 %, memory 1024 MiB) and between their steps
# (10 %, 1024 MiB): raw rows, said so.
BETWEEN_STEPS = {"active 55%", "held 2GB", "held 12 GB + 1 B"}


@pytest.fixture(scope="module")
def south_db(tmp_path_factory) -> str:
    """36 hours of lab8 (8 GPUs) around the southern zones' DST end, with a crash and a 40 min hole."""
    path = str(tmp_path_factory.mktemp("south") / "gua.db")
    return build_store_db(path, "lab8", SOUTH_START, SOUTH_START + 36 * HOUR, INTERVAL,
                          hole_at_ms=SOUTH_START + 17 * HOUR + 1_234_567)


@pytest.fixture(scope="module")
def north_db(tmp_path_factory) -> str:
    """24 hours of lab around St John's DST end."""
    path = str(tmp_path_factory.mktemp("north") / "gua.db")
    return build_store_db(path, "lab", NORTH_START, NORTH_START + 24 * HOUR, INTERVAL)


@pytest.fixture(scope="module")
def mig_db(tmp_path_factory) -> str:
    """A MIG card (per-process SM unknown) and an ordinary one, a working day."""
    path = str(tmp_path_factory.mktemp("mig") / "gua.db")
    return build_store_db(path, "mig", SOUTH_START - 6 * HOUR, SOUTH_START + 12 * HOUR, INTERVAL)


def assert_same(rolled: dict, raw: dict) -> None:
    assert raw["source"]["rollups"] == "none"
    a, b = dict(rolled), dict(raw)
    del a["source"], b["source"]
    assert a == b


@pytest.mark.parametrize("tz", ["UTC", "Asia/Kolkata", "Asia/Kathmandu", "Australia/Adelaide",
                                "Australia/Lord_Howe", "Pacific/Chatham", "Europe/Berlin"])
@pytest.mark.parametrize("name", ["default", "active 50%", "held 300MB, active 25%"])
def test_every_zone_and_threshold_reads_rollups_exactly(south_db, tz, name):
    rolled, raw = rolled_and_raw(south_db, *SOUTH_WINDOW, "--tz", tz, *THRESHOLDS[name])
    src = rolled["source"]
    assert src["rollup_hours"] >= 30
    assert src["rollups"] == ("hourly" if name == "default" else "histograms")
    assert src["heatmap"] == ("hour" if tz in ("UTC", "Europe/Berlin") else "quarter")
    hm = rolled["heatmap"]
    assert hm["unplaced_known_ms"] == 0 and hm["note"] is None
    assert sum(map(sum, hm["known_ms"])) == rolled["headline"]["known_ms"] > 0
    assert rolled["rules"]["note"] is None
    assert_same(rolled, raw)


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_every_threshold_kind(south_db, name):
    rolled, raw = rolled_and_raw(south_db, *SOUTH_WINDOW, "--tz", "Asia/Kolkata", *THRESHOLDS[name])
    if name in BETWEEN_STEPS:
        assert rolled["source"]["rollups"] == "none"
        assert "raw samples (the rollups keep utilization in 10 % steps above 50 % and memory in 1024 MiB " \
            "steps above 1024 MiB)" in rolled["rules"]["note"]
    else:
        assert rolled["source"]["rollup_hours"] >= 30
        assert rolled["rules"]["note"] is None
    assert_same(rolled, raw)
    users = {u["user"]: u for u in rolled["identities"]["users"]}
    if name == "held 0":  # every holder holds: carol's job between its bursts too
        assert rolled["headline"]["idle_ms"] < raw["headline"]["ticks"] * INTERVAL
    if name == "held 8GiB exactly":
        # bob's notebooks: 8 GiB on GPU 1 is not above 8 GiB, 16 GiB on GPU 5 is (2 GiB on GPU 2: below)
        assert [g[-1] for g in users["bob"]["gpus"]] == ["5"]


def test_dst_in_the_north(north_db):
    for tz in ("America/St_Johns", "Asia/Kolkata", "America/New_York"):
        for name in ("default", "held 1023MiB"):
            rolled, raw = rolled_and_raw(north_db, *NORTH_WINDOW, "--tz", tz, *THRESHOLDS[name])
            assert rolled["source"]["heatmap"] == ("hour" if tz == "America/New_York" else "quarter")
            assert rolled["heatmap"]["unplaced_known_ms"] == 0
            assert_same(rolled, raw)


@pytest.mark.parametrize("name", ["default", "active 50%", "held 1023MiB"])
def test_sm_unknown_holders(mig_db, name):
    window = ("--since", "2024-04-05T07:30:00Z", "--until", "2024-04-05T23:30:00Z", "--tz", "Asia/Kathmandu")
    rolled, raw = rolled_and_raw(mig_db, *window, *THRESHOLDS[name])
    assert rolled["data_quality"]["sm_unknown_ms"] > 0
    assert_same(rolled, raw)


def test_gpu_and_user_filters(south_db):
    rolled, raw = rolled_and_raw(south_db, *SOUTH_WINDOW, "--tz", "Asia/Kolkata", "--gpu", "2", "--gpu", "6",
                       "--user", "bob", "--held-threshold", "1GB")
    assert rolled["source"]["rollups"] == "histograms"
    assert_same(rolled, raw)


def test_an_active_threshold_between_whole_percents_is_read_raw_and_says_so(south_db):
    """7.5 %: the histograms keep whole percents, so such a report reads raw rows, and says so."""
    rolled, raw = rolled_and_raw(south_db, *SOUTH_WINDOW, "--tz", "Asia/Kolkata", "--active-threshold", "7.5")
    assert rolled["source"]["rollups"] == "none"
    note = rolled["rules"]["note"]
    assert "not a whole percent" in note and "raw samples" in note
    assert_same(rolled, raw)
    text = run_report("--db", south_db, *SOUTH_WINDOW, "--tz", "Asia/Kolkata", "--active-threshold", "7.5").stdout
    assert "Note: an active threshold that is not a whole percent is classified from raw" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    default_text = run_report("--db", south_db, *SOUTH_WINDOW, "--tz", "Asia/Kolkata",
                              "--held-threshold", "1000MB").stdout
    assert "Note:" not in default_text
    for held in ("1.5GiB", "12000000001B"):  # the rules line names a size no unit divides, in 80 columns too
        beyond = run_report("--db", south_db, *SOUTH_WINDOW, "--tz", "Asia/Kolkata", "--held-threshold", held).stdout
        assert "Note: an active threshold above 50 % that is not a multiple of 10 %" in beyond
        assert all(len(line) <= 80 for line in beyond.splitlines()), beyond
    for fast in (("--held-threshold", "1GiB"), ("--held-threshold", "64GiB"), ("--active-threshold", "90")):
        assert "Note:" not in run_report("--db", south_db, *SOUTH_WINDOW, "--tz", "Asia/Kolkata", *fast).stdout


def test_histograms_equal_the_raw_rows_hour_by_hour(south_db):
    """hour_gpu_hist and quarter_gpu hold what the raw rows do, summed: time, ticks, energy, coverage."""
    conn = sqlite3.connect(f"file:{south_db}?mode=ro", uri=True)
    next_hour = int(conn.execute("SELECT value FROM meta WHERE key = 'rollup_next_hour'").fetchone()[0])
    raw = conn.execute(
        """SELECT t.ts_ms / 3600000 AS hour, g.gpu_id, count(*), sum(t.duration_ms), sum(g.energy_mj),
                  sum(t.duration_ms * coalesce({COVERAGE}, 0))
           FROM tick t JOIN gpu_sample g USING (tick_id) WHERE t.ts_ms < ? * 3600000
           GROUP BY 1, 2 ORDER BY 1, 2""".format(COVERAGE=schema.COVERAGE_SQL.format(g="g.")),
        (next_hour,)).fetchall()
    hist = conn.execute(
        """SELECT hour, gpu_id, sum(ticks), sum(ms), sum(energy_mj), sum(coverage_pm_ms)
           FROM hour_gpu_hist GROUP BY 1, 2 ORDER BY 1, 2""").fetchall()
    assert hist == raw
    known = conn.execute(
        """SELECT t.ts_ms / 900000, g.gpu_id, sum(t.duration_ms) FROM tick t JOIN gpu_sample g USING (tick_id)
           WHERE t.ts_ms < ? * 3600000 AND g.status = 0 AND g.util_permille IS NOT NULL
           GROUP BY 1, 2 ORDER BY 1, 2""", (next_hour,)).fetchall()
    assert conn.execute("SELECT quarter, gpu_id, sum(ms) FROM quarter_gpu GROUP BY 1, 2 ORDER BY 1, 2").fetchall() \
        == known
    # a few rows per GPU and hour, not one per tick (lab8's training varies by the minute)
    rows = conn.execute("SELECT count(*) FROM hour_gpu_hist").fetchone()[0]
    gpu_hours = conn.execute("SELECT count(*) FROM hour_gpu").fetchone()[0]
    assert gpu_hours <= rows < 4 * gpu_hours
    conn.close()


@pytest.mark.parametrize("name", ["ROLLUP_GPU_HIST", "ROLLUP_QUARTER_GPU", "ROLLUP_ACCOUNT_HIST", "ROLLUP_UNIT_HIST"])
def test_histogram_rollups_seek_by_time(tmp_path, name):
    """Each histogram costs the hour's rows, not the database's size (as the rollups, tests/test_store.py)."""
    from gua_collector import rollup
    from gua_collector.store import Store

    Store.open(str(tmp_path / "gua.db"), now_ms=SOUTH_START).close()
    conn = sqlite3.connect(tmp_path / "gua.db")
    plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + getattr(rollup, name),
                                           {"lo": 0, "hi": 1, "cpu_busy": 100})]
    conn.close()
    facts = {"tick", "t", "gpu_sample", "g", "proc_sample", "ps", "process", "p"}
    scans = [s for s in plan if s.startswith("SCAN") and s.split()[1] in facts]
    assert not scans, plan
    assert any("tick_ts" in s for s in plan), plan


def test_reports_sum_histograms_as_they_read_them(tmp_path):
    """hour_gpu_hist and hour_account_hist are read one key range per GPU (and account), unsorted."""
    from gua_report import query

    path = build_store_db(str(tmp_path / "gua.db"), "lab", SOUTH_START, SOUTH_START + 3 * HOUR, INTERVAL)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    h0 = SOUTH_START // HOUR
    plans = []

    class Spy:
        def execute(self, sql, params=()):
            plans.append([r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)])
            return conn.execute(sql, params)

    query.gpu_state_hist(Spy(), h0, h0 + 2, 500, 10**9, [1, 2, 3, 4])
    query.identity_hist(Spy(), h0, h0 + 2, 500, 10**9, [1, 2, 3, 4], [1, 2, 3], False)
    conn.close()
    for plan in plans:
        assert any("USING PRIMARY KEY (gpu_id=?" in step for step in plan), plan
        assert not any("TEMP B-TREE" in step for step in plan), plan


def test_a_clock_set_back_rolls_the_hour_up_again(tmp_path):
    """Ticks of an hour already rolled up (the wall clock went back): its histograms are written anew."""
    import shutil

    from gua_collector import rollup
    from gua_collector.store import Store
    from report_helpers import sim_ticks, store_run

    path = str(tmp_path / "gua.db")
    store = Store.open(path, now_ms=SOUTH_START)
    store_run(store, sim_ticks(SOUTH_START, SOUTH_START + 3 * HOUR, INTERVAL, "lab", cpu=True),
              interval_ms=INTERVAL)
    # a second run whose clock is 2 h 40 min behind: its 30 ticks land in the first hour again
    back = SOUTH_START + 20 * 60_000 + 7_000
    store_run(store, sim_ticks(back, back + 30 * 60_000, INTERVAL, "lab", cpu=True), interval_ms=INTERVAL)
    store.close()
    again = str(tmp_path / "again.db")
    shutil.copy(path, again)
    conn = sqlite3.connect(again, isolation_level=None)
    conn.execute("BEGIN")
    next_hour = int(conn.execute("SELECT value FROM meta WHERE key = 'rollup_next_hour'").fetchone()[0])
    rollup.roll_up(conn, SOUTH_START // HOUR, next_hour, rollup.thresholds(conn))  # from scratch
    conn.execute("COMMIT")
    conn.close()
    tables = ("hour_gpu", "hour_account", "hour_unit", "hour_gpu_hist", "quarter_gpu", "hour_account_hist",
              "hour_unit_hist")

    def dump(p: str) -> dict[str, list]:
        c = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        out = {t: sorted(c.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
        c.close()
        return out

    got, want = dump(path), dump(again)
    assert got == want
    # the replayed hour holds both runs' ticks (60 and 30 per GPU)
    first = [r for r in got["hour_gpu_hist"] if r[0] == SOUTH_START // HOUR and r[1] == 1]
    assert sum(r[4] for r in first) == 60 + 30


def test_thresholds_beyond_the_caps_use_only_hours_rolled_up_with_steps(tmp_path):
    """A schema 3 database upgraded to 4: its older histograms stop at the caps (util 50 %, 1024 MiB), so a
    report at 60 % or 2 GiB reads those hours raw and the later, stepped ones from the histograms; exact."""
    from gua_collector.store import Store
    from report_helpers import sim_ticks, store_run

    path = str(tmp_path / "gua.db")
    upgrade = SOUTH_START + 6 * HOUR
    build_store_db(path, "lab8", SOUTH_START, upgrade, INTERVAL)
    # Make it what schema 3 wrote: keys stopped at the caps, no step meta, user_version 3.
    conn = sqlite3.connect(path, isolation_level=None)
    capped = {"util_pct": "min(util_pct, 50)", "sm_pct": "min(sm_pct, 50)", "mem_mib": "min(mem_mib, 1024)"}
    for table in ("hour_gpu_hist", "quarter_gpu", "hour_account_hist", "hour_unit_hist"):
        cols = conn.execute(f"SELECT name, pk FROM pragma_table_info('{table}')").fetchall()
        keys = [capped.get(c, c) for c, pk in cols if pk]
        select = ", ".join(capped.get(c, c) if pk else f"sum({c})" for c, pk in cols)
        conn.execute(f"CREATE TEMP TABLE old AS SELECT {select} FROM {table} GROUP BY {', '.join(keys)}")
        conn.execute(f"DELETE FROM {table}")
        conn.execute(f"INSERT INTO {table} SELECT * FROM old")
        conn.execute("DROP TABLE old")
    conn.execute("DELETE FROM meta WHERE key IN ('hist_pct_step', 'hist_mib_step', 'hist_steps_since_hour')")
    conn.execute("PRAGMA user_version = 3")
    next_hour = int(conn.execute("SELECT value FROM meta WHERE key = 'rollup_next_hour'").fetchone()[0])
    conn.close()
    store = Store.open(path, now_ms=upgrade)  # the upgrade to schema 4
    store_run(store, sim_ticks(upgrade, upgrade + 8 * HOUR, INTERVAL, "lab8", cpu=True), started_ms=upgrade,
              interval_ms=INTERVAL)
    store.close()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    conn.close()
    assert (meta["hist_steps_since_hour"], meta["hist_pct_step"], meta["hist_mib_step"]) == (
        str(next_hour), "10", "1024")
    window = ("--since", "2024-04-05T12:30:00Z", "--until", "2024-04-06T01:30:00Z", "--tz", "Asia/Kolkata")
    for thresholds in (("--active-threshold", "60"), ("--held-threshold", "2GiB"), ("--active-threshold", "40")):
        rolled, raw = rolled_and_raw(path, *window, *thresholds)
        assert_same(rolled, raw)
        hours = rolled["source"]["rollup_hours"]
        if thresholds[1] == "40":  # within the caps: every whole hour from the histograms
            assert hours == 12
        else:  # 13:00 .. 17:00 UTC raw (capped), from the upgrade's hour on stepped
            assert hours == 12 - (next_hour - SOUTH_START // HOUR - 1), rolled["source"]
            assert "since the upgrade to schema 4" in rolled["source"]["note"]
