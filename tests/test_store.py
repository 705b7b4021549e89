"""Schema creation and migration, dimensions, rollups against the raw rows, retention."""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from gua_collector import schema
from gua_collector.clock import SimClock
from gua_collector.records import GpuInfo, GpuSample, ProcessInfo, ProcSample, Tick
from gua_collector.sampler import Sampler
from gua_collector.simulate import SimBackend
from gua_collector.store import Store

pytestmark = pytest.mark.timeout(60)
START = 1_772_438_400_000  # 2026-03-02 08:00 UTC, a Monday


def test_fresh_schema(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "gua.db"), now_ms=START)
    store.close()
    conn = sqlite3.connect(tmp_path / "gua.db")
    assert schema.read_version(conn) == schema.SCHEMA_VERSION
    assert schema.is_gua(conn)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"tick", "gpu_sample", "proc_sample", "gpu", "process", "account", "event", "run", "hour_gpu"} <= tables
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "tick_ts" in indexes and "event_ts" in indexes


def test_migration_is_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A migration that fails halfway leaves the database exactly as it was.
    broken = schema.MIGRATIONS[0] + "\nCREATE TABLE tick (oops INTEGER);\n"
    monkeypatch.setitem(schema.MIGRATIONS, 0, broken)
    conn = sqlite3.connect(tmp_path / "gua.db", isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        schema.ensure_schema(conn, START)
    assert schema.read_version(conn) == 0
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


def test_migration_steps_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = sqlite3.connect(tmp_path / "gua.db", isolation_level=None)
    current = schema.ensure_schema(conn, START)
    monkeypatch.setattr(schema, "SCHEMA_VERSION", current + 1)
    monkeypatch.setitem(schema.MIGRATIONS, current, "ALTER TABLE gpu ADD COLUMN serial TEXT;")
    assert schema.ensure_schema(conn, START) == current + 1
    assert "serial" in [r[1] for r in conn.execute("PRAGMA table_info(gpu)")]
    assert schema.read_version(conn) == current + 1


def proc(pid: int, user: str, unit: str = "") -> ProcessInfo:
    return ProcessInfo(pid, 1000 + pid, 1000 + pid, user, "python", "/x", unit)


def gpu(n: int) -> GpuInfo:
    return GpuInfo(f"GPU-{n}", n, "Test", 80 * 1024**3)


def test_dimensions_are_shared_and_index_follows_uuid(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "gua.db"), now_ms=START)
    store.begin_run(START, 10_000, "test", "host", "0")
    a = ProcSample(proc(1, "alice"), 1, 100, 0)
    store.write_ticks([Tick(START, 0, (GpuSample(gpu(0), procs=(a,)),)), Tick(START + 10_000, 10_000, (GpuSample(gpu(0), procs=(a,)),))])
    moved = GpuInfo("GPU-0", 3, "Test", 80 * 1024**3)
    store.write_ticks([Tick(START + 20_000, 10_000, (GpuSample(moved, procs=(a,)),))])
    store.close()
    conn = sqlite3.connect(tmp_path / "gua.db")
    assert conn.execute("SELECT count(*), max(gpu_index) FROM gpu").fetchone() == (1, 3)
    assert conn.execute("SELECT count(*) FROM process").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM proc_sample").fetchone()[0] == 3


def test_failed_transaction_leaves_no_dangling_ids(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "gua.db"), now_ms=START)
    store.begin_run(START, 10_000, "test", "host", "0")
    good = Tick(START, 0, (GpuSample(gpu(0), procs=(ProcSample(proc(1, "alice"), 1, 100, 0),)),))
    # The same GPU twice in one tick violates the primary key: the whole write rolls back.
    bad = Tick(START + 10_000, 10_000, (GpuSample(gpu(1), procs=(ProcSample(proc(2, "bob"), 1, 5, 0),)), GpuSample(gpu(1))))
    with pytest.raises(sqlite3.IntegrityError):
        store.write_ticks([good, bad])
    store.write_ticks([good])
    store.close()
    conn = sqlite3.connect(tmp_path / "gua.db")
    assert conn.execute("SELECT count(*) FROM tick").fetchone()[0] == 1
    assert [r[0] for r in conn.execute("SELECT uuid FROM gpu")] == ["GPU-0"]
    assert conn.execute("SELECT count(*) FROM proc_sample ps JOIN process p USING (proc_id)").fetchone()[0] == 1


def build(path: Path, scenario: str, ticks: int, interval_ms: int = 10_000, start: int = START) -> None:
    """Drive the real sampler and store on a simulated clock."""
    clock = SimClock(start)
    backend = SimBackend(scenario, clock)
    backend.init()
    store = Store.open(str(path), now_ms=start)
    store.begin_run(start, interval_ms, backend.name, "host", "0")
    sampler = Sampler(backend)
    for i in range(ticks):
        if i:
            clock.sleep(interval_ms / 1000, None)  # type: ignore[arg-type]
        store.write_ticks([sampler.tick(clock.wall_ms(), 0 if i == 0 else interval_ms)])
    store.close()


def raw_hour_gpu(conn: sqlite3.Connection, active: int, held_bytes: int) -> dict[tuple[int, int], tuple[int, ...]]:
    """The classification rules of SCHEMA.md, computed in Python from raw rows."""
    procs: dict[tuple[int, int], list[tuple[int, int | None]]] = defaultdict(list)
    for tick_id, gpu_id, kind, mem in conn.execute("SELECT tick_id, gpu_id, kind, mem_mib FROM proc_sample"):
        if kind & 1:
            procs[(tick_id, gpu_id)].append(mem)
    out: dict[tuple[int, int], list[int]] = {}
    rows = conn.execute(
        "SELECT t.tick_id, t.ts_ms, t.duration_ms, g.gpu_id, g.status, g.util_permille FROM tick t JOIN gpu_sample g USING (tick_id)"
    )
    for tick_id, ts, d, gpu_id, status, util in rows:
        mems = procs.get((tick_id, gpu_id), [])
        held = any(m is None for m in mems) or sum(m or 0 for m in mems) * 1048576 > held_bytes
        state = 3 if status or util is None else 0 if util >= active else 1 if held else 2
        acc = out.setdefault((ts // 3_600_000, gpu_id), [0, 0, 0, 0, 0])
        acc[0] += d
        acc[1 + state] += d
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.parametrize("scenario", ["lab", "faults", "mig"])
def test_rollups_equal_the_raw_rows(tmp_path: Path, scenario: str) -> None:
    db = tmp_path / "gua.db"
    build(db, scenario, ticks=6 * 360 + 7)  # six hours and a bit, in 10 s ticks
    conn = sqlite3.connect(db)
    next_hour = int(conn.execute("SELECT value FROM meta WHERE key = 'rollup_next_hour'").fetchone()[0])
    raw = {k: v for k, v in raw_hour_gpu(conn, 100, 100_000_000).items() if k[0] < next_hour}
    rolled = {
        (h, g): (total, a, held, idle, unknown)
        for h, g, total, a, held, idle, unknown in conn.execute(
            "SELECT hour, gpu_id, total_ms, active_ms, held_ms, idle_ms, unknown_ms FROM hour_gpu"
        )
    }
    assert len(rolled) >= 6 * 2
    assert rolled == raw
    # The per-account rollup counts an account once per GPU and tick.
    expected = conn.execute(
        """SELECT sum(d) FROM (SELECT max(t.duration_ms) AS d FROM proc_sample ps
           JOIN process p USING (proc_id) JOIN tick t USING (tick_id)
           WHERE ps.kind & 1 AND t.ts_ms / 3600000 < ? GROUP BY ps.tick_id, ps.gpu_id, p.account_id
           HAVING max(ps.mem_mib IS NULL) OR sum(ps.mem_mib) * 1048576 > 100000000)""",
        (next_hour,),
    ).fetchone()[0]
    assert conn.execute("SELECT sum(held_ms) FROM hour_account").fetchone()[0] == expected


def test_hidden_idle_holder_in_account_rollup(tmp_path: Path) -> None:
    # lab: bob's second notebook idles with 2 GB on the card carol keeps busy.
    db = tmp_path / "gua.db"
    build(db, "lab", ticks=2 * 360 + 1)
    conn = sqlite3.connect(db)
    rows = dict(conn.execute(
        """SELECT a.username, sum(h.idle_held_ms) FROM hour_account h JOIN account a USING (account_id)
           JOIN gpu g USING (gpu_id) WHERE g.gpu_index = 2 GROUP BY a.username"""
    ).fetchall())
    active, card_held = conn.execute(
        "SELECT sum(active_ms), sum(held_ms) FROM hour_gpu h JOIN gpu g USING (gpu_id) WHERE g.gpu_index = 2").fetchone()
    assert active > card_held, "the card as a whole is mostly active"
    assert rows["bob"] > 2 * card_held, "bob idles far longer than the card-level split shows"
    assert rows["bob"] == 2 * 3_600_000 - 10_000, "bob idles every tick of the two hours"
    units = [r[0] for r in conn.execute("SELECT DISTINCT unit FROM hour_unit")]
    assert "slurm:job_4242" in units


def test_retention_prunes_in_batches_and_keeps_rollups(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    build(db, "lab", ticks=3 * 360 + 1)
    store = Store.open(str(db), now_ms=START)
    cutoff = START + 3_600_000 + 1
    removed = []
    while (n := store.prune(cutoff, batch=100)) > 0:
        removed.append(n)
    store.close()
    assert removed[0] == 100 and sum(removed) == 361
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT min(ts_ms) FROM tick").fetchone()[0] >= cutoff
    orphans = conn.execute("SELECT count(*) FROM gpu_sample WHERE tick_id NOT IN (SELECT tick_id FROM tick)").fetchone()[0]
    assert orphans == 0
    assert conn.execute("SELECT count(*) FROM proc_sample WHERE tick_id NOT IN (SELECT tick_id FROM tick)").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM hour_gpu WHERE hour = ?", (START // 3_600_000,)).fetchone()[0] == 4
    assert conn.execute("SELECT value FROM meta WHERE key = 'raw_pruned_before_ms'").fetchone()[0] == str(cutoff)


@pytest.mark.parametrize("name", ["ROLLUP_GPU", "ROLLUP_ACCOUNT", "ROLLUP_UNIT"])
def test_rollups_seek_by_time_never_scan_facts(tmp_path: Path, name: str) -> None:
    """An hourly rollup must cost the hour's rows, not the database's size."""
    from gua_collector import rollup as store_module

    Store.open(str(tmp_path / "gua.db"), now_ms=START).close()
    conn = sqlite3.connect(tmp_path / "gua.db")
    sql = getattr(store_module, name)
    plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, {"lo": 0, "hi": 1, "active": 100, "held": 1, "cpu_busy": 100})]
    scans = [step for step in plan if step.startswith("SCAN") and any(t in step for t in ("ps", "g", "proc_sample", "gpu_sample", "tick", " t"))]
    assert not scans, plan


# ------------------------------------------------------------- schema 3: smaller rows, bounded process table
def test_full_coverage_and_power_beside_energy_are_not_stored(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "gua.db"), now_ms=START)
    store.begin_run(START, 10_000, "test", "host", "0")
    samples = (
        GpuSample(gpu(0), util_permille=500, coverage_permille=1000, power_mw=300_000, energy_mj=3_000_000),
        GpuSample(gpu(1), util_permille=500, coverage_permille=640, power_mw=250_000),  # no energy counter
        GpuSample(gpu(2), util_permille=None, coverage_permille=1000),  # util unknown: kept as stored
    )
    store.write_ticks([Tick(START, 10_000, samples)])
    store.close()
    conn = sqlite3.connect(tmp_path / "gua.db")
    rows = conn.execute(
        f"SELECT g.gpu_index, s.coverage_permille, {schema.COVERAGE_SQL.format(g='s.')}, s.power_mw, s.energy_mj "
        "FROM gpu_sample s JOIN gpu g USING (gpu_id) ORDER BY g.gpu_index").fetchall()
    assert rows == [
        (0, None, 1000, None, 3_000_000),  # full coverage reads back as 1000; energy is the exact mean power
        (1, 640, 640, 250_000, None),  # power is all there is
        (2, 1000, 1000, None, None),
    ]


def churn_tick(ts: int, pids: range) -> Tick:
    return Tick(ts, 10_000, (GpuSample(gpu(0), util_permille=0, coverage_permille=1000,
                                       procs=tuple(ProcSample(proc(p, "alice"), 1, 4096, 0) for p in pids)),))


def test_retention_deletes_processes_nothing_refers_to(tmp_path: Path) -> None:
    """Each hour a new job; one process runs all along. Pruning keeps exactly the processes of retained rows,
    also those that proc_gpu_state (a day) no longer holds."""
    hour = 3_600_000
    store = Store.open(str(tmp_path / "gua.db"), now_ms=START)
    store.begin_run(START, 10_000, "test", "host", "0")
    for h in range(60):
        # pid 1 (a notebook) every tick; job 100 + h during hour h only
        store.write_ticks([churn_tick(START + h * hour + s * 60_000, range(1, 2) if s % 2 else (1, 100 + h))
                           for s in range(60)])
    cutoff = START + 20 * hour + 30 * 60_000  # mid hour 20
    while store.prune(cutoff, batch=500):
        pass
    # a job seen again after its rows went (a pid of a long-lived process): a new row, never a deleted id
    store.write_ticks([churn_tick(START + 60 * hour, (1, 100))])
    store.close()
    conn = sqlite3.connect(tmp_path / "gua.db")
    assert conn.execute("SELECT count(*) FROM proc_sample WHERE proc_id NOT IN (SELECT proc_id FROM process)"
                        ).fetchone()[0] == 0, "every retained row keeps its process"
    pids = sorted(r[0] for r in conn.execute("SELECT pid FROM process"))
    # Jobs 100..119 ended before the cut, more than PROCESS_LAST_STEP_MS before it for 100..118;
    # job 119's last_ms may lag its last sighting by up to an hour, so it may stay one pass longer.
    assert pids[0] == 1 and 118 not in pids and set(range(120, 160)) <= set(pids)
    assert len(pids) <= 1 + 41 + 1 and pids.count(100) == 1
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


def test_process_last_seen_is_written_once_an_hour(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "gua.db"), now_ms=START)
    store.begin_run(START, 10_000, "test", "host", "0")
    lasts = []
    conn = sqlite3.connect(tmp_path / "gua.db")
    for m in range(0, 150, 5):  # 2.5 hours
        store.write_ticks([churn_tick(START + m * 60_000, range(1, 2))])
        lasts.append(conn.execute("SELECT last_ms FROM process").fetchone()[0])
    store.close()
    assert sorted(set(lasts)) == [START, START + 60 * 60_000, START + 120 * 60_000]
    for m, last in zip(range(0, 150, 5), lasts):
        assert 0 <= START + m * 60_000 - last < schema.PROCESS_LAST_STEP_MS


def test_unit_rollups_go_after_unit_retention_a_day_at_a_time(tmp_path: Path) -> None:
    """Per-unit rollups (a row per Slurm job and hour) are pruned by hour; per-GPU and per-user ones stay."""
    db = tmp_path / "gua.db"
    build(db, "lab", ticks=3 * 360 + 1)  # carol's Slurm job every hour: hours 8 to 10 rolled up
    store = Store.open(str(db), now_ms=START)
    conn = sqlite3.connect(db)

    def hours(table: str) -> list[int]:
        return sorted({r[0] - START // 3_600_000 for r in conn.execute(f"SELECT hour FROM {table}")})

    assert hours("hour_unit") == hours("hour_unit_hist") == [0, 1, 2]
    assert store.prune_units(START + 1 * 3_600_000) is False  # before hour 1 goes: all that was to go
    assert hours("hour_unit") == hours("hour_unit_hist") == [1, 2]
    assert store.prune_units(START + 1 * 3_600_000) is False  # nothing older left
    assert hours("hour_gpu") == hours("hour_account") == [0, 1, 2], "only the per-unit rollups go"
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    assert meta["units_pruned_before_hour"] == str(START // 3_600_000 + 1)
    # a cut far ahead goes a day at a time
    assert store.prune_units(START + 1000 * 3_600_000) is True  # more hours to go than one batch
    assert hours("hour_unit") == [] and dict(conn.execute("SELECT key, value FROM meta"))[
        "units_pruned_before_hour"] == str(START // 3_600_000 + 1 + 24)
    store.close()


def test_a_clock_set_back_never_makes_a_process_look_older(tmp_path: Path) -> None:
    """A process seen at 05:00, then (a new run, the wall clock set back) at 01:00: last_ms stays 05:00,
    and retention cut at 03:00 keeps the process its 05:00 rows refer to."""
    hour = 3_600_000
    path = str(tmp_path / "gua.db")
    store = Store.open(path, now_ms=START)
    store.begin_run(START, 10_000, "test", "host", "0")
    store.write_ticks([churn_tick(START + 5 * hour, (1,))])
    store.close()
    store = Store.open(path, now_ms=START)  # a new run: nothing cached
    store.begin_run(START + hour, 10_000, "test", "host", "0")
    store.write_ticks([churn_tick(START + hour, (1,)), churn_tick(START + 2 * hour + 10_000, (1,))])
    while store.prune(START + 3 * hour):
        pass
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT last_ms FROM process").fetchall() == [(START + 5 * hour,)]
    assert conn.execute("SELECT count(*) FROM proc_sample WHERE proc_id NOT IN (SELECT proc_id FROM process)"
                        ).fetchone()[0] == 0
