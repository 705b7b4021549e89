"""Hourly rollups: classify each finished UTC hour once, as integer sums of the raw facts.

The classification rules are SCHEMA.md's; the reporter uses these rows for
whole hours and raw rows for the rest, so both paths must agree exactly.
Every function runs inside the store's write transaction.
"""

from __future__ import annotations

import sqlite3

from . import schema

HOUR_MS = 3_600_000

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
)
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
           g.coverage_permille, g.energy_mj,
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
INSERT INTO hour_gpu
SELECT hour, gpu_id, count(*), sum(d),
       sum(CASE state WHEN 0 THEN d ELSE 0 END),
       sum(CASE state WHEN 1 THEN d ELSE 0 END),
       sum(CASE state WHEN 2 THEN d ELSE 0 END),
       sum(CASE state WHEN 3 THEN d ELSE 0 END),
       sum(d * coalesce(coverage_permille, 0)),
       sum(CASE state WHEN 0 THEN energy_mj END),
       sum(CASE state WHEN 1 THEN energy_mj END),
       sum(CASE state WHEN 2 THEN energy_mj END)
FROM classified
GROUP BY hour, gpu_id
"""
# Shared by the account and unit rollups: one row per holder per GPU per tick.
# A held tick is exactly one of idle-held (every sm_util known, sum below
# :active), busy (every sm_util known, sum at or above it) or SM unknown (some
# sm_util NULL: MIG, NVML NOT_SUPPORTED). Busy time is held - idle_held -
# sm_unknown; counting unknown SM as busy would hide an idle holder.
# Idle-held time splits again by the holder's CPU over the tick: waiting on
# the CPU (idle_cpu_busy_ms, at least :cpu_busy permille of one core), CPU
# unknown (idle_cpu_unknown_ms), or abandoned (the rest).
_HOLDERS = """
WITH t AS (
    SELECT tick_id, duration_ms AS d, ts_ms / 3600000 AS hour
    FROM tick
    WHERE ts_ms >= :lo AND ts_ms < :hi
),
per AS (
    SELECT t.hour, t.d, ps.gpu_id, p.account_id, {unit} AS unit,
           max(ps.mem_mib IS NULL) AS mem_unknown,
           coalesce(sum(ps.mem_mib), 0) AS mem,
           max(ps.sm_util IS NULL) AS sm_unknown,
           coalesce(sum(ps.sm_util), 0) AS sm,
           -- A process that left during the tick has no CPU reading; it holds nothing either.
           max(ps.cpu_permille IS NULL AND NOT ps.kind & 4) AS cpu_unknown,
           coalesce(sum(ps.cpu_permille), 0) AS cpu
    FROM t
    JOIN proc_sample AS ps USING (tick_id)
    JOIN process AS p USING (proc_id)
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
       sum(CASE WHEN sm_unknown = 0 AND sm * 10 < :active AND cpu_unknown THEN d ELSE 0 END)
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
_ACCOUNT_SELECT = _HOLDERS.format(unit="''", where="", select_unit="", group_unit="")
_UNIT_SELECT = _HOLDERS.format(unit="p.unit", where="AND p.unit != ''", select_unit="unit,", group_unit=", unit")
ROLLUP_ACCOUNT = f"INSERT INTO hour_account ({_ACCOUNT_COLUMNS}){_ACCOUNT_SELECT}"
ROLLUP_UNIT = f"INSERT INTO hour_unit ({_UNIT_COLUMNS}){_UNIT_SELECT}"

# --- schema 1 -> 2: sm_unknown_ms of hours rolled up before it existed --------------
# The same classification, setting only sm_unknown_ms of the rows already there:
# the other columns are left exactly as written. (The SELECT's WHERE clause
# keeps SQLite from reading ON CONFLICT as a join constraint.)
BACKFILL_ACCOUNT = (
    ROLLUP_ACCOUNT
    + "ON CONFLICT (hour, gpu_id, account_id) DO UPDATE SET sm_unknown_ms = excluded.sm_unknown_ms\n"
)
BACKFILL_UNIT = (
    ROLLUP_UNIT
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
        next_hour = _meta(self._conn, "rollup_next_hour")
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
        params = {"lo": first_hour * HOUR_MS, "hi": end_hour * HOUR_MS, **self._thresholds}
        for statement in DELETE_ROLLUP:
            self._conn.execute(statement, {"lo": params["lo"], "hi": params["hi"]})
        for statement in (ROLLUP_GPU, ROLLUP_ACCOUNT, ROLLUP_UNIT):
            self._conn.execute(statement, params)


def backfill_sm_unknown(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: fill sm_unknown_ms of the rolled-up hours whose raw rows all remain.

    Earlier hours keep 0, which there means "not recorded"; meta
    `sm_unknown_since_hour` tells readers where the column starts to count.
    Runs inside ensure_schema's transaction: a kill leaves schema 1 untouched.
    """
    # Retention deletes whole ticks, oldest first, below raw_pruned_before_ms:
    # the hour holding that instant may have lost some, every later hour has
    # them all. (Only a wall clock set back between two prunes could make the
    # meta value smaller than an earlier cut; the hour above it would then get
    # too small an sm_unknown_ms, and still never a changed held_ms.)
    pruned = _meta(conn, "raw_pruned_before_ms")
    first = -(-int(pruned) // HOUR_MS) if pruned else 0
    next_hour = _meta(conn, "rollup_next_hour")
    if next_hour is not None and int(next_hour) > first:
        params = {"lo": first * HOUR_MS, "hi": int(next_hour) * HOUR_MS, **thresholds(conn)}
        for statement in (BACKFILL_ACCOUNT, BACKFILL_UNIT):
            conn.execute(statement, params)
    conn.execute(UPSERT_META, ("sm_unknown_since_hour", str(first)))


def _meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute(SELECT_META, (key,)).fetchone()
    return None if row is None else str(row[0])


def thresholds(conn: sqlite3.Connection) -> dict[str, int]:
    """The rollups' classification parameters (:active permille, :held bytes, :cpu_busy permille)."""
    return {
        "active": int(_meta(conn, "rollup_active_permille") or schema.ROLLUP_ACTIVE_PERMILLE),
        "held": int(_meta(conn, "rollup_held_bytes") or schema.ROLLUP_HELD_BYTES),
        "cpu_busy": int(_meta(conn, "rollup_cpu_busy_permille") or schema.ROLLUP_CPU_BUSY_PERMILLE),
    }
