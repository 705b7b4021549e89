"""Every reporter query seeks by index: none scans tick, gpu_sample or proc_sample.

A full scan of a fact table costs seconds on a year of data; the speed
goal (365 days in < 2 s) depends on these plans. SQLite without ANALYZE
statistics plans the same on a small and a large file.
"""

from __future__ import annotations

import sqlite3
from zoneinfo import ZoneInfo

import pytest

from gua_report import query
from gua_report.window import HOUR_MS, offset_segments
from report_helpers import T0, G, HandDb, P

pytestmark = pytest.mark.timeout(60)

FACT_TABLES = ("tick", "gpu_sample", "proc_sample", "event", "hour_gpu", "hour_account", "hour_unit",
               "hour_gpu_hist", "quarter_gpu", "hour_account_hist", "hour_unit_hist")


class PlanSpy:
    """A connection stand-in that records EXPLAIN QUERY PLAN of each statement."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.plans: list[tuple[str, list[str]]] = []

    def execute(self, sql, params=()):
        plan = [r[3] for r in self.conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
        self.plans.append((sql, plan))
        return self.conn.execute(sql, params)


def test_no_full_scans(tmp_path):
    path = str(tmp_path / "gua.db")
    db = HandDb(path)
    g = db.gpu(0)
    p = db.process(1, db.account("alice", 1001), unit="slurm:job_1")
    r = db.run(T0)
    db.ticks(r, T0, 400, 10_000, G(g, util=0, procs=(P(p, mem=500),)), first_duration=0)
    db.roll_up(T0 // HOUR_MS + 1)
    db.close()
    spy = PlanSpy(sqlite3.connect(f"file:{path}?mode=ro", uri=True))
    lo, hi = T0, T0 + 2 * HOUR_MS
    segs = offset_segments(ZoneInfo("Europe/Berlin"), lo, hi)
    h0, h1 = lo // HOUR_MS, hi // HOUR_MS
    query.gpu_state_raw(spy, lo, hi, 100, 10**8, None, segs)
    query.gpu_state_raw(spy, lo, hi, 100, 10**8, [g], None)
    for by_unit in (False, True):
        query.identity_raw(spy, lo, hi, 100, 10**8, [g], by_unit)
        query.identity_rollup(spy, h0, h1, None, by_unit)
    query.gpu_state_rollup(spy, h0, h1, None, segs)
    query.gpu_state_hist(spy, h0, h1, 500, 10**9, [g], [h0])
    query.heat_hours(spy, h0, h1, 500, [g], segs, [h0])
    query.heat_quarters(spy, h0 * 4, h1 * 4, 100, [g], segs, [h0])
    for by_unit in (False, True):
        query.identity_hist(spy, h0, h1, 100, 0, [g], [1, 2], by_unit, [h0])
    query.hour_cover_raw(spy, lo, hi)
    query.hour_cover_rollup(spy, h0, h1)
    list(query.ticks_between(spy, lo, hi))
    query.tick_before(spy, lo)
    query.tick_at_or_after(spy, lo)
    query.first_last_tick(spy, lo, hi)
    query.last_status(spy, lo, hi)
    query.error_events(spy, lo, hi)
    query.gap_events(spy, lo, hi, 10)
    query.count_gap_events(spy, lo, hi)
    assert len(spy.plans) >= 22
    for sql, plan in spy.plans:
        for step in plan:
            for table in FACT_TABLES:
                assert not step.startswith(f"SCAN {table}"), (step, sql)
                assert not step.startswith("SCAN") or " USING " in step or "subquery" in step, (step, sql)
