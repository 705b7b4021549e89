"""Schema 1 -> 2: a gua 0.1.0 database is upgraded in place, atomically, and read either way.

The schema 1 database is what gua 0.1.0 wrote: the released DDL
(`schema.MIGRATIONS[0]`, frozen) holding the rows a schema 2 collector
wrote for the same simulated hours, less what schema 2 added (the
`sm_unknown_ms` columns, meta `sm_unknown_since_hour`, the `proc_gpu_state`
table and meta `proc_state_since_ms`). Raw rows and the
other rollup columns are classified the same by both versions, so the
upgraded file must equal the file schema 2 wrote natively, row for row.

The scenario is `mig`: alice trains and bob idles on MIG instances, where
NVML reports no per-process SM, so their held time is SM unknown.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

from gua_collector import rollup, schema
from gua_collector.store import Store
from report_helpers import HOUR, make_v1, report_json, run_report, sim_ticks

pytestmark = pytest.mark.timeout(120)

START = 1_711_951_200_000  # 2024-04-01 06:00 UTC, a Monday
END = START + 8 * HOUR  # hours 06..12 get rolled up; 13 stays raw
INTERVAL = 30_000
FIRST_HOUR = START // HOUR
WINDOW = ("--since", "2024-04-01T06:00Z", "--until", "2024-04-01T14:00Z", "--tz", "UTC")


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> str:
    """The database a schema 2 collector writes for the scenario."""
    path = str(tmp_path_factory.mktemp("native") / "gua.db")
    store = Store.open(path, now_ms=START)
    store.begin_run(START, INTERVAL, "simulate:mig", "gpu01", "0.1.0")
    ticks = list(sim_ticks(START, END, INTERVAL, "mig"))
    for n in range(0, len(ticks), 200):
        store.write_ticks(ticks[n:n + 200])
    store.end_run(END)
    store.close()
    return path


@pytest.fixture()
def v1(native, tmp_path) -> str:
    path = str(tmp_path / "gua.db")
    make_v1(native, path)
    return path


# Where sm_unknown_ms sits in an hour_account / hour_unit row: before schema 2's CPU columns.
SM_UNKNOWN = -5  # hour_account / hour_unit: ..., sm_unknown_ms, 2 CPU columns, 2 GPM columns (schema 3)


def _without_sm(row: tuple) -> tuple:
    return row[:SM_UNKNOWN] + row[SM_UNKNOWN + 1:]


def columns(path: str, table: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def dump(path: str) -> dict[str, list[tuple]]:
    """Every row of every table, in a stable order."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    out = {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
    conn.close()
    return out


def as_read(tables: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    """`dump` as a reader sees it: schema 3 stores full coverage as NULL and no power beside
    energy, which read the same as schema 1's values; process.last_ms (schema 3) set aside."""
    out = dict(tables)
    out["gpu_sample"] = sorted(
        (r[:4] + (1000 if r[4] is None and r[3] is not None else r[4],) + r[5:6]
         + (None if r[7] is not None else r[6],) + r[7:])
        for r in tables["gpu_sample"])
    out["process"] = sorted((r[:7] for r in tables["process"]), key=repr)
    # schema 3: GPM counts in the rollups from here; an upgrade starts it at its next hour (no GPM before);
    # schema 4: so do the histograms' steps above the caps
    out["meta"] = [r for r in tables["meta"] if r[0] not in ("gpm_since_hour", "hist_steps_since_hour")]
    return out


def sm_unknown_by_hand(path: str) -> dict[tuple[int, int, int], int]:
    """(hour, gpu_id, account_id) -> ms held with some sm_util NULL, per SCHEMA.md, in Python."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    per: dict[tuple[int, int, int], list[tuple[int | None, int | None]]] = defaultdict(list)
    dur: dict[int, tuple[int, int]] = {}
    for tick_id, ts, d, gpu_id, account_id, kind, mem, sm in conn.execute(
        "SELECT t.tick_id, t.ts_ms, t.duration_ms, ps.gpu_id, p.account_id, ps.kind, ps.mem_mib, ps.sm_util "
        "FROM tick t JOIN proc_sample ps USING (tick_id) JOIN process p USING (proc_id)"
    ):
        if kind & schema.KIND_COMPUTE:
            per[(tick_id, gpu_id, account_id)].append((mem, sm))
            dur[tick_id] = (ts // HOUR, d)
    conn.close()
    out: dict[tuple[int, int, int], int] = defaultdict(int)
    for (tick_id, gpu_id, account_id), rows in per.items():
        held = any(m is None for m, _ in rows) or sum(m or 0 for m, _ in rows) * 1_048_576 > schema.ROLLUP_HELD_BYTES
        if held and any(s is None for _, s in rows):
            hour, d = dur[tick_id]
            out[(hour, gpu_id, account_id)] += d
    return out


def test_fresh_database_is_current(tmp_path: Path) -> None:
    path = str(tmp_path / "gua.db")
    Store.open(path, now_ms=START).close()
    with sqlite3.connect(path) as conn:
        assert schema.read_version(conn) == schema.SCHEMA_VERSION == 5
        meta = dict(conn.execute("SELECT key, value FROM meta"))
    assert meta["sm_unknown_since_hour"] == "0"  # recorded from the start
    assert meta["hist_since_hour"] == "0"  # histograms too
    assert columns(path, "hour_gpu_hist") == [
        "hour", "gpu_id", "util_pct", "mem_mib", "ticks", "ms", "coverage_pm_ms", "energy_mj",
        "gpm_known_ms", "sm_active_pm_ms", "tensor_known_ms", "tensor_active_pm_ms", "gpm_low_ms"]  # schema 3: GPM
    assert columns(path, "quarter_gpu") == ["quarter", "gpu_id", "util_pct", "ms"]
    for table in ("hour_account_hist", "hour_unit_hist"):
        assert columns(path, table)[-6:] == ["sm_pct", "mem_mib", "ms", "mem_mib_ms", "cpu_busy_ms",
                                             "cpu_unknown_ms"]
    for table in ("hour_account", "hour_unit"):
        assert columns(path, table)[-5:] == ["sm_unknown_ms", "idle_cpu_busy_ms", "idle_cpu_unknown_ms",
                                             "gpm_busy_ms", "starved_ms"]
    assert columns(path, "tick")[-1] == "cpu_permille"
    assert columns(path, "proc_sample")[-2:] == ["cpu_permille", "rss_mib"]
    assert columns(path, "process")[-1] == "last_ms"  # schema 3
    assert meta["rollup_cpu_busy_permille"] == str(schema.ROLLUP_CPU_BUSY_PERMILLE)
    # what `gua-report now` reads, complete from the start
    assert meta["proc_state_since_ms"] == "0"
    assert columns(path, "proc_gpu_state") == [
        "gpu_id", "proc_id", "first_ms", "known_from_ms", "last_active_ms", "last_seen_ms"]


def test_native_rollups_carry_sm_unknown(native: str) -> None:
    conn = sqlite3.connect(native)
    rolled = {(h, g, a): ms for h, g, a, ms in conn.execute(
        "SELECT hour, gpu_id, account_id, sm_unknown_ms FROM hour_account")}
    conn.close()
    expected = {k: v for k, v in sm_unknown_by_hand(native).items() if k[0] < FIRST_HOUR + 7}
    assert {k: v for k, v in rolled.items() if v} == expected
    assert len(expected) >= 7  # bob on his MIG instance every hour, alice from 08:00


def test_v1_upgrades_in_place(native: str, v1: str) -> None:
    before = dump(v1)
    assert "sm_unknown_ms" not in columns(v1, "hour_account")
    store = Store.open(v1, now_ms=END + HOUR)  # what gua-collector does when it starts
    store.close()
    with sqlite3.connect(v1) as conn:
        assert schema.read_version(conn) == schema.SCHEMA_VERSION
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        newest = conn.execute("SELECT max(ts_ms) FROM tick").fetchone()[0]
    after = dump(v1)
    # raw rows and every other table intact; the rollups equal the natively written ones
    for table, rows in before.items():
        if table not in ("hour_account", "hour_unit", "meta"):
            width = len(rows[0]) if rows else 0
            assert [r[:width] for r in after[table]] == rows, table
            if table == "process":
                # Schema 3: seen last at the newest tick at the latest, so retention keeps them a full period.
                assert {r[width:] for r in after[table]} == {(newest,)}
            else:
                # Schema 2 adds nullable CPU columns to tick and proc_sample: NULL (unknown) on old rows.
                # Schema 3 adds GPM columns to hour_gpu: 0 on old rows, "not recorded" (gpm_since_hour).
                old = 0 if table == "hour_gpu" else None
                assert all(v is old for r in after[table] for v in r[width:]), table
    assert as_read(after) == as_read(dump(native))
    # proc_gpu_state rebuilt from raw rows equals the one kept tick by tick
    assert "proc_gpu_state" not in before and len(after["proc_gpu_state"]) == 3  # alice, bob, carol
    # the histograms of every rolled-up hour, as the collector writes them hour by hour
    for table in ("hour_gpu_hist", "quarter_gpu", "hour_account_hist", "hour_unit_hist"):
        assert table not in before and after[table], table
    assert dict(after["meta"])["hist_since_hour"] == "0"
    assert dict(after["meta"])["gpm_since_hour"] == dict(after["meta"])["rollup_next_hour"]
    assert dict(after["meta"])["hist_steps_since_hour"] == dict(after["meta"])["rollup_next_hour"]
    assert dict(after["meta"])["proc_state_since_ms"] == "0"  # all raw rows within a day: complete
    assert sum(r[SM_UNKNOWN] for r in after["hour_unit"]) == 0  # units: carol's job, SM known
    assert sum(r[SM_UNKNOWN] for r in after["hour_account"]) > 0


def test_upgrade_after_retention_records_where_it_starts(native: str, v1: str) -> None:
    cutoff = START + 2 * HOUR + 17 * 60_000  # 08:17: hour 08 keeps only part of its ticks
    conn = sqlite3.connect(v1, isolation_level=None)
    conn.execute("BEGIN")
    for table in ("proc_sample", "gpu_sample"):
        conn.execute(f"DELETE FROM {table} WHERE tick_id IN (SELECT tick_id FROM tick WHERE ts_ms < ?)", (cutoff,))
    conn.execute("DELETE FROM tick WHERE ts_ms < ?", (cutoff,))
    conn.execute("INSERT INTO meta VALUES ('raw_pruned_before_ms', ?)", (str(cutoff),))
    conn.execute("COMMIT")
    conn.close()
    Store.open(v1, now_ms=END + HOUR).close()

    since_hour = FIRST_HOUR + 3  # the first hour with all its raw rows
    with sqlite3.connect(v1) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        first_kept = conn.execute("SELECT min(ts_ms) FROM tick").fetchone()[0]
    assert meta["sm_unknown_since_hour"] == str(since_hour)
    assert meta["hist_since_hour"] == str(since_hour)  # histograms from the same hour: nothing guessed
    # retention removed observations: process state starts at the first tick left, and says so
    assert meta["proc_state_since_ms"] == str(first_kept)
    got, want = as_read(dump(v1)), as_read(dump(native))
    for table in ("hour_account", "hour_unit"):
        old = [r for r in got[table] if r[0] < since_hour]
        assert old and all(r[SM_UNKNOWN] == 0 for r in old), "pruned hours cannot know: 0, not a guess"
        assert [_without_sm(r) for r in old] == [_without_sm(r) for r in want[table] if r[0] < since_hour]
        assert [r for r in got[table] if r[0] >= since_hour] == [r for r in want[table] if r[0] >= since_hour]

    rep = report_json(v1, *WINDOW)
    dq = rep["data_quality"]
    assert dq["sm_recorded_since_ms"] == since_hour * HOUR
    assert dq["sm_unrecorded_ms"] == sum(u["sm_unrecorded_ms"] for u in rep["identities"]["users"]) > 0
    text = run_report("--db", v1, *WINDOW).stdout
    assert "SM-unknown time not recorded before 2024-04-01 09:00" in text
    for table in ("hour_gpu_hist", "hour_account_hist", "hour_unit_hist"):
        assert {r[0] for r in got[table]} == {h for h in range(since_hour, FIRST_HOUR + 7)}, table
        assert got[table] == [r for r in want[table] if r[0] >= since_hour], table
    assert got["quarter_gpu"] == [r for r in want["quarter_gpu"] if r[0] >= since_hour * 4]
    # from the first whole hour on, rollups and raw rows agree again, at any thresholds and in any zone
    window = ("--since", "2024-04-01T09:00Z", "--until", "2024-04-01T14:00Z")
    for extra in ((), ("--held-threshold", "1000MiB", "--active-threshold", "30", "--tz", "Asia/Kathmandu")):
        a, b = report_json(v1, *window, *extra), report_json(v1, *window, *extra, "--no-rollups")
        assert a["data_quality"]["sm_recorded_since_ms"] is None and a["data_quality"]["sm_unknown_ms"] > 0
        assert a["source"]["rollups"] == ("histograms" if extra else "hourly")
        del a["source"], b["source"]
        assert a == b
    # an earlier window reads the histograms from their first hour, raw rows before (what is left)
    early = report_json(v1, *WINDOW, "--active-threshold", "30")
    assert early["source"]["rollups"] == "histograms"
    assert early["source"]["raw_ranges_ms"][0] == [START, since_hour * HOUR]
    assert "could not use rollups for them (no histograms before the upgrade to schema 2)" in \
        early["data_quality"]["warnings"][0]


def test_reporter_reads_v1_and_upgraded_alike(native: str, v1: str) -> None:
    rolled, raw = report_json(v1, *WINDOW), report_json(v1, *WINDOW, "--no-rollups")
    assert rolled["database"]["schema_version"] == 1
    assert rolled["source"]["rollup_hours"] == 7
    # schema 1 rollups do not record SM-unknown time; raw rows are read alike
    assert rolled["data_quality"]["sm_recorded_since_ms"] == (FIRST_HOUR + 7) * HOUR
    del rolled["source"], raw["source"]
    assert rolled == raw
    nat = report_json(native, *WINDOW)
    users_v1 = {u["user"]: u for u in rolled["identities"]["users"]}
    for u in nat["identities"]["users"]:
        old = users_v1[u["user"]]
        assert (old["held_ms"], old["idle_held_ms"], old["mem_mib_ms"]) == (
            u["held_ms"], u["idle_held_ms"], u["mem_mib_ms"])
        assert old["sm_unknown_ms"] <= u["sm_unknown_ms"]  # only hour 13, from raw rows
        assert old["sm_unrecorded_ms"] + old["sm_unknown_ms"] >= u["sm_unknown_ms"]
    text = run_report("--db", v1, *WINDOW).stdout
    assert "SM-unknown time not recorded before 2024-04-01 13:00" in text
    # bob idles on his MIG instance: unknown in hour 13, not recorded before, never "0.00"
    bob = next(line for line in text.splitlines() if line.startswith("  bob "))
    assert bob.split()[2:4] == ["?", "?"], bob

    Store.open(v1, now_ms=END + HOUR).close()
    upgraded = report_json(v1, *WINDOW)
    # GPM is recorded from the upgrade on (schema 1 had none: the same numbers), and the report says so
    assert upgraded["data_quality"]["gpm_recorded_since_ms"] is not None
    assert nat["data_quality"]["gpm_recorded_since_ms"] is None
    for d in (upgraded, nat):
        del d["source"], d["data_quality"]["gpm_recorded_since_ms"]
        d["database"]["path"] = ""
    assert upgraded == nat


def test_upgrade_rebuilds_process_state_from_one_day(tmp_path: Path) -> None:
    """A long history: the upgrade reads only the last day of raw rows, and records where it started."""
    start, interval = START - 30 * HOUR, 60_000
    native = str(tmp_path / "native.db")
    store = Store.open(native, now_ms=start)
    store.begin_run(start, interval, "simulate:lab", "gpu01", "0.1.0")
    ticks = list(sim_ticks(start, END, interval, "lab"))
    for n in range(0, len(ticks), 500):
        store.write_ticks(ticks[n:n + 500])
    store.close()
    old = str(tmp_path / "v1.db")
    make_v1(native, old)
    Store.open(old, now_ms=END).close()

    newest = ticks[-1].ts_ms
    horizon = min(t.ts_ms for t in ticks if t.ts_ms >= newest - schema.PROC_STATE_BACKFILL_MS)
    got, want = as_read(dump(old)), as_read(dump(native))
    assert dict(got["meta"])["proc_state_since_ms"] == str(horizon)
    assert dict(want["meta"])["proc_state_since_ms"] == "0"
    got_rows = {(r[0], r[1]): r[2:] for r in got["proc_gpu_state"]}
    want_rows = {(r[0], r[1]): r[2:] for r in want["proc_gpu_state"]}
    seen_lately = {k for k, r in want_rows.items() if r[3] >= horizon}
    assert set(got_rows) == seen_lately and len(got_rows) >= 4
    clipped = 0
    for key, (first, known_from, last_active, last_seen) in got_rows.items():
        w_first, w_known, w_active, w_seen = want_rows[key]
        assert last_seen == w_seen
        assert first == max(w_first, horizon)
        # what happened before the horizon is unknown: known_from starts there at the earliest
        assert known_from == max(w_known, horizon) if w_known <= horizon else known_from == w_known
        assert last_active == (w_active if w_active is not None and w_active >= horizon else None)
        clipped += w_first < horizon == first
    assert clipped >= 2  # bob's notebooks were there all along


def test_collector_upgrades_on_start(v1: str) -> None:
    cmd = [sys.executable, "-m", "gua_collector", "--db", v1, "--backend", "simulate:mig",
           "--ticks", "3", "--interval", "10s", "--start", "2024-04-01T15:00"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(v1) as conn:
        assert schema.read_version(conn) == schema.SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM run").fetchone()[0] == 2
    assert report_json(v1, *WINDOW)["database"]["schema_version"] == schema.SCHEMA_VERSION


def test_failure_mid_upgrade_leaves_v1(v1: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = dump(v1)
    real = rollup.backfill_sm_unknown

    def broken(conn: sqlite3.Connection) -> None:
        real(conn)  # columns added and filled, then:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(rollup, "backfill_sm_unknown", broken)
    conn = sqlite3.connect(v1, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        schema.ensure_schema(conn, END)
    assert schema.read_version(conn) == 1
    conn.close()
    assert dump(v1) == before
    assert report_json(v1, *WINDOW)["database"]["schema_version"] == 1


# Upgrades the database in $1 with the collector's Store, but SIGKILLs itself
# once the migration has done all its work and before it commits; a 1-page
# cache makes SQLite spill the uncommitted pages into the WAL first.
_KILLED_UPGRADE = textwrap.dedent("""
    import os, signal, sys
    from gua_collector import rollup
    from gua_collector.store import Store

    real = rollup.backfill_sm_unknown

    def then_die(conn):
        real(conn)
        conn.execute("PRAGMA cache_size = 1")
        conn.execute("SELECT count(*), sum(mem_mib) FROM proc_sample").fetchone()
        print(os.path.getsize(sys.argv[1] + "-wal"), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    rollup.backfill_sm_unknown = then_die
    Store.open(sys.argv[1], now_ms=0)
""")


def test_kill_9_mid_upgrade_leaves_v1(native: str, v1: str) -> None:
    before = dump(v1)
    r = subprocess.run([sys.executable, "-c", _KILLED_UPGRADE, v1], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert int(r.stdout) > 0, "the uncommitted migration reached the WAL"
    assert os.path.exists(v1 + "-wal")
    # a reader sees schema 1, whole
    rep = report_json(v1, *WINDOW)
    assert rep["database"]["schema_version"] == 1
    with sqlite3.connect(v1) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert schema.read_version(conn) == 1
    assert "sm_unknown_ms" not in columns(v1, "hour_account")
    assert dump(v1) == before
    # and the next start upgrades it
    Store.open(v1, now_ms=END + HOUR).close()
    assert as_read(dump(v1)) == as_read(dump(native))


class _Sent:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, message: str) -> None:
        self.sent.append(message)


def test_upgrade_asks_systemd_for_time_first(v1: str, tmp_path: Path) -> None:
    """An upgrade can outlast the 90 s start timeout (and a watchdog already armed): ask for time, say why."""
    import io

    from gua_collector import main
    from gua_collector.clock import SimClock
    from gua_collector.service import Log

    notifier, out = _Sent(), io.StringIO()
    main._open_store(v1, SimClock(END + HOUR), notifier, Log(out, journal=False)).close()
    assert notifier.sent == [f"EXTEND_TIMEOUT_USEC={main.UPGRADE_TIMEOUT_S * 1_000_000}",
                             f"STATUS=upgrading the database from schema 1 to {schema.SCHEMA_VERSION}"]
    assert f"from schema 1 to {schema.SCHEMA_VERSION}" in out.getvalue()
    # opened again, or created new: nothing to upgrade, nothing asked
    again = _Sent()
    main._open_store(v1, SimClock(END + HOUR), again, Log(io.StringIO(), journal=False)).close()
    main._open_store(str(tmp_path / "new.db"), SimClock(END + HOUR), again, Log(io.StringIO(), journal=False)).close()
    assert again.sent == []
