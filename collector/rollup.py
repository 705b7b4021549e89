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
           coalesce(sum(ps.sm_util), 0) AS sm
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
       sum(CASE WHEN mem_unknown THEN d ELSE 0 END)
FROM per
WHERE mem_unknown OR mem * 1048576 > :held
GROUP BY hour, gpu_id, account_id {group_unit}
"""
ROLLUP_ACCOUNT = "INSERT INTO hour_account " + _HOLDERS.format(
    unit="''", where="", select_unit="", group_unit=""
)
ROLLUP_UNIT = "INSERT INTO hour_unit " + _HOLDERS.format(
    unit="p.unit", where="AND p.unit != ''", select_unit="unit,", group_unit=", unit"
)


class Rollups:
    """Keeps hour_* tables up to date as ticks arrive; progress lives in meta."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._loaded = False  # settings are read from meta on first use
        self._next: int | None = None
        self._active = schema.ROLLUP_ACTIVE_PERMILLE
        self._held = schema.ROLLUP_HELD_BYTES

    def forget(self) -> None:
        """After a rollback, progress cached inside it is void: reload it lazily."""
        self._loaded = False

    def set_meta(self, key: str, value: str) -> None:
        """Record a setting or progress marker in meta."""
        self._conn.execute(UPSERT_META, (key, value))

    def _load(self) -> None:
        def meta(key: str) -> str | None:
            row = self._conn.execute(SELECT_META, (key,)).fetchone()
            return None if row is None else str(row[0])

        next_hour = meta("rollup_next_hour")
        self._next = int(next_hour) if next_hour is not None else None
        self._active = int(meta("rollup_active_permille") or schema.ROLLUP_ACTIVE_PERMILLE)
        self._held = int(meta("rollup_held_bytes") or schema.ROLLUP_HELD_BYTES)
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
        params = {
            "lo": first_hour * HOUR_MS,
            "hi": end_hour * HOUR_MS,
            "active": self._active,
            "held": self._held,
        }
        for statement in DELETE_ROLLUP:
            self._conn.execute(statement, {"lo": params["lo"], "hi": params["hi"]})
        for statement in (ROLLUP_GPU, ROLLUP_ACCOUNT, ROLLUP_UNIT):
            self._conn.execute(statement, params)
