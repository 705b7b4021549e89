"""Hourly rollups: classify each finished UTC hour once, as integer sums of the raw facts.

The classification rules are SCHEMA.md's; the reporter uses these rows for
whole hours and raw rows for the rest, so both paths must agree exactly.
Beside the classified sums (hour_gpu, hour_account, hour_unit, with the
rollup thresholds), each hour also gets histograms of the same facts before
classification (hour_gpu_hist, hour_account_hist, hour_unit_hist, and
quarter_gpu per quarter hour for the heatmap): a report with other
thresholds, or in a zone whose hours are not UTC hours, classifies those
instead of every raw row.
Every function runs inside the store's write transaction.
"""

from __future__ import annotations

import sqlite3

from . import schema

HOUR_MS = 3_600_000
QUARTER_MS = 900_000  # the grain that aligns with every zone's offset (+05:30, +05:45, +12:45)

# --- meta ------------------------------------------------------------------------
SELECT_META = "SELECT value FROM meta WHERE key = ?"
UPSERT_META = """
INSERT INTO meta (key, value) VALUES (?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value
"""
# Uses tick_ts.
SELECT_MIN_TICK_HOUR = "SELECT min(ts_ms) / 3600000 FROM tick"

# --- rollups (classification rules: SCHEMA.md) -----------------------------------
# :lo/:hi bound ts_ms to whole hours; :active is permille, :held bytes.
DELETE_ROLLUP = (
    "DELETE FROM hour_gpu WHERE hour >= :lo / 3600000 AND hour < :hi / 3600000",
    "DELETE FROM hour_account WHERE hour >= :lo / 3600000 AND hour < :hi / 3600000",
    "DELETE FROM hour_unit WHERE hour >= :lo / 3600000 AND hour < :hi / 3600000",
    "DELETE FROM quarter_gpu WHERE quarter >= :lo / 900000 AND quarter < :hi / 900000",
    "DELETE FROM hour_unit_hist WHERE hour >= :lo / 3600000 AND hour < :hi / 3600000",
)
# Histograms keyed by GPU (and account) first (schema.py) are deleted one key
# range at a time: a plain range on `hour` would scan the whole table.
SELECT_GPU_IDS = "SELECT gpu_id FROM gpu"
DELETE_GPU_HIST = """
DELETE FROM hour_gpu_hist
WHERE gpu_id = :gpu_id AND hour >= :lo / 3600000 AND hour < :hi / 3600000
"""
# The holders whose rows an hour's histogram holds are those of its raw rows.
# (Were retention to remove some of an hour's raw rows before a clock set
# back re-rolled that hour, rows of holders no longer among them would stay;
# the hourly rollups of such an hour lose them. Retention cuts days back.)
SELECT_HOLDER_PAIRS = """
SELECT DISTINCT ps.gpu_id, p.account_id
FROM tick AS t
JOIN proc_sample AS ps ON ps.tick_id = t.tick_id
JOIN process AS p ON p.proc_id = ps.proc_id
WHERE t.ts_ms >= :lo AND t.ts_ms < :hi AND ps.kind & 1
"""
DELETE_ACCOUNT_HIST = """
DELETE FROM hour_account_hist
WHERE gpu_id = ? AND account_id = ? AND hour >= ? / 3600000 AND hour < ? / 3600000
"""
ROLLUP_GPU = """
WITH held AS (
    -- Driven from tick_ts, not from a materialized tick CTE: SQLite would
    -- answer that join with a full scan of proc_sample.
    SELECT ps.tick_id, ps.gpu_id,
           max(ps.mem_mib IS NULL) = 1 OR sum(ps.mem_mib) * 1048576 > :held AS held
    FROM tick AS t
    JOIN proc_sample AS ps ON ps.tick_id = t.tick_id
    WHERE t.ts_ms >= :lo AND t.ts_ms < :hi AND ps.kind & 1
    GROUP BY ps.tick_id, ps.gpu_id
),
classified AS (
    SELECT t.ts_ms / 3600000 AS hour, g.gpu_id, t.duration_ms AS d,
           {cov} AS coverage_permille, g.energy_mj,
           -- GPM activity counts where the row is ok (NULL otherwise anyway).
           CASE WHEN g.status = 0 THEN g.sm_active_permille END AS sm,
           CASE WHEN g.status = 0 THEN g.tensor_active_permille END AS tc,
           CASE
               WHEN g.status != 0 OR g.util_permille IS NULL THEN 3
               WHEN g.util_permille >= :active THEN 0
               WHEN coalesce(h.held, 0) THEN 1
               ELSE 2
           END AS state
    FROM tick AS t
    JOIN gpu_sample AS g ON g.tick_id = t.tick_id
    LEFT JOIN held AS h ON h.tick_id = g.tick_id AND h.gpu_id = g.gpu_id
    WHERE t.ts_ms >= :lo AND t.ts_ms < :hi
)
INSERT INTO hour_gpu (hour, gpu_id, ticks, total_ms, active_ms, held_ms, idle_ms, unknown_ms, coverage_pm_ms,
                      energy_active_mj, energy_held_mj, energy_idle_mj,
                      gpm_known_ms, sm_active_pm_ms, tensor_known_ms, tensor_active_pm_ms, starved_ms)
SELECT hour, gpu_id, count(*), sum(d),
       sum(CASE state WHEN 0 THEN d ELSE 0 END),
       sum(CASE state WHEN 1 THEN d ELSE 0 END),
       sum(CASE state WHEN 2 THEN d ELSE 0 END),
       sum(CASE state WHEN 3 THEN d ELSE 0 END),
       sum(d * coalesce(coverage_permille, 0)),
       sum(CASE state WHEN 0 THEN energy_mj END),
       sum(CASE state WHEN 1 THEN energy_mj END),
       sum(CASE state WHEN 2 THEN energy_mj END),
       sum(CASE WHEN sm IS NOT NULL THEN d ELSE 0 END),
       sum(CASE WHEN sm IS NOT NULL THEN d * sm ELSE 0 END),
       sum(CASE WHEN tc IS NOT NULL THEN d ELSE 0 END),
       sum(CASE WHEN tc IS NOT NULL THEN d * tc ELSE 0 END),
       -- active but starved: active, and GPM SM activity known and below the constant
       sum(CASE WHEN state = 0 AND sm < {starved} THEN d ELSE 0 END)
FROM classified
GROUP BY hour, gpu_id
""".replace("{cov}", schema.COVERAGE_SQL.format(g="g.")).replace("{starved}", str(schema.STARVED_SM_PERMILLE))
# The ticks of the hours being rolled up, by tick_ts; both holder rollups
# (the classified sums and the histograms) start from it.
_HOUR_TICKS = """
WITH t AS (
    SELECT tick_id, duration_ms AS d, ts_ms / 3600000 AS hour
    FROM tick
    WHERE ts_ms >= :lo AND ts_ms < :hi
),
"""
# Shared by the account and unit rollups: one row per holder per GPU per tick.
# A held tick is exactly one of idle-held (every sm_util known, sum below
# :active), busy (every sm_util known, sum at or above it) or SM unknown (some
# sm_util NULL: MIG, NVML NOT_SUPPORTED). Busy time is held - idle_held -
# sm_unknown; counting unknown SM as busy would hide an idle holder.
# Idle-held time splits again by the holder's CPU over the tick: waiting on
# the CPU (idle_cpu_busy_ms, at least :cpu_busy permille of one core), CPU
# unknown (idle_cpu_unknown_ms), or abandoned (the rest).
_HOLDERS = _HOUR_TICKS + """per AS (
    SELECT t.hour, t.d, ps.gpu_id, p.account_id, {unit} AS unit,{gpm_cols}
           max(ps.mem_mib IS NULL) AS mem_unknown,
           coalesce(sum(ps.mem_mib), 0) AS mem,
           max(ps.sm_util IS NULL) AS sm_unknown,
           coalesce(sum(ps.sm_util), 0) AS sm,
           -- A process that left during the tick has no CPU reading; it holds nothing either.
           max(ps.cpu_permille IS NULL AND NOT ps.kind & 4) AS cpu_unknown,
           coalesce(sum(ps.cpu_permille), 0) AS cpu
    FROM t
    JOIN proc_sample AS ps USING (tick_id)
    JOIN process AS p USING (proc_id){gpm_join}
    WHERE ps.kind & 1 {where}
    GROUP BY ps.tick_id, ps.gpu_id, p.account_id, {unit}
)
SELECT hour, gpu_id, account_id, {select_unit}
       sum(d),
       sum(CASE WHEN sm_unknown = 0 AND sm * 10 < :active THEN d ELSE 0 END),
       sum(mem * d),
       sum(CASE WHEN mem_unknown THEN d ELSE 0 END),
       sum(CASE WHEN sm_unknown THEN d ELSE 0 END),
       sum(CASE WHEN sm_unknown = 0 AND sm * 10 < :active AND cpu_unknown = 0 AND cpu >= :cpu_busy
                THEN d ELSE 0 END),
       sum(CASE WHEN sm_unknown = 0 AND sm * 10 < :active AND cpu_unknown THEN d ELSE 0 END){gpm_sums}
FROM per
WHERE mem_unknown OR mem * 1048576 > :held
GROUP BY hour, gpu_id, account_id {group_unit}
"""
_ACCOUNT_COLUMNS = (
    "hour, gpu_id, account_id, held_ms, idle_held_ms, mem_mib_ms, unknown_mem_ms, sm_unknown_ms,"
    " idle_cpu_busy_ms, idle_cpu_unknown_ms"
)
_UNIT_COLUMNS = (
    "hour, gpu_id, account_id, unit, held_ms, idle_held_ms, mem_mib_ms, unknown_mem_ms, sm_unknown_ms,"
    " idle_cpu_busy_ms, idle_cpu_unknown_ms"
)
# Schema 3 adds, per holder, its busy time (held, every sm_util known, sum at
# or above :active) on a tick whose GPU had GPM SM activity known (status 0),
# and on one whose GPU was also active but starved (util_permille >= :active,
# SM activity below schema.STARVED_SM_PERMILLE). The GPU's row comes by
# gpu_sample's primary key, one per (tick, GPU): max() just carries it.
_GPM_COLS = """
           max(CASE WHEN g.status = 0 THEN g.sm_active_permille END IS NOT NULL) AS gpm_known,
           max(g.status = 0 AND g.util_permille >= :active AND g.sm_active_permille < {starved}) AS starved,"""
_GPM_JOIN = "\n    JOIN gpu_sample AS g ON g.tick_id = ps.tick_id AND g.gpu_id = ps.gpu_id"
_GPM_SUMS = """,
       sum(CASE WHEN sm_unknown = 0 AND sm * 10 >= :active AND gpm_known THEN d ELSE 0 END),
       sum(CASE WHEN sm_unknown = 0 AND sm * 10 >= :active AND starved THEN d ELSE 0 END)"""


def _holders(unit: bool, gpm: bool) -> str:
    """The account (unit) rollup's SELECT; `gpm` False: without schema 3's GPM columns."""
    return _HOLDERS.format(
        unit="p.unit" if unit else "''", where="AND p.unit != ''" if unit else "",
        select_unit="unit," if unit else "", group_unit=", unit" if unit else "",
        gpm_cols=_GPM_COLS.format(starved=schema.STARVED_SM_PERMILLE) if gpm else "",
        gpm_join=_GPM_JOIN if gpm else "", gpm_sums=_GPM_SUMS if gpm else "")


_GPM_COLUMNS = ", gpm_busy_ms, starved_ms"
ROLLUP_ACCOUNT = f"INSERT INTO hour_account ({_ACCOUNT_COLUMNS}{_GPM_COLUMNS}){_holders(False, True)}"
ROLLUP_UNIT = f"INSERT INTO hour_unit ({_UNIT_COLUMNS}{_GPM_COLUMNS}){_holders(True, True)}"

# --- histograms (schema 2): the facts the classification reads, not yet classified ---
# One row per hour, GPU, utilization in whole percent and compute memory:
# whatever the thresholds, a GPU-tick's state follows from those two
# (SCHEMA.md), exactly so for an active threshold in whole percent, since
# util_permille >= 10 * p exactly when util_permille / 10 >= p. Rows of an
# unknown state have util_pct -1 (and mem_mib 0: it does not matter there).
# Both keys are exact up to caps and in steps above them (schema.hist_pct_key,
# schema.hist_mib_key), so that an hour holds a few rows per GPU, not one per
# tick, however much a busy GPU's utilization wanders.
_GPU_HIST = """
WITH held AS (
    -- As in ROLLUP_GPU: driven from tick_ts.
    SELECT ps.tick_id, ps.gpu_id,
           CASE WHEN max(ps.mem_mib IS NULL) THEN -1 ELSE sum(ps.mem_mib) END AS mem
    FROM tick AS t
    JOIN proc_sample AS ps ON ps.tick_id = t.tick_id
    WHERE t.ts_ms >= :lo AND t.ts_ms < :hi AND ps.kind & 1
    GROUP BY ps.tick_id, ps.gpu_id
),
bucketed AS (
    SELECT t.ts_ms / 3600000 AS hour, g.gpu_id, t.duration_ms AS d,
           {cov} AS cov, g.energy_mj AS e,
           CASE WHEN g.status = 0 THEN g.sm_active_permille END AS sm,
           CASE WHEN g.status = 0 THEN g.tensor_active_permille END AS tc,
           CASE WHEN g.status != 0 OR g.util_permille IS NULL THEN -1
                ELSE {util_key} END AS util_pct,
           CASE WHEN g.status != 0 OR g.util_permille IS NULL THEN 0
                ELSE {mem_key} END AS mem
    FROM tick AS t
    JOIN gpu_sample AS g ON g.tick_id = t.tick_id
    LEFT JOIN held AS h ON h.tick_id = g.tick_id AND h.gpu_id = g.gpu_id
    WHERE t.ts_ms >= :lo AND t.ts_ms < :hi
)
INSERT INTO hour_gpu_hist (hour, gpu_id, util_pct, mem_mib, ticks, ms, coverage_pm_ms, energy_mj{gpm_columns})
SELECT hour, gpu_id, util_pct, mem, count(*), sum(d), sum(d * coalesce(cov, 0)), sum(e){gpm_sums}
FROM bucketed
GROUP BY hour, gpu_id, util_pct, mem
""".replace("{cov}", schema.COVERAGE_SQL.format(g="g."))
# Schema 3: GPM known time and activity sums, and gpm_low_ms, the time GPM SM
# activity was known and below schema.STARVED_SM_PERMILLE whatever the row's
# state: active but starved at a threshold is its sum over the active rows.
_GPU_HIST_GPM_COLUMNS = ", gpm_known_ms, sm_active_pm_ms, tensor_known_ms, tensor_active_pm_ms, gpm_low_ms"
_GPU_HIST_GPM_SUMS = f""",
       sum(CASE WHEN sm IS NOT NULL THEN d ELSE 0 END), sum(CASE WHEN sm IS NOT NULL THEN d * sm ELSE 0 END),
       sum(CASE WHEN tc IS NOT NULL THEN d ELSE 0 END), sum(CASE WHEN tc IS NOT NULL THEN d * tc ELSE 0 END),
       sum(CASE WHEN sm < {schema.STARVED_SM_PERMILLE} THEN d ELSE 0 END)"""


def _gpu_hist(gpm: bool) -> str:
    return _GPU_HIST.format(
        util_key=schema.hist_pct_key("(g.util_permille / 10)"), mem_key=schema.hist_mib_key("coalesce(h.mem, 0)"),
        gpm_columns=_GPU_HIST_GPM_COLUMNS if gpm else "", gpm_sums=_GPU_HIST_GPM_SUMS if gpm else "")
# The heatmap's grain: a GPU's known time per UTC quarter hour by utilization
# in whole percent, keyed as above (active time at any threshold the keys
# answer). A quarter hour falls
# into one local hour in every zone in use (+05:30, +05:45, +12:45, and the
# instants they change), where a UTC hour may straddle two.
ROLLUP_QUARTER_GPU = f"""
INSERT INTO quarter_gpu (quarter, gpu_id, util_pct, ms)
SELECT t.ts_ms / 900000, g.gpu_id, {schema.hist_pct_key("(g.util_permille / 10)")}, sum(t.duration_ms)
FROM tick AS t
JOIN gpu_sample AS g ON g.tick_id = t.tick_id
WHERE t.ts_ms >= :lo AND t.ts_ms < :hi AND g.status = 0 AND g.util_permille IS NOT NULL
GROUP BY 1, 2, 3
"""
# One row per hour, GPU, holder, its SM (the sum over its compute processes,
# in percent; -1 when one is NULL) and its compute memory (-1 when one is
# NULL): whether it held the GPU and idled follows for the thresholds the
# keys answer (schema.hist_pct_key, schema.hist_mib_key, as the GPU's), since
# sm and memory are integers; mem_mib_ms stays exact. Every holder row counts, held
# at the rollup thresholds or not; cpu_busy_ms and cpu_unknown_ms split its
# time as idle_cpu_busy_ms and idle_cpu_unknown_ms split idle-held time.
_HOLDER_HIST = _HOUR_TICKS + """per AS (
    SELECT t.hour, t.d, ps.gpu_id, p.account_id, {unit} AS unit,
           CASE WHEN max(ps.mem_mib IS NULL) THEN -1 ELSE {mem_key} END AS mem_key,
           coalesce(sum(ps.mem_mib), 0) AS mem,
           CASE WHEN max(ps.sm_util IS NULL) THEN -1 ELSE {sm_key} END AS sm,
           max(ps.cpu_permille IS NULL AND NOT ps.kind & 4) AS cpu_unknown,
           coalesce(sum(ps.cpu_permille), 0) AS cpu
    FROM t
    JOIN proc_sample AS ps USING (tick_id)
    JOIN process AS p USING (proc_id)
    WHERE ps.kind & 1 {where}
    GROUP BY ps.tick_id, ps.gpu_id, p.account_id, {unit}
)
INSERT INTO {table} ({columns})
SELECT hour, gpu_id, account_id, {select_unit}
       sm, mem_key, sum(d), sum(mem * d),
       sum(CASE WHEN cpu_unknown = 0 AND cpu >= :cpu_busy THEN d ELSE 0 END),
       sum(CASE WHEN cpu_unknown THEN d ELSE 0 END)
FROM per
GROUP BY hour, gpu_id, account_id, {select_unit} sm, mem_key
"""
_HOLDER_KEYS = {"mem_key": schema.hist_mib_key("coalesce(sum(ps.mem_mib), 0)"),
                "sm_key": schema.hist_pct_key("coalesce(sum(ps.sm_util), 0)")}
ROLLUP_ACCOUNT_HIST = _HOLDER_HIST.format(
    unit="''", where="", select_unit="", table="hour_account_hist",
    **_HOLDER_KEYS,
    columns="hour, gpu_id, account_id, sm_pct, mem_mib, ms, mem_mib_ms, cpu_busy_ms, cpu_unknown_ms")
ROLLUP_UNIT_HIST = _HOLDER_HIST.format(
    unit="p.unit", where="AND p.unit != ''", select_unit="unit,", table="hour_unit_hist",
    **_HOLDER_KEYS,
    columns="hour, gpu_id, account_id, unit, sm_pct, mem_mib, ms, mem_mib_ms, cpu_busy_ms, cpu_unknown_ms")
ROLLUP_GPU_HIST = _gpu_hist(True)
HIST_ROLLUPS = (ROLLUP_GPU_HIST, ROLLUP_QUARTER_GPU, ROLLUP_ACCOUNT_HIST, ROLLUP_UNIT_HIST)
# The schema 1 -> 2 upgrade runs before schema 3's columns exist: it fills the
# histograms without them (those hours are before meta gpm_since_hour).
_HIST_ROLLUPS_V2 = (_gpu_hist(False), ROLLUP_QUARTER_GPU, ROLLUP_ACCOUNT_HIST, ROLLUP_UNIT_HIST)
# Everything an hour gets, in the order written.
ROLLUPS = (ROLLUP_GPU, ROLLUP_ACCOUNT, ROLLUP_UNIT, *HIST_ROLLUPS)

# --- schema 1 -> 2: sm_unknown_ms of hours rolled up before it existed --------------
# The same classification, setting only sm_unknown_ms of the rows already there:
# the other columns are left exactly as written. (The SELECT's WHERE clause
# keeps SQLite from reading ON CONFLICT as a join constraint.)
BACKFILL_ACCOUNT = (
    f"INSERT INTO hour_account ({_ACCOUNT_COLUMNS}){_holders(False, False)}"
    + "ON CONFLICT (hour, gpu_id, account_id) DO UPDATE SET sm_unknown_ms = excluded.sm_unknown_ms\n"
)
BACKFILL_UNIT = (
    f"INSERT INTO hour_unit ({_UNIT_COLUMNS}){_holders(True, False)}"
    + "ON CONFLICT (hour, gpu_id, account_id, unit) DO UPDATE SET sm_unknown_ms = excluded.sm_unknown_ms\n"
)


class Rollups:
    """Keeps hour_* tables up to date as ticks arrive; progress lives in meta."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._loaded = False  # settings are read from meta on first use
        self._next: int | None = None
        self._thresholds: dict[str, int] = {}

    def forget(self) -> None:
        """After a rollback, progress cached inside it is void: reload it lazily."""
        self._loaded = False

    def set_meta(self, key: str, value: str) -> None:
        """Record a setting or progress marker in meta."""
        self._conn.execute(UPSERT_META, (key, value))

    def _load(self) -> None:
        next_hour = read_meta(self._conn, "rollup_next_hour")
        self._next = int(next_hour) if next_hour is not None else None
        self._thresholds = thresholds(self._conn)
        self._loaded = True

    def before(self, hour: int) -> None:
        """Roll up every hour before `hour` not yet done; redo `hour` if the clock went back."""
        if not self._loaded:
            self._load()
        if self._next is None:
            row = self._conn.execute(SELECT_MIN_TICK_HOUR).fetchone()
            self._next = int(row[0]) if row and row[0] is not None else hour
        if hour > self._next:
            self._roll_up(self._next, hour)
            self._next = hour
            self.set_meta("rollup_next_hour", str(hour))
        elif hour < self._next:
            self._roll_up(hour, hour + 1)

    def _roll_up(self, first_hour: int, end_hour: int) -> None:
        roll_up(self._conn, first_hour, end_hour, self._thresholds)


def roll_up(conn: sqlite3.Connection, first_hour: int, end_hour: int, thresholds: dict[str, int]) -> None:
    """(Re)write every rollup and histogram row of the UTC hours [first_hour, end_hour)."""
    bounds = {"lo": first_hour * HOUR_MS, "hi": end_hour * HOUR_MS}
    for statement in DELETE_ROLLUP:
        conn.execute(statement, bounds)
    conn.executemany(DELETE_GPU_HIST, ({"gpu_id": g, **bounds} for (g,) in conn.execute(SELECT_GPU_IDS).fetchall()))
    pairs = conn.execute(SELECT_HOLDER_PAIRS, bounds).fetchall()
    conn.executemany(DELETE_ACCOUNT_HIST, ((g, a, bounds["lo"], bounds["hi"]) for g, a in pairs))
    for statement in ROLLUPS:
        conn.execute(statement, {**bounds, **thresholds})


def backfill_sm_unknown(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: fill sm_unknown_ms of the rolled-up hours whose raw rows all remain.

    Earlier hours keep 0, which there means "not recorded"; meta
    `sm_unknown_since_hour` tells readers where the column starts to count.
    Runs inside ensure_schema's transaction: a kill leaves schema 1 untouched.
    """
    _backfill(conn, (BACKFILL_ACCOUNT, BACKFILL_UNIT), "sm_unknown_since_hour")


def backfill_hist(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: the histograms of every rolled-up hour whose raw rows all remain.

    Meta `hist_since_hour` tells readers where they start: earlier hours
    have their hourly rollups only (classified with the rollup thresholds,
    placed by UTC hour). Runs inside ensure_schema's transaction.
    """
    _backfill(conn, _HIST_ROLLUPS_V2, "hist_since_hour")


def _backfill(conn: sqlite3.Connection, statements: tuple[str, ...], since_key: str) -> None:
    """Run `statements` over the rolled-up hours whose raw rows all remain; record the first in meta `since_key`."""
    # Retention deletes whole ticks, oldest first, below raw_pruned_before_ms:
    # the hour holding that instant may have lost some, every later hour has
    # them all. (Only a wall clock set back between two prunes could make the
    # meta value smaller than an earlier cut; the hour above it would then get
    # too small an sm_unknown_ms, and still never a changed held_ms.)
    pruned = read_meta(conn, "raw_pruned_before_ms")
    first = -(-int(pruned) // HOUR_MS) if pruned else 0
    next_hour = read_meta(conn, "rollup_next_hour")
    if next_hour is not None and int(next_hour) > first:
        params = {"lo": first * HOUR_MS, "hi": int(next_hour) * HOUR_MS, **thresholds(conn)}
        for statement in statements:
            conn.execute(statement, params)
    conn.execute(UPSERT_META, (since_key, str(first)))


def read_meta(conn: sqlite3.Connection, key: str) -> str | None:
    """A meta value; None when the key is absent."""
    row = conn.execute(SELECT_META, (key,)).fetchone()
    return None if row is None else str(row[0])


def thresholds(conn: sqlite3.Connection) -> dict[str, int]:
    """The rollups' classification parameters (:active permille, :held bytes, :cpu_busy permille)."""
    return {
        "active": int(read_meta(conn, "rollup_active_permille") or schema.ROLLUP_ACTIVE_PERMILLE),
        "held": int(read_meta(conn, "rollup_held_bytes") or schema.ROLLUP_HELD_BYTES),
        "cpu_busy": int(read_meta(conn, "rollup_cpu_busy_permille") or schema.ROLLUP_CPU_BUSY_PERMILLE),
    }
