"""Ticks that cover the same time twice are counted once per GPU.

Older collectors stored them when the wall clock stepped back inside a run,
or when a run replayed times already stored; the hourly rollups were built
from those rows too. GPU time must never exceed GPUs x window: where ticks
overlap, each GPU's row counts only the part of (ts - d, ts] after the
previous tick of that GPU (query.py, "overlapping ticks"), on both the
rollup and the raw path, and DATA QUALITY says how much was dropped.

The databases are written by hand (HandDb: every number below is computed
by hand) and through the collector's own Store (which writes the rollups
from the overlapping rows, as the old collectors did), and the report is
held to an independent Python implementation of the rule.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict

import pytest

from report_helpers import HOUR, T0, G, HandDb, P, report_json, run_report, shifted, sim_ticks, store_run

pytestmark = pytest.mark.timeout(180)

S = 1000
A, H = 100, 100_000_000  # default thresholds: permille, bytes
STEP = 30 * 60 * S  # the clock steps back 30 minutes after one hour of ticks


def step_back_db(path: str, shift_ms: int, roll_up: bool = True) -> None:
    """One GPU; alice trains for an hour (active), then the wall clock steps back 30 min.

    The run goes on (10 s monotonic durations) stamping ticks from
    T0 + 30 min + shift on, with alice idle now (idle-held), until T0 + 2 h.
    shift 0: the replayed ticks fall on the stored ones' timestamps; -5 s: in between.
    """
    db = HandDb(path)
    g = db.gpu(0)
    p = db.process(100, db.account("alice", 1001))
    r = db.run(T0)
    busy = G(g, util=500, procs=(P(p, mem=2000, sm=50),))
    idle = G(g, util=0, procs=(P(p, mem=2000, sm=0),))
    db.tick(r, T0, 0, busy)
    db.ticks(r, T0, 360, 10 * S, busy)
    ts = T0 + STEP + shift_ms
    while ts + 10 * S < T0 + 2 * HOUR:
        ts += 10 * S
        db.tick(r, ts, 10 * S, idle)
    if roll_up:
        db.roll_up(T0 // HOUR + 2)  # rollups of both hours, built from the overlapping rows
    db.close()


WINDOW = ("--since", "2024-01-01T00:00Z", "--until", "2024-01-01T02:00Z")


def both_paths(path: str, *args: str) -> dict:
    """The report from rollups and from raw rows: identical but for `source`."""
    a = report_json(path, *args)
    b = report_json(path, *args, "--no-rollups")
    for d in (a, b):
        del d["source"]
    assert a == b
    return a


@pytest.mark.parametrize("shift_ms, active_ms, held_ms, dropped_ms", [
    # Replayed ticks on the stored timestamps: the earlier-written tick keeps
    # the time (it comes first in (ts, tick_id) order), the replay counts 0.
    # Hour 0: 360 active ticks; the 180 replays up to T0 + 1 h drop 1800 s.
    # After T0 + 1 h: 359 idle-held ticks (the last one would be at T0 + 2 h).
    (0, 3_600 * S, 3_590 * S, 1_800 * S),
    # 5 s off: from T0 + 30 min each tick keeps the 5 s since the other
    # run's tick. Active: 180 x 10 s + 180 x 5 s; idle-held: 180 x 5 s, the
    # first after T0 + 1 h 5 s, then 359 x 10 s.
    (-5 * S, 2_700 * S, 4_495 * S, 180 * 5 * S + 180 * 5 * S + 5 * S),
])
def test_clock_step_back_counts_each_instant_once(tmp_path, shift_ms, active_ms, held_ms, dropped_ms):
    path = str(tmp_path / "gua.db")
    step_back_db(path, shift_ms)
    rep = both_paths(path, *WINDOW)
    h = rep["headline"]
    assert (h["active_ms"], h["idle_held_ms"], h["idle_ms"], h["unknown_ms"]) == (active_ms, held_ms, 0, 0)
    assert h["total_ms"] == active_ms + held_ms <= 2 * HOUR  # one GPU, a 2 h window
    assert h["ticks"] == 1 + 360 + len(range(T0 + STEP + shift_ms + 10 * S, T0 + 2 * HOUR, 10 * S))
    (alice,) = rep["identities"]["users"]
    assert (alice["held_ms"], alice["idle_held_ms"]) == (active_ms + held_ms, held_ms)
    assert alice["mem_mib_ms"] == 2000 * (active_ms + held_ms)
    q = rep["data_quality"]
    assert q["overlap_ms"] == dropped_ms
    assert q["overlap_hours"] >= 1
    assert (q["overlap_unremoved_ms"], q["overlap_unremoved_hours"]) == (0, 0)
    assert sum(map(sum, rep["heatmap"]["known_ms"])) == active_ms + held_ms
    # The text says it, in 80 columns.
    r = run_report("--db", path, *WINDOW, "--tz", "UTC")
    assert r.returncode == 0, r.stderr
    assert "overlap: ticks covering the same time twice" in r.stdout
    assert f"{dropped_ms / HOUR:.2f} GPU-h counted once, not twice" in r.stdout
    assert f"{(active_ms + held_ms) / HOUR:.2f} GPU-h on 1 GPU" in r.stdout
    assert all(len(line) <= 80 for line in r.stdout.splitlines())


def test_window_inside_the_overlap(tmp_path):
    """A window that starts and ends inside overlapping hours counts the same ticks the same way."""
    path = str(tmp_path / "gua.db")
    step_back_db(path, -5 * S)
    rep = both_paths(path, "--since", "2024-01-01T00:40Z", "--until", "2024-01-01T01:20Z", "--tz", "Asia/Kolkata")
    h = rep["headline"]
    # [T0+40 min, T0+60 min]: 121 active ticks of 5 s each (the one at T0 + 40 min
    # follows the replay at T0 + 39 min 55 s) and 120 idle-held replays of 5 s;
    # then the replay at T0 + 1 h 5 s keeps 5 s and 119 more keep 10 s.
    assert h["active_ms"] == 121 * 5 * S
    assert h["idle_held_ms"] == 120 * 5 * S + 5 * S + 119 * 10 * S
    assert h["total_ms"] == 40 * 60 * S  # each instant of the window once


def test_no_overlap_no_change(tmp_path):
    """An ordinary database: nothing is flagged, nothing read from raw rows for it."""
    path = str(tmp_path / "gua.db")
    db = HandDb(path)
    g = db.gpu(0)
    r = db.run(T0)
    db.tick(r, T0, 0, G(g))
    db.ticks(r, T0, 720, 10 * S, G(g, util=300))
    db.roll_up(T0 // HOUR + 2)
    db.close()
    rep = report_json(path, *WINDOW)
    assert rep["headline"]["total_ms"] == 2 * HOUR - 10 * S  # the tick at T0 + 2 h is after the window
    assert (rep["data_quality"]["overlap_ms"], rep["data_quality"]["overlap_hours"]) == (0, 0)
    assert rep["source"]["rollup_hours"] == 2 and rep["source"]["raw_ranges_ms"] == []
    r = run_report("--db", path, *WINDOW, "--tz", "UTC")
    assert "overlap" not in r.stdout


def test_small_step_stays_within_the_hour(tmp_path):
    """The limit of the per-hour test: a clock stepped back 5 s (half a tick) goes unseen.

    Those 5 s count twice, but the hour holds no more than an hour: GPU time
    still does not exceed GPUs x window. (An hour's sum is the cheap test;
    anything finer would read every tick of every hour.)
    """
    path = str(tmp_path / "gua.db")
    db = HandDb(path)
    g = db.gpu(0)
    r = db.run(T0)
    db.tick(r, T0, 0, G(g))
    db.ticks(r, T0, 180, 10 * S, G(g, util=500))
    db.ticks(r, T0 + STEP - 5 * S, 180, 10 * S, G(g, util=0))  # T0 + 30 min 5 s .. T0 + 59 min 55 s
    db.roll_up(T0 // HOUR + 1)
    db.close()
    rep = both_paths(path, "--since", "2024-01-01T00:00Z", "--until", "2024-01-01T01:00Z")
    assert rep["headline"]["total_ms"] == HOUR  # (T0, T0 + 1 h - 5 s] is 3595 s
    assert rep["data_quality"]["overlap_ms"] == 0


def test_pruned_overlap_is_reported_not_hidden(tmp_path):
    """Retention removed the raw rows of an hour with overlap: its rollup is all that is left.

    Nothing can be counted once there; the report keeps the rollup and says
    roughly how much GPU time it counts twice.
    """
    path = str(tmp_path / "gua.db")
    step_back_db(path, 0)
    conn = sqlite3.connect(path, isolation_level=None)
    cut = T0 + HOUR
    for table in ("gpu_sample", "proc_sample"):
        conn.execute(f"DELETE FROM {table} WHERE tick_id IN (SELECT tick_id FROM tick WHERE ts_ms < ?)", (cut,))
    conn.execute("DELETE FROM tick WHERE ts_ms < ?", (cut,))
    conn.execute("INSERT INTO meta (key, value) VALUES ('raw_pruned_before_ms', ?)", (str(cut),))
    conn.close()
    rep = report_json(path, *WINDOW)
    q = rep["data_quality"]
    # hour 0 as rolled up: 359 stored ticks + 179 replays of 10 s, 5380 s
    assert q["overlap_unremoved_hours"] == 1
    assert q["overlap_unremoved_ms"] == (359 + 179) * 10 * S - HOUR
    r = run_report("--db", path, *WINDOW, "--tz", "UTC")
    assert "overlap kept in 1 UTC hour whose raw samples retention removed" in r.stdout
    assert f"about {1780 / 3600:.2f} GPU-h there are counted twice" in r.stdout


# ---------------------------------------------------------------- through the collector's Store

START = T0 + 7 * 24 * HOUR  # 2024-01-08 00:00 UTC, a Monday
INTERVAL = 30 * S


def store_db(path: str, *runs: list) -> str:
    from gua_collector.store import Store

    store = Store.open(path, now_ms=START)
    try:
        for ticks in runs:
            store_run(store, ticks, interval_ms=INTERVAL, stop_ms=ticks[-1].ts_ms)
    finally:
        store.close()
    return path


def reference(path: str, since: int, until: int) -> tuple[dict[str, dict[str, int]], int]:
    """Per GPU state time by SCHEMA.md's rules, each GPU's ticks clipped to start
    after its previous tick (in ts, tick_id order); and the time clipped off."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    tick = {t: (ts, d) for t, ts, d in conn.execute("SELECT tick_id, ts_ms, duration_ms FROM tick")}
    mems = defaultdict(list)
    for t, g, mem in conn.execute("SELECT tick_id, gpu_id, mem_mib FROM proc_sample WHERE kind & 1"):
        mems[(t, g)].append(mem)
    uuid = dict(conn.execute("SELECT gpu_id, uuid FROM gpu"))
    rows = defaultdict(list)
    for t, g, status, util in conn.execute("SELECT tick_id, gpu_id, status, util_permille FROM gpu_sample"):
        rows[g].append((tick[t][0], t, tick[t][1], status, util))
    out: dict[str, dict[str, int]] = {}
    dropped = 0
    for g, lst in rows.items():
        acc = out.setdefault(uuid[g], defaultdict(int))
        prev = None
        for ts, t, d, status, util in sorted(lst):
            e = d if prev is None else min(d, ts - prev)
            prev = ts
            if not since <= ts < until:
                continue
            m = mems[(t, g)]
            held = any(x is None for x in m) or sum(x or 0 for x in m) * 1048576 > H
            state = ("unknown_ms" if status != 0 or util is None else "active_ms" if util >= A
                     else "idle_held_ms" if held else "idle_ms")
            acc[state] += e
            acc["total_ms"] += e
            dropped += d - e
    return out, dropped


def per_gpu(rep: dict) -> dict[str, dict[str, int]]:
    keys = ("active_ms", "idle_held_ms", "idle_ms", "unknown_ms", "total_ms")
    return {g["uuid"]: {k: g[k] for k in keys if g[k]} for g in rep["gpus"]}


SAME = ("headline", "gpus", "identities", "heatmap", "energy", "idle_capacity")


def without_ticks(rep: dict) -> dict:
    out = {k: json.loads(json.dumps(rep[k])) for k in SAME}
    del out["headline"]["ticks"]
    for g in out["gpus"]:
        del g["ticks"]
    return out


@pytest.mark.parametrize("args", [
    ("--since", "2024-01-08T00:00Z", "--until", "2024-01-08T06:00Z", "--tz", "UTC"),
    ("--since", "2024-01-08T00:17:13Z", "--until", "2024-01-08T05:03:07Z", "--tz", "Asia/Kolkata"),
])
def test_replayed_run_counts_like_one_run(tmp_path, args):
    """Two runs stored the same six hours (4 GPUs): the report equals one run's, on both paths.

    The second run's rows, and the rollups the Store built from both, would
    otherwise double every figure (the seed of this: 1343 GPU-h from 4 GPUs
    in a 168 h window).
    """
    ticks = list(sim_ticks(START, START + 6 * HOUR, INTERVAL, "lab"))
    once = store_db(str(tmp_path / "once.db"), ticks)
    twice = store_db(str(tmp_path / "twice.db"), ticks, ticks)
    a = report_json(once, *args)
    b = both_paths(twice, *args)
    assert without_ticks(b) == without_ticks(a)
    assert b["headline"]["ticks"] == 2 * a["headline"]["ticks"]
    assert b["headline"]["total_ms"] <= 4 * (b["window"]["until_ms"] - b["window"]["since_ms"]) + 4 * INTERVAL
    conn = sqlite3.connect(f"file:{twice}?mode=ro", uri=True)
    stored = conn.execute("SELECT sum(t.duration_ms) FROM tick t JOIN gpu_sample g USING (tick_id) "
                          "WHERE t.ts_ms >= ? AND t.ts_ms < ?",
                          (b["window"]["since_ms"], b["window"]["until_ms"])).fetchone()[0]
    assert b["data_quality"]["overlap_ms"] == stored - a["headline"]["total_ms"] > 0
    assert a["data_quality"]["overlap_ms"] == 0


def test_clock_step_back_in_a_store_run(tmp_path):
    """Inside one run the wall clock steps back 47 min 13 s after 3 h (8 GPUs, lab8).

    The report (rollups and raw) equals an independent implementation of the
    rule, never exceeds GPUs x window, and the rollup path reads only the
    hours with overlap from raw rows.
    """
    step = 47 * 60 * S + 13 * S
    first = list(sim_ticks(START, START + 3 * HOUR, INTERVAL, "lab8"))
    after = shifted(list(sim_ticks(START + 3 * HOUR, START + 6 * HOUR, INTERVAL, "lab8")), -step,
                    first_duration=INTERVAL)
    path = store_db(str(tmp_path / "gua.db"), first + after)
    since, until = START, START + 6 * HOUR - step
    args = ("--since", "2024-01-08T00:00Z", "--until", "2024-01-08T05:12:47Z", "--tz", "UTC")
    rep = both_paths(path, *args)
    expected, dropped = reference(path, since, until)
    assert per_gpu(rep) == {u: {k: v for k, v in d.items() if v} for u, d in expected.items()}
    # every GPU lost the 47 min 13 s the clock went back (to the jitter of a tick)
    assert rep["data_quality"]["overlap_ms"] == dropped
    assert 8 * (step - S) < dropped <= 8 * (step + S)
    assert rep["headline"]["total_ms"] <= 8 * (until - since)
    src = report_json(path, *args)["source"]
    # Only the UTC hour the replay overlaps (02:00-03:00) is read from raw rows,
    # besides the window's last, partial hour; hours 0, 1, 3 and 4 from rollups.
    assert src["overlap_ranges_ms"] == [[START + 2 * HOUR, START + 3 * HOUR]]
    assert src["raw_ranges_ms"] == [[START + 5 * HOUR, until]]
    assert src["rollup_hours"] == 4


def test_overlap_queries_seek_by_index(tmp_path):
    """The queries that count overlapping ticks seek tick_ts and primary keys, never scan a fact table."""
    from zoneinfo import ZoneInfo

    from gua_report import query, rawload
    from gua_report.window import offset_segments

    path = str(tmp_path / "gua.db")
    step_back_db(path, -5 * S)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    lo, hi = T0, T0 + 2 * HOUR
    h0, h1 = lo // HOUR, hi // HOUR
    segs = offset_segments(ZoneInfo("Asia/Kolkata"), lo, hi)
    calls = [
        (query.gpu_state_clipped, (conn, lo, hi, A, H, None, segs)),
        (query.gpu_state_clipped, (conn, lo, hi, A, H, [1], None)),
        (query.identity_clipped, (conn, lo, hi, A, H, None, False)),
        (query.identity_clipped, (conn, lo, hi, A, H, [1], True)),
        (query.gpu_hour_cover_raw, (conn, h0, h1)),
        (query.hour_gpu_totals, (conn, [h0, h0 + 1])),
        (query.gpu_state_rollup, (conn, h0, h1, None, segs, [h0])),
        (query.identity_rollup, (conn, h0, h1, None, True, 0, True, [h0])),
    ]
    seen = []

    class Spy:
        def execute(self, sql, params=()):
            seen.append((sql, [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]))
            return conn.execute(sql, params)

    for fn, args in calls:
        fn(Spy(), *args[1:])
    # Besides the probe for compacted hours (rawload: none here, so one statement per raw call), one each.
    probes = [sql for sql, _ in seen if sql == rawload.Q_ANY_CHUNK_AT_ALL]
    assert len(probes) == 5 and len(seen) == len(calls) + len(probes)
    for sql, plan in seen:
        for step in plan:
            for table in ("tick", "gpu_sample", "proc_sample", "hour_gpu", "hour_account", "hour_unit"):
                assert not step.startswith(f"SCAN {table}"), (step, sql)
    # and the results agree with the report's
    rows = query.gpu_state_clipped(conn, lo, hi, A, H, None, None)
    assert sum(r[3] for r in rows) == 2 * HOUR - 5 * S  # covered: (T0, T0 + 2 h - 5 s]
