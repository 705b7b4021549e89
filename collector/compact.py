"""Compaction (schema 5): an old hour's raw rows become one raw_chunk blob.

Rows stay rows while anything reads them often: the collector (rollups, the
hour in progress) and the reports of the last day, which an admin runs at
any threshold without paying for decoding. An hour is compacted once it is
rolled up (rollup_next_hour is past it) and the newest tick is at least
HEAD_HOURS hours later. The blob is decoded and compared with the rows
before they are deleted, in the same transaction: a chunk that would not read
back equal is never written, and its hour stays rows.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from . import rawchunk
from .rollup import HOUR_MS, UPSERT_META, read_meta

# The last day stays rows (see the docstring): on a 90-day database about 1 %
# of the ticks, ~0.6 B more per GPU-tick than compacting all but the last hour.
HEAD_HOURS = 24

# Compaction walks the fact tables' primary keys from meta compact_next_tick:
# the oldest tick that still has rows there, then every tick of its UTC hour
# through tick_ts.
SELECT_OLDEST_LEFT = """
SELECT min(tick_id) FROM (
    SELECT min(tick_id) AS tick_id FROM gpu_sample WHERE tick_id >= :from
    UNION ALL
    SELECT min(tick_id) FROM proc_sample WHERE tick_id >= :from
)
"""
SELECT_TICK_TS = "SELECT ts_ms FROM tick WHERE tick_id = ?"
SELECT_NEWEST_TS = "SELECT max(ts_ms) FROM tick"
SELECT_HOUR_TICKS = "SELECT tick_id FROM tick WHERE ts_ms >= ? AND ts_ms < ? ORDER BY tick_id"
# Rows in primary-key order, the order they read back in.
SELECT_ROWS = {
    "gpu_sample": "SELECT {columns} FROM gpu_sample WHERE tick_id IN (SELECT value FROM json_each(?)) "
                  "ORDER BY tick_id, gpu_id",
    "proc_sample": "SELECT {columns} FROM proc_sample WHERE tick_id IN (SELECT value FROM json_each(?)) "
                   "ORDER BY tick_id, gpu_id, proc_id",
}
# A JSON list of tick_ids' rows, fact tables by primary key (retention's too: store.DELETE_PRUNE).
DELETE_ROWS = (
    "DELETE FROM proc_sample WHERE tick_id IN (SELECT value FROM json_each(?))",
    "DELETE FROM gpu_sample WHERE tick_id IN (SELECT value FROM json_each(?))",
)
INSERT_CHUNK = "INSERT INTO raw_chunk (hour, data) VALUES (?, ?)"
# Retention: a chunk goes once its whole hour is older than the cut (its
# ticks before the cut are deleted with the tick rows; rows without a tick
# row are never read).
DELETE_CHUNKS = "DELETE FROM raw_chunk WHERE hour < ?"


@dataclass(frozen=True)
class Compacted:
    """What one step did: the hour, and why it is still rows when it is (empty: compacted)."""

    hour: int
    rows: int
    kept: str = ""


def last_compactable_hour(newest_ms: int, head_hours: int = HEAD_HOURS) -> int:
    """The newest UTC hour that may be compacted (once rolled up) when the newest tick is at newest_ms."""
    return newest_ms // HOUR_MS - head_hours


def oldest_left(conn: sqlite3.Connection) -> tuple[int, int | None] | None:
    """(tick_id, its ts_ms; None without a tick row) of the oldest row compaction has not passed; None: none."""
    start = int(read_meta(conn, "compact_next_tick") or 0)
    oldest = conn.execute(SELECT_OLDEST_LEFT, {"from": start}).fetchone()[0]
    if oldest is None:
        return None
    ts = conn.execute(SELECT_TICK_TS, (oldest,)).fetchone()
    return oldest, None if ts is None else ts[0]


def compact_oldest(conn: sqlite3.Connection, head_hours: int = HEAD_HOURS) -> Compacted | None:
    """Compact the oldest hour that may be; None when none may. Runs in the caller's transaction.

    head_hours: how many hours up to the newest tick's stay rows (tests compact all with 0).
    """
    left = oldest_left(conn)
    rolled = read_meta(conn, "rollup_next_hour")
    newest = conn.execute(SELECT_NEWEST_TS).fetchone()[0]
    if left is None or rolled is None or newest is None:
        return None
    oldest, ts = left
    if ts is None:  # rows without a tick: nothing reads them; leave them to retention
        _set_meta(conn, "compact_next_tick", oldest + 1)
        return Compacted(-1, 0, "rows without a tick row")
    hour = ts // HOUR_MS
    if hour >= int(rolled) or hour > last_compactable_hour(newest, head_hours):
        return None
    ticks = [row[0] for row in conn.execute(SELECT_HOUR_TICKS, (hour * HOUR_MS, (hour + 1) * HOUR_MS))]
    ids = "[" + ",".join(map(str, ticks)) + "]"
    tables = [rawchunk.Table(name, columns, conn.execute(sql.format(columns=", ".join(columns)), (ids,)).fetchall())
              for name, sql in SELECT_ROWS.items() for columns in [_columns(conn, name)]]
    rows = sum(len(t.rows) for t in tables)
    # Past this hour's ticks, and past the oldest tick's own rows when the
    # clock put it elsewhere (tick_ids follow writing order, ts_ms the clock).
    _set_meta(conn, "compact_next_tick", max(oldest, *ticks) + 1)
    try:
        blob = rawchunk.encode(tables)
        if rawchunk.decode(blob) != tables:
            return Compacted(hour, rows, "the chunk did not read back equal to the rows")
    except rawchunk.ChunkError as error:
        return Compacted(hour, rows, str(error))
    conn.execute(INSERT_CHUNK, (hour, blob))
    for sql in DELETE_ROWS:
        conn.execute(sql, (ids,))
    return Compacted(hour, rows)


def _columns(conn: sqlite3.Connection, table: str) -> tuple[str, ...]:
    return tuple(row[1] for row in conn.execute(f"PRAGMA table_info({table})"))


def _set_meta(conn: sqlite3.Connection, key: str, value: int) -> None:
    conn.execute(UPSERT_META, (key, str(value)))
