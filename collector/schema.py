"""The gua database schema: DDL, version and migrations, in one place.

The reporter (gua_report) reads exactly these tables; SCHEMA.md beside this
file is the human contract and tests/test_contract.py holds both sides to it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

# PRAGMA user_version. Bump it and add a step to MIGRATIONS for every change.
SCHEMA_VERSION = 5

# Written into meta so the reporter can tell a gua DB from any other SQLite file.
APPLICATION = "gua"

# Rollups are classified with these defaults; the reporter uses rollups only
# when its own thresholds equal them (recorded in meta at creation).
ROLLUP_ACTIVE_PERMILLE = 100  # 10 % SM utilization
ROLLUP_HELD_BYTES = 100_000_000  # 100 MB held by compute processes

# gpu_sample.status values.
STATUS_OK = 0
STATUS_ERROR = 1  # an NVML call failed for this GPU in this tick
STATUS_LOST = 2  # NVML_ERROR_GPU_IS_LOST (e.g. Xid 79)

# proc_sample.kind bit flags: which NVML list(s) the pid came from.
KIND_COMPUTE = 1
KIND_GRAPHICS = 2
# Set (with KIND_COMPUTE) on a row for a process that ran SM work during the
# tick but had left the GPU by its end: mem_mib is 0, sm_util its share of the
# tick. Its owner's verdict needs that work; it holds nothing.
KIND_EXITED = 4

# Schema 1 (gua 0.1.0), as released: never edit it, add a migration instead.
_V1 = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- One row per collector process lifetime; a restart starts a new run.
CREATE TABLE run (
    run_id      INTEGER PRIMARY KEY,
    started_ms  INTEGER NOT NULL,          -- wall clock, UTC epoch ms
    stopped_ms  INTEGER,                   -- NULL: still running or killed
    interval_ms INTEGER NOT NULL,
    backend     TEXT NOT NULL,             -- 'nvml' or 'simulate:SCENARIO'
    hostname    TEXT NOT NULL,
    version     TEXT NOT NULL
);

-- Physical GPUs and MIG instances, keyed by UUID (NVML index order is not
-- stable across reboots). A MIG instance has parent_id set.
CREATE TABLE gpu (
    gpu_id       INTEGER PRIMARY KEY,
    uuid         TEXT NOT NULL UNIQUE,
    gpu_index    INTEGER NOT NULL,         -- last NVML index seen
    name         TEXT NOT NULL,
    memory_total INTEGER,                  -- bytes; NULL when unknown
    parent_id    INTEGER REFERENCES gpu(gpu_id),
    mig_slot     INTEGER                   -- MIG device index within parent
);

-- Who: a uid and the name it resolved to when first seen.
CREATE TABLE account (
    account_id INTEGER PRIMARY KEY,
    uid        INTEGER,                    -- NULL when /proc could not tell
    username   TEXT NOT NULL,              -- 'uid:N' when not in passwd
    UNIQUE (uid, username)
);

-- A process is a (pid, start time) pair, so a reused pid is a new row.
CREATE TABLE process (
    proc_id    INTEGER PRIMARY KEY,
    pid        INTEGER NOT NULL,
    start_ms   INTEGER NOT NULL,           -- process start, UTC epoch ms; 0 unknown
    account_id INTEGER NOT NULL REFERENCES account(account_id),
    comm       TEXT NOT NULL,
    cgroup     TEXT NOT NULL,              -- unified-hierarchy path, '' unknown
    unit       TEXT NOT NULL,              -- attribution from cgroup, '' none
    UNIQUE (pid, start_ms)
);

-- One row per tick of the collector loop.
CREATE TABLE tick (
    tick_id     INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL REFERENCES run(run_id),
    ts_ms       INTEGER NOT NULL,          -- end of the tick's interval, UTC epoch ms
    duration_ms INTEGER NOT NULL           -- measured interval length; 0 = first tick of a run
);
-- Every report starts with a time range on ticks.
CREATE INDEX tick_ts ON tick (ts_ms);

-- One row per GPU (or MIG instance) per tick.
CREATE TABLE gpu_sample (
    tick_id       INTEGER NOT NULL,
    gpu_id        INTEGER NOT NULL,
    status        INTEGER NOT NULL,        -- 0 ok, 1 NVML error, 2 GPU lost
    util_permille INTEGER,                 -- mean SM util over the interval, 0..1000; NULL unknown
    coverage_permille INTEGER,             -- share of the interval the util samples covered
    mem_used_mib  INTEGER,                 -- device memory used; NULL unknown
    power_mw      INTEGER,                 -- instantaneous board power; NULL unknown
    energy_mj     INTEGER,                 -- energy over the interval; NULL unsupported
    PRIMARY KEY (tick_id, gpu_id)
) WITHOUT ROWID;

-- One row per process per GPU per tick (a pid is counted once per GPU).
CREATE TABLE proc_sample (
    tick_id  INTEGER NOT NULL,
    gpu_id   INTEGER NOT NULL,
    proc_id  INTEGER NOT NULL,
    kind     INTEGER NOT NULL,             -- 1 compute, 2 graphics, 3 both
    mem_mib  INTEGER,                      -- NULL: NVML could not report it
    sm_util  INTEGER,                      -- percent over the interval; NULL unknown (MIG)
    PRIMARY KEY (tick_id, gpu_id, proc_id)
) WITHOUT ROWID;

-- Things that happened: start, stop, nvml_error, gpu_lost, init_failed,
-- db_error, gap. gpu_id is set when the event concerns one GPU; a gap
-- spans ts_ms..end_ms.
CREATE TABLE event (
    event_id INTEGER PRIMARY KEY,
    ts_ms    INTEGER NOT NULL,
    run_id   INTEGER,
    kind     TEXT NOT NULL,
    end_ms   INTEGER,                      -- set for spans (gaps)
    gpu_id   INTEGER,
    detail   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX event_ts ON event (ts_ms);

-- Hourly rollups, written by the collector once an hour is complete, with
-- the ROLLUP_* thresholds recorded in meta. An hour is keyed by the UTC hour
-- (ts_ms // 3600000) of each tick's ts_ms. *_ms columns sum tick durations.
CREATE TABLE hour_gpu (
    hour        INTEGER NOT NULL,
    gpu_id      INTEGER NOT NULL,
    ticks       INTEGER NOT NULL,
    total_ms    INTEGER NOT NULL,          -- all ticks, any status
    active_ms   INTEGER NOT NULL,
    held_ms     INTEGER NOT NULL,          -- idle-held
    idle_ms     INTEGER NOT NULL,          -- truly idle
    unknown_ms  INTEGER NOT NULL,          -- error, lost, or util unknown
    coverage_pm_ms INTEGER NOT NULL,       -- sum(duration_ms * coverage_permille), NULLs as 0
    energy_active_mj INTEGER,
    energy_held_mj   INTEGER,
    energy_idle_mj   INTEGER,
    PRIMARY KEY (hour, gpu_id)
) WITHOUT ROWID;

CREATE TABLE hour_account (
    hour        INTEGER NOT NULL,
    gpu_id      INTEGER NOT NULL,
    account_id  INTEGER NOT NULL,
    held_ms     INTEGER NOT NULL,          -- ticks the account held the GPU
    idle_held_ms INTEGER NOT NULL,         -- ... with its own SM below threshold
    mem_mib_ms  INTEGER NOT NULL,          -- sum(mem_mib * duration)
    unknown_mem_ms INTEGER NOT NULL,       -- ticks held with memory NULL
    PRIMARY KEY (hour, gpu_id, account_id)
) WITHOUT ROWID;

CREATE TABLE hour_unit (
    hour        INTEGER NOT NULL,
    gpu_id      INTEGER NOT NULL,
    account_id  INTEGER NOT NULL,
    unit        TEXT NOT NULL,
    held_ms     INTEGER NOT NULL,
    idle_held_ms INTEGER NOT NULL,
    mem_mib_ms  INTEGER NOT NULL,
    unknown_mem_ms INTEGER NOT NULL,
    PRIMARY KEY (hour, gpu_id, account_id, unit)
) WITHOUT ROWID;
"""

# Schema 2: time an account (or unit) held a GPU while the SM use of one of its
# processes was unknown (MIG, NVML NOT_SUPPORTED). Schema 1 counted that time
# as held and not idle, so an idle holder on such a GPU looked busy.
#
# Also schema 2: proc_gpu_state, what `gua-report now` needs to say how long
# each process has been idle without scanning history. The collector keeps it
# up to date in each tick's transaction (store.UPSERT_PROC_STATE) and prunes
# it with retention; one row per (GPU, process) seen in about the last day.
#
# Also schema 2: host CPU per tick and each GPU process's CPU and resident
# memory, so that idle-held time splits into waiting on CPU (the process
# loads or preprocesses data) and abandoned (no SM, ~no CPU). Rows written
# by schema 1 have NULL there: their idle-held time is "CPU unknown".
_V2 = """
ALTER TABLE hour_account ADD COLUMN sm_unknown_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_unit ADD COLUMN sm_unknown_ms INTEGER NOT NULL DEFAULT 0;

ALTER TABLE tick ADD COLUMN cpu_permille INTEGER;        -- all host CPUs busy over the tick, 0..1000; NULL unknown
ALTER TABLE proc_sample ADD COLUMN cpu_permille INTEGER; -- CPU over the tick, 1000 = one core; NULL unknown
ALTER TABLE proc_sample ADD COLUMN rss_mib INTEGER;      -- resident host memory at the tick; NULL unknown
-- GPM (Hopper and later): SM activity and tensor-pipe activity over the tick,
-- 0..1000, as DCGM's SM_ACTIVE / PIPE_TENSOR_ACTIVE; NULL where unsupported.
ALTER TABLE gpu_sample ADD COLUMN sm_active_permille INTEGER;
ALTER TABLE gpu_sample ADD COLUMN tensor_active_permille INTEGER;
ALTER TABLE hour_account ADD COLUMN idle_cpu_busy_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_account ADD COLUMN idle_cpu_unknown_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_unit ADD COLUMN idle_cpu_busy_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_unit ADD COLUMN idle_cpu_unknown_ms INTEGER NOT NULL DEFAULT 0;
-- Schema 1 recorded no CPU: its idle-held time is CPU unknown, not abandoned.
UPDATE hour_account SET idle_cpu_unknown_ms = idle_held_ms;
UPDATE hour_unit SET idle_cpu_unknown_ms = idle_held_ms;

CREATE TABLE proc_gpu_state (
    gpu_id         INTEGER NOT NULL,
    proc_id        INTEGER NOT NULL,
    first_ms       INTEGER NOT NULL,       -- ts_ms of the first tick that saw it on this GPU
    known_from_ms  INTEGER NOT NULL,       -- its SM observed without a break since this tick
    last_active_ms INTEGER,                -- last tick with sm_util * 10 >= ACTIVE_PERMILLE; NULL never
    last_seen_ms   INTEGER NOT NULL,       -- last tick that saw it on this GPU
    PRIMARY KEY (gpu_id, proc_id)
) WITHOUT ROWID;

-- Histograms, written with the hourly rollups (rollup.py): the facts the
-- classification reads, counted but not classified, so that a report with
-- other thresholds, or in a zone whose hours are not UTC hours (+05:30,
-- +05:45), classifies these instead of every raw row. Kept like the rollups.
-- A GPU's ticks per hour by utilization in whole percent and the memory its
-- compute processes hold. Keyed by GPU first: a report sums each GPU's rows
-- over the window as it reads them (one key range per GPU), where an hour-first
-- key would make it sort every row by GPU (a third of its time for a year).
CREATE TABLE hour_gpu_hist (
    hour           INTEGER NOT NULL,
    gpu_id         INTEGER NOT NULL,
    util_pct       INTEGER NOT NULL,       -- util_permille / 10; -1: unknown (status != 0 or util NULL)
    mem_mib        INTEGER NOT NULL,       -- sum(mem_mib) of compute processes, 0 none; -1: one NULL
    ticks          INTEGER NOT NULL,
    ms             INTEGER NOT NULL,       -- sum(duration_ms)
    coverage_pm_ms INTEGER NOT NULL,       -- sum(duration_ms * coverage_permille), NULLs as 0
    energy_mj      INTEGER,                -- sum(energy_mj); NULL when no row had energy
    PRIMARY KEY (gpu_id, hour, util_pct, mem_mib)
) WITHOUT ROWID;

-- The heatmap's grain: a GPU's known time (status 0, util known) per UTC
-- quarter hour (ts_ms // 900000) by utilization in whole percent.
CREATE TABLE quarter_gpu (
    quarter        INTEGER NOT NULL,
    gpu_id         INTEGER NOT NULL,
    util_pct       INTEGER NOT NULL,       -- util_permille / 10
    ms             INTEGER NOT NULL,       -- sum(duration_ms)
    PRIMARY KEY (quarter, gpu_id, util_pct)
) WITHOUT ROWID;

-- An account's (and an account and unit's) compute processes on a GPU per
-- hour, by their SM and memory summed over the tick; every tick with one,
-- held at the rollup thresholds or not. hour_account_hist is keyed by GPU
-- and account first, as hour_gpu_hist; hour_unit_hist by hour, since units
-- (one per Slurm job) are too many to seek one by one.
CREATE TABLE hour_account_hist (
    hour           INTEGER NOT NULL,
    gpu_id         INTEGER NOT NULL,
    account_id     INTEGER NOT NULL,
    sm_pct         INTEGER NOT NULL,       -- sum(sm_util), at most 100; -1: one NULL
    mem_mib        INTEGER NOT NULL,       -- sum(mem_mib); -1: one NULL
    ms             INTEGER NOT NULL,
    mem_mib_ms     INTEGER NOT NULL,       -- sum(known mem_mib * duration)
    cpu_busy_ms    INTEGER NOT NULL,       -- CPU known and >= rollup_cpu_busy_permille
    cpu_unknown_ms INTEGER NOT NULL,       -- some cpu_permille NULL (exited rows aside)
    PRIMARY KEY (gpu_id, account_id, hour, sm_pct, mem_mib)
) WITHOUT ROWID;

CREATE TABLE hour_unit_hist (
    hour           INTEGER NOT NULL,
    gpu_id         INTEGER NOT NULL,
    account_id     INTEGER NOT NULL,
    unit           TEXT NOT NULL,
    sm_pct         INTEGER NOT NULL,
    mem_mib        INTEGER NOT NULL,
    ms             INTEGER NOT NULL,
    mem_mib_ms     INTEGER NOT NULL,
    cpu_busy_ms    INTEGER NOT NULL,
    cpu_unknown_ms INTEGER NOT NULL,
    PRIMARY KEY (hour, gpu_id, account_id, unit, sm_pct, mem_mib)
) WITHOUT ROWID;
"""

# Schema 3: smaller raw rows, and retention that bounds the process table.
# - gpu_sample.coverage_permille is NULL for full coverage (1000) when
#   util_permille is known; power_mw is NULL when energy_mj is known (the
#   energy over the tick is the exact mean power; an instantaneous reading
#   adds nothing). No reader of power_mw exists; readers of coverage use
#   COVERAGE_SQL. Rows written before keep their values, which read the same.
# - process.last_ms: when the collector last saw the process, at most
#   PROCESS_LAST_STEP_MS early, so that retention can delete the process rows
#   no retained raw row or proc_gpu_state row refers to. The upgrade sets it
#   to the newest tick for every existing row: they go one retention period
#   after the upgrade at the latest, never too early.
_V3 = """
ALTER TABLE process ADD COLUMN last_ms INTEGER NOT NULL DEFAULT 0;
UPDATE process SET last_ms = coalesce((SELECT max(ts_ms) FROM tick), 0);
INSERT INTO meta (key, value) VALUES ('hist_pct_cap', '{pct}'), ('hist_mib_cap', '{mib}')
    ON CONFLICT (key) DO UPDATE SET value = excluded.value;
-- Retention deletes process rows by last_ms (store.DELETE_PROCESSES).
CREATE INDEX process_last ON process (last_ms);
-- GPM in the rollups (schema 3): per hour and GPU the time GPM SM activity
-- (and tensor activity) was known, status 0, and their sums x duration; and
-- the active time it was known and below STARVED_SM_PERMILLE: active but
-- starved (a spin loop, a kernel waiting on memory or on one SM). The
-- histogram's gpm_low_ms is the row's time GPM was known and below it,
-- whatever the utilization: active but starved at any active threshold up to
-- the cap is the sum over its active rows. hour_account / hour_unit: the
-- holder's busy time (held, SM known and >= the active threshold) on a tick
-- whose GPU had GPM known (gpm_busy_ms), and on one that was starved.
-- Hours rolled up before (rollup_next_hour at the upgrade, meta
-- gpm_since_hour) hold 0 there: not recorded.
ALTER TABLE hour_gpu ADD COLUMN gpm_known_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_gpu ADD COLUMN sm_active_pm_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_gpu ADD COLUMN tensor_known_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_gpu ADD COLUMN tensor_active_pm_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_gpu ADD COLUMN starved_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_gpu_hist ADD COLUMN gpm_known_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_gpu_hist ADD COLUMN sm_active_pm_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_gpu_hist ADD COLUMN tensor_known_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_gpu_hist ADD COLUMN tensor_active_pm_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_gpu_hist ADD COLUMN gpm_low_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_account ADD COLUMN gpm_busy_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_account ADD COLUMN starved_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_unit ADD COLUMN gpm_busy_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hour_unit ADD COLUMN starved_ms INTEGER NOT NULL DEFAULT 0;
-- Where GPM values were stored before (schema 2), the first one's tick;
-- the collector notes it from then on (store.INSERT_GPM_FIRST).
INSERT INTO meta (key, value)
    SELECT 'gpm_first_ms', first FROM (
        SELECT min(t.ts_ms) AS first
        FROM gpu_sample AS g JOIN tick AS t ON t.tick_id = g.tick_id
        WHERE g.sm_active_permille IS NOT NULL OR g.tensor_active_permille IS NOT NULL
    ) WHERE first IS NOT NULL
    ON CONFLICT (key) DO NOTHING;
INSERT INTO meta (key, value) VALUES ('starved_sm_permille', '{starved}')
    ON CONFLICT (key) DO UPDATE SET value = excluded.value;
INSERT INTO meta (key, value)
    SELECT 'gpm_since_hour', coalesce((SELECT value FROM meta WHERE key = 'rollup_next_hour'), '0') WHERE true
    ON CONFLICT (key) DO UPDATE SET value = excluded.value;
"""

# Schema 3 caps the histograms' keys (rollup.py): utilization and SM at
# HIST_PCT_CAP percent and memory at HIST_MIB_CAP MiB. A busy GPU's
# utilization and a job's memory wander over many values that no usual
# threshold tells apart; kept exactly, a day of short jobs wrote almost a row
# per tick, kept forever. Capped, a histogram classifies exactly for an active
# threshold up to HIST_PCT_CAP % and a held threshold below HIST_MIB_CAP MiB;
# other thresholds read raw rows (the reporter says so). Recorded in meta.
HIST_PCT_CAP = 50
HIST_MIB_CAP = 1024

# Schema 4: above the caps the keys go on in steps instead of stopping:
# utilization and SM in tens of percent (50, 60, ... 100; "100" is 100 and
# more, for summed SM), memory rounded up to a whole HIST_MIB_STEP (2048 is
# 1025..2048 MiB, 3072 is 2049..3072, ...). A histogram then classifies
# exactly for any whole-percent active threshold up to the cap or a multiple
# of HIST_PCT_STEP above it (60 %, 70 %, ...), and a held threshold up to the
# cap or a multiple of HIST_MIB_STEP (2 GiB, 8 GiB, ...): a value is above a
# threshold exactly when its key is. A busy GPU's hour gains a few rows, not
# one per value. Hours rolled up from meta hist_steps_since_hour on have them.
HIST_PCT_STEP = 10
HIST_MIB_STEP = 1024


def hist_pct_key(x: str) -> str:
    """SQL for the histogram key of an integer percentage expression x (utilization, summed SM)."""
    return (f"CASE WHEN {x} < {HIST_PCT_CAP} THEN {x} "
            f"ELSE min({x} - {x} % {HIST_PCT_STEP}, 100) END")


def hist_mib_key(x: str) -> str:
    """SQL for the histogram key of an integer MiB expression x (memory held), rounded up above the cap."""
    return (f"CASE WHEN {x} <= {HIST_MIB_CAP} THEN {x} "
            f"ELSE ({x} + {HIST_MIB_STEP - 1}) / {HIST_MIB_STEP} * {HIST_MIB_STEP} END")


_V4 = """
INSERT INTO meta (key, value) VALUES ('hist_pct_step', '{pct_step}'), ('hist_mib_step', '{mib_step}')
    ON CONFLICT (key) DO UPDATE SET value = excluded.value;
-- Hours rolled up before this step keep keys that stop at the caps.
INSERT INTO meta (key, value)
    SELECT 'hist_steps_since_hour', coalesce((SELECT value FROM meta WHERE key = 'rollup_next_hour'), '0') WHERE true
    ON CONFLICT (key) DO UPDATE SET value = excluded.value;
"""

# Schema 5: compacted raw rows. An hour that is rolled up and at least
# compact.HEAD_HOURS (a day) older than the newest tick moves out of gpu_sample and
# proc_sample into one row here: the same rows in rawchunk's format (a few
# bytes per GPU-tick instead of ~55). tick stays as it is: every range a
# report reads starts there. Readers of raw rows decode the chunks of the
# hours they read (gua_report.rawload). meta compact_next_tick: where the
# collector's walk over the fact tables goes on.
_V5 = """
CREATE TABLE IF NOT EXISTS raw_chunk (
    chunk_id INTEGER PRIMARY KEY,
    hour     INTEGER NOT NULL,             -- UTC hour (ts_ms / 3600000) of the ticks whose rows it holds
    data     BLOB NOT NULL                 -- rawchunk format 1: gpu_sample and proc_sample rows
);
-- A report loads the chunks of the hours it reads raw; retention drops old hours.
CREATE INDEX IF NOT EXISTS raw_chunk_hour ON raw_chunk (hour);
"""

# Active but starved (schema 3): a GPU tick that is active (util_permille >=
# the active threshold) while GPM says its SMs were busy less than this
# (sm_active_permille, 0..1000: 5 %): the kernel keeps one SM, or the memory
# bus, busy and the utilization counter at 100 %. Fixed; recorded in meta
# `starved_sm_permille`, which the reporter reads.
STARVED_SM_PERMILLE = 50

# The collector writes process.last_ms again once a sighting is this much
# newer than the stored value: one UPDATE per process an hour, not per tick.
PROCESS_LAST_STEP_MS = 3_600_000

# gpu_sample's coverage with schema 3's NULL-for-full read back; {g} is the
# table alias with its dot. Equal to the stored value for rows of schema 1 and 2.
COVERAGE_SQL = "coalesce({g}coverage_permille, CASE WHEN {g}util_permille IS NOT NULL THEN 1000 END)"


# An idle-held holder whose processes use at least this much CPU together
# (permille of one core: 10 %) is waiting on the CPU; below it, abandoned.
ROLLUP_CPU_BUSY_PERMILLE = 100

# proc_gpu_state counts a process active in a tick when sm_util * 10 >= this
# (permille): the default active threshold, fixed when the tick is written.
ACTIVE_PERMILLE = ROLLUP_ACTIVE_PERMILLE
# An observation of a process that resumes after more than this without one
# (collector stopped, host suspended, its GPU failing) restarts known_from_ms:
# what it did meanwhile is unknown. Shorter breaks (a restart) are bridged.
# Equal to the reporter's "gap" (a stretch of 5 min without ticks).
PROC_STATE_HOLE_MS = 300_000
# Schema 1 -> 2 rebuilds proc_gpu_state from this much raw history before the
# newest tick, no more: the upgrade stays cheap on a 90-day database.
PROC_STATE_BACKFILL_MS = 86_400_000

# The fold of one process's rows, in tick order, into proc_gpu_state: an
# UPSERT per (tick, GPU, process) (store.UPSERT_PROC_STATE) or, for the
# upgrade, the same in one set-based statement. known_from_ms moves to the
# tick when the process is first seen, when its sm_util is NULL, and when the
# tick starts (ts_ms - duration_ms) more than PROC_STATE_HOLE_MS after its
# last_seen_ms.
_BACKFILL_PROC_STATE = """
INSERT INTO proc_gpu_state (gpu_id, proc_id, first_ms, known_from_ms, last_active_ms, last_seen_ms)
SELECT gpu_id, proc_id, min(ts_ms),
       max(CASE WHEN prev_ms IS NULL OR sm_util IS NULL OR ts_ms - duration_ms - prev_ms > :hole
                THEN ts_ms END),
       max(CASE WHEN sm_util * 10 >= :active THEN ts_ms END),
       max(ts_ms)
FROM (
    SELECT ps.gpu_id, ps.proc_id, t.ts_ms, t.duration_ms, ps.sm_util,
           lag(t.ts_ms) OVER (PARTITION BY ps.gpu_id, ps.proc_id ORDER BY t.ts_ms) AS prev_ms
    FROM tick AS t
    JOIN proc_sample AS ps ON ps.tick_id = t.tick_id
    WHERE t.ts_ms >= :lo
)
GROUP BY gpu_id, proc_id
"""


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    _execute_script(conn, _V2)
    # Imported here: rollup imports this module for the thresholds.
    from . import rollup

    rollup.backfill_sm_unknown(conn)
    rollup.backfill_hist(conn)
    backfill_proc_state(conn)


def backfill_proc_state(conn: sqlite3.Connection) -> None:
    """Fill proc_gpu_state from the last PROC_STATE_BACKFILL_MS of raw rows (schema 1 -> 2).

    A new database has no rows: it records 0. When older raw rows exist, or
    retention has removed some, the state starts at the first tick read and
    meta `proc_state_since_ms` says so: a first_ms or known_from_ms equal to
    it may be later than the truth (the reporter says "at least").
    """
    newest = conn.execute("SELECT max(ts_ms) FROM tick").fetchone()[0]
    since = 0
    if newest is not None:
        lo = newest - PROC_STATE_BACKFILL_MS
        conn.execute(_BACKFILL_PROC_STATE, {"lo": lo, "hole": PROC_STATE_HOLE_MS, "active": ACTIVE_PERMILLE})
        older = conn.execute("SELECT 1 FROM tick WHERE ts_ms < ? LIMIT 1", (lo,)).fetchone()
        pruned = conn.execute("SELECT 1 FROM meta WHERE key = 'raw_pruned_before_ms'").fetchone()
        if older or pruned:
            since = conn.execute("SELECT min(ts_ms) FROM tick WHERE ts_ms >= ?", (lo,)).fetchone()[0]
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('proc_state_since_ms', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(since),),
    )


# A migration is DDL, or a function for steps that must also rewrite data.
Migration = str | Callable[[sqlite3.Connection], None]

# MIGRATIONS[n] takes a database at version n to n + 1; a new database runs them all.
MIGRATIONS: dict[int, Migration] = {
    0: _V1, 1: _v1_to_v2, 2: _V3.format(pct=HIST_PCT_CAP, mib=HIST_MIB_CAP, starved=STARVED_SM_PERMILLE),
    3: _V4.format(pct_step=HIST_PCT_STEP, mib_step=HIST_MIB_STEP), 4: _V5}


class SchemaError(Exception):
    """The file is not a gua database this code can use."""


class NewerSchemaError(SchemaError):
    """The database was written by a newer gua."""


def read_version(conn: sqlite3.Connection) -> int:
    """Return PRAGMA user_version."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def is_gua(conn: sqlite3.Connection) -> bool:
    """True when the meta table names this application."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'application'").fetchone()
    except sqlite3.OperationalError as error:
        # No meta table: someone else's database. A damaged page is not that:
        # it propagates, to be checked and called corrupt.
        if "no such table" in str(error):
            return False
        raise
    return row is not None and row[0] == APPLICATION


def ensure_schema(conn: sqlite3.Connection, created_ms: int,
                  on_upgrade: Callable[[int, int], None] | None = None) -> int:
    """Create or migrate the schema in one transaction; return the version now in force.

    on_upgrade(old, new) is called before an existing database is upgraded,
    which may take minutes on a long history. Raises NewerSchemaError for a
    newer database and SchemaError for a non-empty database that is not gua's.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = read_version(conn)
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"database schema version {version} is newer than this collector's {SCHEMA_VERSION}"
            )
        if version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise SchemaError("database has tables but is not a gua database")
        elif not is_gua(conn):
            raise SchemaError("database has a user_version but is not a gua database")
        if 0 < version < SCHEMA_VERSION and on_upgrade is not None:
            on_upgrade(version, SCHEMA_VERSION)
        for step in range(version, SCHEMA_VERSION):
            migration = MIGRATIONS[step]
            if isinstance(migration, str):
                _execute_script(conn, migration)
            else:
                migration(conn)
        if version == 0:
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("application", APPLICATION),
                    ("created_ms", str(created_ms)),
                    ("rollup_active_permille", str(ROLLUP_ACTIVE_PERMILLE)),
                    ("rollup_held_bytes", str(ROLLUP_HELD_BYTES)),
                    ("rollup_cpu_busy_permille", str(ROLLUP_CPU_BUSY_PERMILLE)),
                ],
            )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (SQLITE_FULL does): a second
        # ROLLBACK would hide the real error behind "no transaction is active".
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    """Run DDL inside the open transaction (executescript would COMMIT first)."""
    for statement in _statements(script):
        conn.execute(statement)


def _statements(script: str) -> list[str]:
    """Split a DDL script into complete statements."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return [s for s in out if s]
