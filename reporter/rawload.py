"""Raw rows of compacted hours (schema 5), loaded for the report's own SQL.

The collector moves an old hour's gpu_sample and proc_sample rows into one
raw_chunk blob. A report that reads raw rows of such hours (partial edge
hours of a window, thresholds the histograms cannot answer) calls
`ensure(conn, lo, hi)` first: the first time a range holds a compacted
hour, TEMP tables named gpu_sample and proc_sample are created (SQLite
resolves an unqualified name to temp before main), and from then on every
range read is put there: decoded chunks, and the rows still in main. The
queries in query.py and now.py then run unchanged, over exactly the rows the
collector stored. A database without chunks (schemas 1-4, or a young one)
never gets the temp tables: its reads are what they always were.

The temp tables live in the report's connection and transaction only; the
database file is never written. The SQL is here, beside the tables it makes.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator

from . import rawchunk
from .window import HOUR_MS

# Each fact table with its primary key, as collector/schema.py declares it.
FACT_KEYS = {"gpu_sample": ("tick_id", "gpu_id"), "proc_sample": ("tick_id", "gpu_id", "proc_id")}
LOADED = "gua_loaded_hour"  # the UTC hours whose rows the temp tables hold

# Probes that fail with "no such table" on a schema 1-4 database (no
# raw_chunk) and before the first load (no temp tables): no catalogue scan.
Q_ANY_CHUNK_AT_ALL = "SELECT 1 FROM main.raw_chunk LIMIT 1"
# Both ends of tick_ts, a seek each (min() and max() in one SELECT scan the index).
Q_TICK_SPAN = "SELECT (SELECT min(ts_ms) FROM main.tick), (SELECT max(ts_ms) FROM main.tick)"
# The clipped queries look back from a tick by its duration (query._CLIPPED_ROWS).
Q_LONGEST_TICK = "SELECT max(duration_ms) FROM main.tick WHERE ts_ms >= ? AND ts_ms < ?"
Q_ANY_CHUNK = "SELECT 1 FROM main.raw_chunk WHERE hour >= ? AND hour < ? LIMIT 1"  # raw_chunk_hour
Q_LOADED = f"SELECT hour FROM temp.{LOADED} WHERE hour >= ? AND hour < ?"  # no such table: nothing loaded yet
Q_CHUNKS = "SELECT hour, data FROM main.raw_chunk WHERE hour >= ? AND hour < ? ORDER BY hour, chunk_id"
Q_COLUMNS = "SELECT name FROM pragma_table_info(?, 'main') ORDER BY cid"
CREATE_LOADED = f"CREATE TEMP TABLE {LOADED} (hour INTEGER PRIMARY KEY)"
CREATE_FACTS = "CREATE TEMP TABLE {table} ({columns}, PRIMARY KEY ({key})) WITHOUT ROWID"
# Rows still in main for ticks in [?, ?): tick_ts, then the fact table's primary key.
COPY_ROWS = """
INSERT INTO temp.{table} ({columns})
SELECT {columns} FROM main.{table}
WHERE tick_id IN (SELECT tick_id FROM main.tick WHERE ts_ms >= ? AND ts_ms < ?)
"""
INSERT_ROWS = "INSERT INTO temp.{table} ({columns}) VALUES "  # + ROWS_PER_INSERT rows' (?, ...)
ROWS_PER_INSERT = 50  # 500 parameters at most: under SQLite's old limit of 999
INSERT_LOADED = f"INSERT INTO temp.{LOADED} (hour) VALUES (?)"
EVICT = (f"DELETE FROM temp.{LOADED}", "DELETE FROM temp.gpu_sample", "DELETE FROM temp.proc_sample")
MAX_LOADED_HOURS = 31 * 24  # at 8 GPUs ~4M rows, ~150 MB of temp tables


def slices(conn: sqlite3.Connection, lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) in parts of at most MAX_LOADED_HOURS when it reaches compacted hours, else whole.

    For the queries whose rows add up over any split of the range (query.py's
    _state_raw and identity_raw; classify runs its three over each part in
    turn, so each hour is decoded once): the rows loaded for one part are
    dropped before the next, so a year read raw holds a month in temp
    tables, not a year (~2 GB). A range of a month or less stays loaded for
    the queries after it.
    """
    if hi - lo <= MAX_LOADED_HOURS * HOUR_MS or _absent(conn, Q_ANY_CHUNK, (lo // HOUR_MS, -(-hi // HOUR_MS))):
        yield lo, hi
        return
    a = lo
    while a < hi:
        b = min(hi, (a // HOUR_MS + MAX_LOADED_HOURS) * HOUR_MS)
        yield a, b
        _evict(conn)
        a = b


def _evict(conn: sqlite3.Connection) -> None:
    if _absent(conn, Q_LOADED, (0, 1)) is None:
        return
    with _temp_writes(conn):
        for sql in EVICT:
            conn.execute(sql)


def ensure(conn: sqlite3.Connection, lo: int, hi: int, look_back: bool = False) -> None:
    """Make gpu_sample and proc_sample hold every row of the ticks in [lo, hi).

    look_back: also of the ticks a clipped query may reach back to (as far as
    the longest tick in the range). A damaged chunk is sqlite3.DatabaseError
    ("malformed ..."), which the CLI reports as a corrupt database.
    """
    if hi <= lo or _absent(conn, Q_ANY_CHUNK_AT_ALL) is not False:
        return  # no raw_chunk table, or nothing compacted yet: main answers alone, as before schema 5
    first, last = conn.execute(Q_TICK_SPAN).fetchone()
    if first is None:
        return
    if look_back:
        longest = conn.execute(Q_LONGEST_TICK, (lo, hi)).fetchone()[0]
        lo -= longest or 0
    lo, hi = max(lo, first), min(hi, last + 1)  # a window reaching far past the data loops over no empty hours
    if hi <= lo:
        return
    h0, h1 = lo // HOUR_MS, -(-hi // HOUR_MS)
    if _absent(conn, Q_LOADED, (h0, h1)) is None:
        if conn.execute(Q_ANY_CHUNK, (h0, h1)).fetchone() is None:
            return  # main answers this range alone
        with _temp_writes(conn):
            _create(conn)
    done = {row[0] for row in conn.execute(Q_LOADED, (h0, h1))}
    missing = [h for h in range(h0, h1) if h not in done]
    if not missing:
        return
    columns = {table: _columns(conn, table) for table in FACT_KEYS}
    with _temp_writes(conn):
        for a, b in _runs(missing):
            for table, cols in columns.items():
                names = ", ".join(cols)
                conn.execute(COPY_ROWS.format(table=table, columns=names), (a * HOUR_MS, b * HOUR_MS))
            for hour, data in conn.execute(Q_CHUNKS, (a, b)).fetchall():
                _load_chunk(conn, hour, data, columns)
        conn.executemany(INSERT_LOADED, ((h,) for h in missing))


class _temp_writes:
    """query_only lifted for the temp tables' writes only.

    The reporter's connection is query_only on top of opening main
    read-only (mode=ro or immutable): main stays unwritable while it is off.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._was = 0

    def __enter__(self) -> None:
        self._was = int(self._conn.execute("PRAGMA query_only").fetchone()[0])
        self._conn.execute("PRAGMA query_only = OFF")

    def __exit__(self, *exc: object) -> None:
        self._conn.execute(f"PRAGMA query_only = {self._was}")


def _absent(conn: sqlite3.Connection, sql: str, params: tuple[int, ...] = ()) -> bool | None:
    """None when the query's table does not exist; else whether it returns no row."""
    try:
        return conn.execute(sql, params).fetchone() is None
    except sqlite3.OperationalError as error:
        if str(error).startswith("no such table"):
            return None
        raise


def _create(conn: sqlite3.Connection) -> None:
    conn.execute(CREATE_LOADED)
    for table, key in FACT_KEYS.items():
        conn.execute(CREATE_FACTS.format(table=table, columns=", ".join(_columns(conn, table)), key=", ".join(key)))


def _columns(conn: sqlite3.Connection, table: str) -> tuple[str, ...]:
    return tuple(row[0] for row in conn.execute(Q_COLUMNS, (table,)))


def _load_chunk(conn: sqlite3.Connection, hour: int, data: object,
                columns: dict[str, tuple[str, ...]]) -> None:
    def damaged(why: str) -> sqlite3.DatabaseError:
        when = time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(hour * HOUR_MS // 1000))
        return sqlite3.DatabaseError(f"malformed raw_chunk of the hour {when}: {why}")

    if not isinstance(data, bytes):
        raise damaged("not a blob")
    try:
        tables = rawchunk.decode_flat(data)
    except rawchunk.ChunkError as error:
        raise damaged(str(error)) from None
    for table, cols, n, flat in tables:
        if table not in columns or not set(cols) <= set(columns[table]):
            raise damaged(f"rows of an unknown table or column ({table})")
        if not cols:
            continue
        try:
            _insert(conn, table, cols, n, flat)
        except sqlite3.IntegrityError as error:
            raise damaged(f"rows stored twice ({error})") from None


def _insert(conn: sqlite3.Connection, table: str, cols: tuple[str, ...], n: int, flat: list[int | None]) -> None:
    """n rows (flat: their values, row after row) ROWS_PER_INSERT at a time: a third of executemany's time."""
    k = len(cols)
    one = "(" + ", ".join("?" * k) + ")"
    head = INSERT_ROWS.format(table=table, columns=", ".join(cols))
    whole = n - n % ROWS_PER_INSERT
    if whole:
        sql = head + ", ".join([one] * ROWS_PER_INSERT)
        step = ROWS_PER_INSERT * k
        conn.executemany(sql, (flat[i:i + step] for i in range(0, whole * k, step)))
    if whole < n:
        conn.execute(head + ", ".join([one] * (n - whole)), flat[whole * k:])


def _runs(hours: list[int]) -> list[tuple[int, int]]:
    """Consecutive hours as half-open ranges: [1, 2, 3, 7] -> [(1, 4), (7, 8)]."""
    runs: list[tuple[int, int]] = []
    for h in hours:
        if runs and runs[-1][1] == h:
            runs[-1] = (runs[-1][0], h + 1)
        else:
            runs.append((h, h + 1))
    return runs
