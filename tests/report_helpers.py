"""Helpers for the gua-report tests and benchmark: hand-made DBs and simulated ticks.

`HandDb` inserts rows with plain SQL into a schema made by the collector's
own `ensure_schema`, so every expected number in a test can be computed by
hand. `sim_ticks` turns the simulator's workloads into `Tick` records for
the collector's real `Store` (benchmark, rollup-vs-raw test).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from gua_collector import schema

HOUR = 3_600_000
DAY = 24 * HOUR
MIB = 1
# A fixed Monday 00:00 UTC, so weekday/hour expectations are easy: 2024-01-01.
T0 = 1_704_067_200_000


@dataclass(frozen=True)
class P:
    """One proc_sample row: process id, kind, mem_mib, sm_util, cpu_permille."""

    proc_id: int
    kind: int = schema.KIND_COMPUTE
    mem: int | None = 1000
    sm: int | None = 0
    cpu: int | None = None


@dataclass(frozen=True)
class G:
    """One gpu_sample row and its processes."""

    gpu_id: int
    util: int | None = 0  # permille
    status: int = 0
    cov: int | None = 1000
    energy: int | None = None
    procs: tuple[P, ...] = ()


class HandDb:
    """A gua DB filled by hand, row by row."""

    def __init__(self, path: str, created_ms: int = T0 - DAY) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        schema.ensure_schema(self.conn, created_ms)
        self.conn.execute("BEGIN")

    def gpu(self, index: int, uuid: str | None = None, name: str = "NVIDIA H100 80GB HBM3",
            parent: int | None = None, slot: int | None = None,
            memory_total: int | None = 85_899_345_920) -> int:
        uuid = uuid or f"GPU-0000-{index:04d}"
        return self.conn.execute(
            "INSERT INTO gpu (uuid, gpu_index, name, memory_total, parent_id, mig_slot) VALUES (?,?,?,?,?,?)",
            (uuid, index, name, memory_total, parent, slot),
        ).lastrowid

    def account(self, username: str, uid: int | None) -> int:
        return self.conn.execute(
            "INSERT INTO account (uid, username) VALUES (?, ?)", (uid, username)
        ).lastrowid

    def process(self, pid: int, account: int, comm: str = "python", unit: str = "",
                start_ms: int = 0) -> int:
        return self.conn.execute(
            "INSERT INTO process (pid, start_ms, account_id, comm, cgroup, unit) VALUES (?,?,?,?,?,?)",
            (pid, start_ms, account, comm, "", unit),
        ).lastrowid

    def run(self, started_ms: int, stopped_ms: int | None = None, interval_ms: int = 10_000,
            hostname: str = "gpu01") -> int:
        return self.conn.execute(
            "INSERT INTO run (started_ms, stopped_ms, interval_ms, backend, hostname, version) "
            "VALUES (?,?,?,?,?,?)",
            (started_ms, stopped_ms, interval_ms, "simulate:test", hostname, "0.1.0"),
        ).lastrowid

    def tick(self, run_id: int, ts_ms: int, duration_ms: int, *gpus: G) -> int:
        tick_id = self.conn.execute(
            "INSERT INTO tick (run_id, ts_ms, duration_ms) VALUES (?,?,?)", (run_id, ts_ms, duration_ms)
        ).lastrowid
        for g in gpus:
            util = g.util if g.status == 0 else None
            cov = g.cov if g.status == 0 and util is not None else None
            self.conn.execute(
                "INSERT INTO gpu_sample (tick_id, gpu_id, status, util_permille, coverage_permille, "
                "mem_used_mib, power_mw, energy_mj) VALUES (?,?,?,?,?,?,?,?)",
                (tick_id, g.gpu_id, g.status, util, cov, None, None, g.energy),
            )
            for p in g.procs:
                self.conn.execute(
                    "INSERT INTO proc_sample (tick_id, gpu_id, proc_id, kind, mem_mib, sm_util, cpu_permille) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (tick_id, g.gpu_id, p.proc_id, p.kind, p.mem, p.sm, p.cpu),
                )
        return tick_id

    def ticks(self, run_id: int, start_ms: int, count: int, interval_ms: int, *gpus: G,
              first_duration: int | None = None) -> int:
        """`count` equal ticks ending at start+interval, ...; returns the last ts."""
        ts = start_ms
        for n in range(count):
            ts = start_ms + (n + 1) * interval_ms
            d = first_duration if (n == 0 and first_duration is not None) else interval_ms
            self.tick(run_id, ts, d, *gpus)
        return ts

    def event(self, ts_ms: int, kind: str, run_id: int | None = None, end_ms: int | None = None,
              gpu_id: int | None = None, detail: str = "") -> None:
        self.conn.execute(
            "INSERT INTO event (ts_ms, run_id, kind, end_ms, gpu_id, detail) VALUES (?,?,?,?,?,?)",
            (ts_ms, run_id, kind, end_ms, gpu_id, detail),
        )

    def roll_up(self, end_hour: int) -> None:
        """Roll up every hour before end_hour with the collector's own rollup SQL (histograms too)."""
        from gua_collector import rollup as store

        row = self.conn.execute("SELECT min(ts_ms) / 3600000 FROM tick").fetchone()
        store.roll_up(self.conn, row[0], end_hour, store.thresholds(self.conn))
        self.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('rollup_next_hour', ?)", (str(end_hour),)
        )

    def close(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()


@dataclass(frozen=True)
class Hostile:
    """Strings that other users, the driver and the host choose, as a database stores them."""

    user: str
    unit: str
    host: str
    gap: str
    nvml: str
    init: str


def hostile_db(path: str, s: Hostile, gpu0: dict[str, str], gpu1: dict[str, str], evil_on: int,
               created_ms: int = T0 - DAY, nvml_at_ms: int = T0 + 1000) -> str:
    """Two GPUs, s.user's process beside alice's (carol: known, never on a GPU), all strings from s.

    GPU 0 idles with its holder at SM 0, GPU 1 works with its holder at SM 50;
    s.user's process (3000 MiB) is on GPU `evil_on`, alice's (2000 MiB) on the
    other. 300 s of ticks, a 15-minute hole the collector explains, 300 s
    more; an NVML error on GPU 1 and a failed init.
    """
    db = HandDb(path, created_ms=created_ms)
    gpus = (db.gpu(0, **gpu0), db.gpu(1, **gpu1))
    evil = db.account(s.user, 6666)
    alice = db.account("alice", 1001)
    db.account("carol", 1003)
    p_evil, p_alice = db.process(100, evil, unit=s.unit), db.process(101, alice)
    mem = {p_evil: 3000, p_alice: 2000}
    on = (p_evil, p_alice) if evil_on == 0 else (p_alice, p_evil)
    rows = (G(gpus[0], util=0, procs=(P(on[0], mem=mem[on[0]], sm=0),)),
            G(gpus[1], util=500, procs=(P(on[1], mem=mem[on[1]], sm=50),)))
    r = db.run(T0, hostname=s.host)
    db.ticks(r, T0, 30, 10_000, *rows, first_duration=0)
    db.event(T0 + 300_000, "gap", r, end_ms=T0 + 20 * 60_000, detail=s.gap)
    db.ticks(r, T0 + 20 * 60_000, 30, 10_000, *rows)
    db.event(nvml_at_ms, "nvml_error", r, gpu_id=gpus[1], detail=s.nvml)
    db.event(T0 + 2_000, "init_failed", r, detail=s.init)
    db.close()
    return path


def run_report(*args: str, env: dict[str, str] | None = None,
               user: Sequence[str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m gua_report ARGS` (optionally wrapped, e.g. in setpriv)."""
    cmd = [*(user or ()), sys.executable, "-m", "gua_report", *args]
    e = dict(os.environ)
    e.pop("NO_COLOR", None)
    e.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=50)


def report_json(db: str, *args: str) -> dict:
    r = run_report("--db", db, "--format", "json", "--tz", "UTC", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---------------------------------------------------------------- simulated ticks

def rolled_and_raw(path: str, *args: str) -> tuple[dict, dict]:
    """The JSON report from rollups and from raw rows (--no-rollups), parsed."""
    out = []
    for extra in ((), ("--no-rollups",)):
        r = run_report("--db", path, "--format", "json", *args, *extra)
        assert r.returncode == 0, r.stderr
        out.append(json.loads(r.stdout))
    return out[0], out[1]


def sim_ticks(start_ms: int, end_ms: int, interval_ms: int, scenario: str = "lab8",
              jitter: bool = True, cpu: bool = False) -> Iterator:
    """Tick records from the simulator's workloads, for the collector's Store.

    Each card's workload gives device util and processes at simulated time t;
    the tick's duration is the interval (plus a deterministic few ms of
    jitter, as a real loop measures), the first tick covers no time. A MIG
    card reports as NVML does: util unknown on the parent and its instances,
    processes only on the instances, their SM unknown. With `cpu`, each
    process's CPU is the workload's, unknown in the first tick that sees it
    (the collector has no earlier /proc reading to compare with).
    """
    from gua_collector import records, simulate
    from gua_collector.procinfo import unit_from_cgroup

    # (GPU, its workload, whether util and per-process SM are known), parents first
    devices: list[tuple[records.GpuInfo, simulate.SimGpu, bool]] = []
    for n, c in enumerate(simulate.SCENARIOS[scenario]()):
        devices.append((records.GpuInfo(c.uuid, n, c.name, c.memory_mib * 1_048_576), c, not c.mig))
        devices += [(records.GpuInfo(m.uuid, n, m.name, m.memory_mib * 1_048_576, c.uuid, slot), m, False)
                    for slot, m in enumerate(c.mig)]
    pinfo: dict[tuple[int, int], records.ProcessInfo] = {}
    energy_mw = 70_000
    n = 0
    prev_ts: int | None = None
    while start_ms + n * interval_ms < end_ms:
        ts = start_ms + n * interval_ms + ((n * 7919) % 13 if jitter else 0)
        d = 0 if prev_ts is None else ts - prev_ts
        first = prev_ts is None
        gpus = []
        for info, card, known in devices:
            util, procs = card.workload(ts)
            ps = []
            for sp in procs if not card.mig else ():
                key = (sp.pid, sp.start_ms)
                pi = pinfo.get(key)
                seen = pi is not None
                if pi is None:
                    pi = pinfo[key] = records.ProcessInfo(
                        sp.pid, sp.start_ms, simulate.USERS.get(sp.user), sp.user, sp.comm, sp.cgroup,
                        unit_from_cgroup(sp.cgroup))
                ps.append(records.ProcSample(pi, sp.kind, sp.mem_mib,
                                             sp.sm if known and sp.kind & schema.KIND_COMPUTE else None,
                                             sp.cpu * 10 if cpu and seen else None))
            if known:
                power = energy_mw + util * 5_000
                gpus.append(records.GpuSample(
                    info, 0, util * 10, 1000 if not first else 0, sum(p.mem_mib or 0 for p in ps),
                    power, power * d // 1000, tuple(ps)))
            else:
                gpus.append(records.GpuSample(info, 0, None, None, sum(p.mem_mib or 0 for p in ps),
                                              procs=tuple(ps)))
        yield records.Tick(ts, d, tuple(gpus))
        prev_ts = ts
        n += 1


# ---------------------------------------------------------------- through the collector's Store

def store_run(store, ticks, started_ms: int | None = None, interval_ms: int = 10_000,
              scenario: str = "lab", stop_ms: int | None = None, batch: int = 500) -> None:
    """One collector run written through the collector's own Store (which also rolls up).

    `ticks` are records.Tick; the run starts at `started_ms` (default: the
    first tick) and ends cleanly at `stop_ms` when given, else uncleanly.
    """
    ticks = list(ticks)
    store.begin_run(ticks[0].ts_ms if started_ms is None else started_ms, interval_ms,
                    f"simulate:{scenario}", "gpu01", "test")
    for n in range(0, len(ticks), batch):
        store.write_ticks(ticks[n:n + batch])
    if stop_ms is not None:
        store.end_run(stop_ms)


def shifted(ticks, by_ms: int, first_duration: int | None = None) -> list:
    """The same ticks `by_ms` later (earlier when negative): a wall clock set wrong.

    `first_duration` replaces the first tick's duration: a step of the wall
    clock inside a run keeps the monotonic duration of the tick after it.
    """
    from dataclasses import replace

    out = [replace(t, ts_ms=t.ts_ms + by_ms) for t in ticks]
    if out and first_duration is not None:
        out[0] = replace(out[0], duration_ms=first_duration)
    return out


def build_store_db(path: str, scenario: str, start_ms: int, end_ms: int, interval_ms: int,
                   hole_at_ms: int | None = None, hole_ms: int = 2_400_000, cpu: bool = True) -> str:
    """A database the collector's own Store writes (rollups and histograms as in production).

    With `hole_at_ms`: the run stops there uncleanly and a second run starts
    `hole_ms` later, as after a crash. Processes' CPU as sim_ticks(cpu=True).
    """
    from gua_collector.store import Store

    runs = [(start_ms, end_ms)] if hole_at_ms is None else [(start_ms, hole_at_ms), (hole_at_ms + hole_ms, end_ms)]
    for n, (lo, hi) in enumerate(runs):
        store = Store.open(path, now_ms=lo)
        try:
            store_run(store, sim_ticks(lo, hi, interval_ms, scenario, cpu=cpu), started_ms=lo,
                      interval_ms=interval_ms, scenario=scenario, stop_ms=hi if n == len(runs) - 1 else None)
        finally:
            store.close()
    return path


def prune_raw(path: str, before_ms: int, now_ms: int) -> None:
    """Run the collector's retention on `path` until no raw row older than before_ms is left."""
    from gua_collector.store import Store

    store = Store.open(path, now_ms=now_ms)
    try:
        while store.prune(before_ms):
            pass
    finally:
        store.close()


def compact_all(path: str, now_ms: int, head_hours: int | None = None) -> int:
    """Run the collector's compaction on `path` until no hour is left to compact; the hours compacted."""
    from gua_collector import compact
    from gua_collector.store import Store

    store = Store.open(path, now_ms=now_ms)
    hours = 0
    try:
        while (step := store.compact(compact.HEAD_HOURS if head_hours is None else head_hours)) is not None:
            hours += not step.kept
    finally:
        store.close()
    return hours


def expand_chunks(path: str) -> None:
    """Put every compacted hour's rows back into gpu_sample and proc_sample (a test's plain twin)."""
    from gua_collector import rawchunk

    conn = sqlite3.connect(path)
    with conn:
        for (data,) in conn.execute("SELECT data FROM raw_chunk").fetchall():
            for t in rawchunk.decode(data):
                conn.executemany(f"INSERT INTO {t.name} ({', '.join(t.columns)}) "
                                 f"VALUES ({', '.join('?' * len(t.columns))})", t.rows)
        conn.execute("DELETE FROM raw_chunk")
        conn.execute("DELETE FROM meta WHERE key = 'compact_next_tick'")
    conn.close()


def make_v1(src: str, dst: str) -> None:
    """Write `src`'s rows into a new file with the schema 1 DDL, as gua 0.1.0 left it."""
    conn = sqlite3.connect(dst, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    for statement in schema._statements(schema.MIGRATIONS[0]):
        conn.execute(statement)
    conn.execute("ATTACH DATABASE ? AS src", (src,))
    tables = [r[0] for r in conn.execute("SELECT name FROM main.sqlite_master WHERE type = 'table'")]
    for table in tables:
        names = [r[1] for r in conn.execute(f"PRAGMA main.table_info({table})")]
        cols = ", ".join(names)
        # Schema 3 stores full coverage as NULL; schema 1 stored 1000.
        values = ", ".join(schema.COVERAGE_SQL.format(g="") if n == "coverage_permille" else n for n in names)
        conn.execute(f"INSERT INTO main.{table} ({cols}) SELECT {values} FROM src.{table}")
    conn.execute("DELETE FROM main.meta WHERE key IN ('sm_unknown_since_hour', 'proc_state_since_ms', "
                 "'hist_since_hour', 'hist_pct_cap', 'hist_mib_cap')")
    conn.execute("PRAGMA user_version = 1")
    conn.execute("COMMIT")
    conn.execute("DETACH DATABASE src")
    conn.close()
