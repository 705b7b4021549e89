"""Every SQL statement of gua-report, in one place.

The classification rules are those of collector/SCHEMA.md; the raw queries
below must give exactly the integer sums the collector writes into the
hourly rollups (tests/test_report_rollup.py holds them to that). All
aggregation is GROUP BY in SQLite; results are bounded by the number of
GPUs, accounts and heatmap cells (7 x 24), never by the number of ticks.

Windows are half-open `[lo, hi)` over `tick.ts_ms` (index `tick_ts`), and
rollup ranges are half-open `[h0, h1)` over UTC hours (`[q0, q1)` over UTC
quarter hours for quarter_gpu). Rollup tables are read by ranges of their
primary keys, which start with the hour (quarter): no other index is needed.

The histograms (quarter_gpu, hour_account_hist, hour_unit_hist; schema 2)
hold the facts the classification reads, counted but not classified: the
*_hist queries classify them here with the report's thresholds, by the same
rules as the raw queries, so they give the raw queries' numbers exactly
when the active threshold is a whole percent (tests/test_report_hist.py).

Every query of gpu_sample or proc_sample first calls rawload.ensure for its
range: hours the collector compacted (schema 5) are decoded into temp
tables of the same names, and the SQL below reads them unchanged.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from .rawload import ensure, slices
from .window import HOUR_MS, QUARTER_MS, Segment

# Columns of a GPU-state aggregate, in the order both GPU queries return them
# after (gpu_id, cell).
STATE_COLUMNS = (
    "ticks", "total_ms", "active_ms", "held_ms", "idle_ms", "unknown_ms",
    "coverage_pm_ms", "energy_active_mj", "energy_held_mj", "energy_idle_mj",
    "overlap_ms",
    # GPM (schema 3): time with SM activity (tensor activity) known, status 0,
    # and activity x duration; active time with SM activity below the
    # starved rule (Gpm.starved_pm): active but starved.
    "gpm_known_ms", "sm_active_pm_ms", "tensor_known_ms", "tensor_active_pm_ms", "starved_ms",
)
# Columns of an identity aggregate after (gpu_id, account_id, unit).
IDENTITY_COLUMNS = (
    "held_ms", "idle_held_ms", "mem_mib_ms", "unknown_mem_ms", "sm_unknown_ms", "sm_unrecorded_ms",
    "idle_cpu_busy_ms", "idle_cpu_unknown_ms",
    # Busy time (held, SM known, at or above the active threshold) on ticks
    # whose GPU had GPM SM activity known, and on those whose GPU was active
    # but starved.
    "gpm_busy_ms", "starved_ms",
)


class Gpm:
    """Where the database records GPM SM activity, and the starved rule (SCHEMA.md).

    `raw`: gpu_sample has the GPM columns (schema 2). `rollup`: hour_gpu,
    hour_gpu_hist, hour_account and hour_unit have theirs (schema 3).
    `since_ms`: raw rows count GPM from this instant only, as the rollups do
    (hours rolled up before the upgrade to schema 3 hold 0 there: not
    recorded), so that every path gives the same numbers. `starved_pm`: an
    active tick is starved when SM activity is below it (meta
    `starved_sm_permille`, collector/schema.py's STARVED_SM_PERMILLE).
    """

    __slots__ = ("raw", "rollup", "since_ms", "starved_pm", "seen")

    def __init__(self, raw: bool, rollup: bool, since_ms: int, starved_pm: int, seen: bool = True) -> None:
        self.raw = raw
        self.rollup = rollup
        self.since_ms = since_ms
        self.starved_pm = starved_pm
        # Some GPM value was ever stored (meta gpm_first_ms): without one, the
        # raw queries leave the GPM columns out (a fifth of a raw read).
        self.seen = seen


STARVED_SM_PERMILLE = 50  # when meta does not say (collector/schema.py's, recorded in meta)


# What a query called without a Gpm assumes: a database of the current schema,
# GPM counted from its creation. Every reader passes the database's own.
CURRENT_GPM = Gpm(True, True, 0, STARVED_SM_PERMILLE)


def _gpm(gpm: Gpm | None) -> Gpm:
    return gpm if gpm is not None else CURRENT_GPM


def gpm_facts(conn: sqlite3.Connection, meta_: dict[str, str] | None = None) -> Gpm:
    """The database's Gpm, from its columns and meta."""
    if meta_ is None:
        meta_ = meta(conn)

    def has(table: str, column: str) -> bool:
        return conn.execute("SELECT 1 FROM pragma_table_info(?) WHERE name = ?", (table, column)).fetchone() \
            is not None

    raw = has("gpu_sample", "sm_active_permille")
    rollup = has("hour_gpu", "gpm_known_ms")
    try:
        # Rollups without the columns (schema 2): GPM counts from the next hour to roll up.
        since = int(meta_.get("gpm_since_hour" if rollup else "rollup_next_hour", "0"))
        starved = int(meta_.get("starved_sm_permille", str(STARVED_SM_PERMILLE)))
    except ValueError:
        since, starved = 0, STARVED_SM_PERMILLE
    # Schema 2 databases had no note: GPM may be there.
    seen = "gpm_first_ms" in meta_ or not rollup
    return Gpm(raw, rollup, max(since, 0) * HOUR_MS, starved, seen)


def _gpm_rows(gpm: Gpm, ts_expr: str, g: str = "g") -> str:
    """A raw row's `sm` and `tc`: GPM SM and tensor activity where counted (status 0, from gpm.since_ms), else NULL."""
    if not (gpm.raw and gpm.seen):
        return "NULL AS sm, NULL AS tc"
    when = f"{g}.status = 0 AND {ts_expr} >= {int(gpm.since_ms)}"
    return (f"CASE WHEN {when} THEN {g}.sm_active_permille END AS sm, "
            f"CASE WHEN {when} THEN {g}.tensor_active_permille END AS tc")


# ---------------------------------------------------------------- helpers

def _in_clause(column: str, ids: Sequence[int] | None) -> str:
    """`AND column IN (1,2)` for a GPU filter; ids are ints we looked up."""
    if ids is None:
        return ""
    if not ids:
        return " AND 0"
    return f" AND {column} IN ({','.join(str(int(i)) for i in ids)})"


def _not_in(column: str, values: Sequence[int]) -> str:
    """`AND column NOT IN (...)` for hours we computed ('' when there are none); column may be an expression."""
    if not values:
        return ""
    return f" AND {column} NOT IN ({','.join(str(int(v)) for v in values)})"


def cell_expr(ts_expr: str, segments: Sequence[Segment] | None) -> str:
    """SQL for the heatmap cell (weekday * 24 + local hour, Monday = 0).

    The local hour number is (ts + offset) / 3600000 with the offset chosen
    by a CASE over the zone's segments; day 0 (1970-01-01) was a Thursday,
    hence the + 3. None -> a constant 0 (no heatmap wanted from this query).
    """
    if not segments:
        return "0"
    if len(segments) == 1:
        off = str(segments[0].offset_ms)
    else:
        whens = " ".join(
            f"WHEN {ts_expr} < {int(s.start_ms)} THEN {int(prev.offset_ms)}"
            for prev, s in zip(segments, segments[1:])
        )
        off = f"(CASE {whens} ELSE {int(segments[-1].offset_ms)} END)"
    local_hour = f"(({ts_expr}) + {off}) / {HOUR_MS}"
    return f"((({local_hour}) / 24 + 3) % 7) * 24 + ({local_hour}) % 24"


# ---------------------------------------------------------------- dimensions

class GpuRow:
    """One row of the gpu table (a plain class: dataclasses cost start-up time)."""

    __slots__ = ("gpu_id", "uuid", "index", "name", "memory_total", "parent_id", "mig_slot")

    def __init__(self, gpu_id: int, uuid: str, index: int, name: str, memory_total: int | None,
                 parent_id: int | None, mig_slot: int | None) -> None:
        self.gpu_id = gpu_id
        self.uuid = uuid
        self.index = index
        self.name = name
        self.memory_total = memory_total
        self.parent_id = parent_id
        self.mig_slot = mig_slot


def gpus(conn: sqlite3.Connection) -> list[GpuRow]:
    rows = conn.execute(
        """
        SELECT gpu_id, uuid, gpu_index, name, memory_total, parent_id, mig_slot
        FROM gpu
        ORDER BY gpu_index, parent_id IS NOT NULL, mig_slot, gpu_id
        """
    ).fetchall()
    return [GpuRow(*r) for r in rows]


def accounts(conn: sqlite3.Connection) -> dict[int, tuple[int | None, str]]:
    """account_id -> (uid, username)."""
    return {
        r[0]: (r[1], r[2])
        for r in conn.execute("SELECT account_id, uid, username FROM account")
    }


def meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


# ---------------------------------------------------------------- GPU state

# The aggregate both raw GPU queries share, over a subquery of classified rows
# (gpu_id, cell, d = counted duration, cov, e = energy, st = state, cut =
# duration not counted because an earlier tick of the GPU covered it).
_STATE_SUMS = """
        SELECT gpu_id, cell,
               count(*),
               sum(d),
               sum(CASE st WHEN 0 THEN d ELSE 0 END),
               sum(CASE st WHEN 1 THEN d ELSE 0 END),
               sum(CASE st WHEN 2 THEN d ELSE 0 END),
               sum(CASE st WHEN 3 THEN d ELSE 0 END),
               sum(CASE WHEN cov IS NOT NULL THEN d * cov ELSE 0 END),
               sum(CASE st WHEN 0 THEN e END),
               sum(CASE st WHEN 1 THEN e END),
               sum(CASE st WHEN 2 THEN e END),
               sum(cut),
               {gpm_sums}
        FROM ({rows}
            LIMIT -1  -- no limit; it stops SQLite flattening this subquery, which
                      -- would evaluate `st` (and its subquery) once per sum()
        )
        GROUP BY gpu_id, cell
"""
_GPM_SUMS = """sum(CASE WHEN sm IS NOT NULL THEN d ELSE 0 END),
               sum(CASE WHEN sm IS NOT NULL THEN d * sm ELSE 0 END),
               sum(CASE WHEN tc IS NOT NULL THEN d ELSE 0 END),
               sum(CASE WHEN tc IS NOT NULL THEN d * tc ELSE 0 END),
               sum(CASE WHEN st = 0 AND sm < {starved} THEN d ELSE 0 END)"""


def _state_sums(rows: str, gpm: Gpm) -> str:
    """_STATE_SUMS over `rows`; the GPM sums are 0 where no GPM value was ever stored (8 % of a raw read)."""
    gpm_sums = _GPM_SUMS.format(starved=int(gpm.starved_pm)) if gpm.raw and gpm.seen else "0, 0, 0, 0, 0"
    return _STATE_SUMS.format(rows=rows, gpm_sums=gpm_sums)


# gpu_sample's coverage: schema 3 stores NULL for full coverage (1000) when
# util_permille is known; rows of schemas 1 and 2 read as stored.
_COVERAGE = "coalesce(g.coverage_permille, CASE WHEN g.util_permille IS NOT NULL THEN 1000 END)"

# The state of one gpu_sample row `g`. The held test is a correlated subquery
# on proc_sample's primary key (tick_id, gpu_id, ...), evaluated only for ok
# rows below the active threshold (CASE is lazy). Held: a compute process
# with unknown memory, or compute memory in total above the threshold;
# graphics-only processes (Xorg) never hold a card.
_STATE_CASE = """CASE
                       WHEN g.status != 0 OR g.util_permille IS NULL THEN 3
                       WHEN g.util_permille >= :active THEN 0
                       WHEN (SELECT count(*) > count(ps.mem_mib)
                                    OR total(ps.mem_mib) * 1048576 > :held
                             FROM proc_sample AS ps
                             WHERE ps.tick_id = g.tick_id
                               AND ps.gpu_id = g.gpu_id
                               AND ps.kind & 1) THEN 1
                       ELSE 2
                   END"""


def gpu_state_raw(
    conn: sqlite3.Connection, lo: int, hi: int, active_pm: int, held_bytes: int,
    gpu_ids: Sequence[int] | None, segments: Sequence[Segment] | None, gpm: Gpm | None = None,
) -> list[tuple]:
    """Classify raw gpu_sample rows; one row per (gpu_id, heatmap cell).

    Columns after (gpu_id, cell): STATE_COLUMNS. Every tick counts its whole
    duration: for time where ticks overlap use gpu_state_clipped.
    """
    return _state_raw(conn, lo, hi, active_pm, held_bytes, gpu_ids, cell_expr("t.ts_ms", segments), gpm)


def _state_raw(
    conn: sqlite3.Connection, lo: int, hi: int, active_pm: int, held_bytes: int,
    gpu_ids: Sequence[int] | None, cell: str, gpm: Gpm | None,
) -> list[tuple]:
    """gpu_state_raw with `cell` (an SQL expression of t.ts_ms) as the cell key."""
    gpm = _gpm(gpm)
    rows = f"""
            SELECT g.gpu_id AS gpu_id,
                   t.duration_ms AS d,
                   {_COVERAGE} AS cov,
                   g.energy_mj AS e,
                   {_gpm_rows(gpm, 't.ts_ms')},
                   0 AS cut,
                   {cell} AS cell,
                   {_STATE_CASE} AS st
            FROM tick AS t
            JOIN gpu_sample AS g ON g.tick_id = t.tick_id
            WHERE t.ts_ms >= :lo AND t.ts_ms < :hi{_in_clause('g.gpu_id', gpu_ids)}"""
    sql = _state_sums(rows, gpm)
    return _by_slices(conn, lo, hi, sql, {"active": active_pm, "held": held_bytes})


def _by_slices(conn: sqlite3.Connection, lo: int, hi: int, sql: str, params: dict[str, int]) -> list[tuple]:
    """The rows of `sql` over [:lo, :hi), run on rawload's slices of the range when it is long.

    For queries whose rows add up over any split of the range: the callers
    sum rows with the same key, so the slices' rows are simply concatenated.
    """
    out: list[tuple] = []
    for a, b in slices(conn, lo, hi):
        ensure(conn, a, b)
        out += conn.execute(sql, {**params, "lo": a, "hi": b}).fetchall()
    return out


def _rollup_gpm(gpm: Gpm | None, conn: sqlite3.Connection, hist: bool = False) -> str:
    """hour_gpu's (hour_gpu_hist's) GPM sums in STATE_COLUMNS order; zeros without the columns."""
    if not _gpm(gpm).rollup:
        return "0, 0, 0, 0, 0"
    starved = "sum(CASE WHEN util_pct >= :a_pct THEN gpm_low_ms ELSE 0 END)" if hist else "sum(starved_ms)"
    return f"sum(gpm_known_ms), sum(sm_active_pm_ms), sum(tensor_known_ms), sum(tensor_active_pm_ms), {starved}"


def gpu_state_rollup(
    conn: sqlite3.Connection, h0: int, h1: int,
    gpu_ids: Sequence[int] | None, segments: Sequence[Segment] | None,
    skip_hours: Sequence[int] = (), gpm: Gpm | None = None,
) -> list[tuple]:
    """The same aggregate from hour_gpu, for whole UTC hours [h0, h1) but `skip_hours`."""
    sql = f"""
        SELECT gpu_id, {cell_expr(f'hour * {HOUR_MS}', segments)} AS cell,
               sum(ticks), sum(total_ms), sum(active_ms), sum(held_ms),
               sum(idle_ms), sum(unknown_ms), sum(coverage_pm_ms),
               sum(energy_active_mj), sum(energy_held_mj), sum(energy_idle_mj),
               0, {_rollup_gpm(gpm, conn)}
        FROM hour_gpu
        WHERE hour >= :h0 AND hour < :h1{_in_clause('gpu_id', gpu_ids)}{_not_in('hour', skip_hours)}
        GROUP BY gpu_id, cell
    """
    return conn.execute(sql, {"h0": h0, "h1": h1}).fetchall()


# A hour_gpu_hist row is active when util_pct >= :a_pct (util_permille >= 10 * a
# exactly when util_permille / 10 >= a), else held when its memory is unknown
# (-1) or above the held threshold, else idle; unknown when util_pct is -1.
# The same rules as _STATE_CASE. Memory is whole MiB, so `mem_mib * 1048576 >
# held_bytes` is `mem_mib > held_bytes // 1048576` (:held_mib), one multiply
# less for every row.
_HIST_HELD = "(mem_mib < 0 OR mem_mib > :held_mib)"


def gpu_state_hist(
    conn: sqlite3.Connection, h0: int, h1: int, active_pm: int, held_bytes: int,
    gpu_ids: Sequence[int], skip_hours: Sequence[int] = (), gpm: Gpm | None = None,
) -> list[tuple]:
    """gpu_state_rollup's rows (without heatmap cells: cell 0) from hour_gpu_hist, for `gpu_ids`.

    Classified with these thresholds; `active_pm` must be a whole percent (a
    multiple of 10), and then the numbers are those of gpu_state_raw over the
    same hours. The table is keyed by GPU first: with the GPUs named, SQLite
    reads one key range per GPU and sums as it reads, unsorted. The heatmap
    is a query of its own (heat_hours, heat_quarters): summing both in one
    GROUP BY gpu_id, cell would sort every row.
    """
    return _hist_states(conn, h0, h1, active_pm, held_bytes, gpu_ids, skip_hours, gpm, per_hour=False)


def _hist_states(
    conn: sqlite3.Connection, h0: int, h1: int, active_pm: int, held_bytes: int,
    gpu_ids: Sequence[int], skip_hours: Sequence[int], gpm: Gpm | None, per_hour: bool,
) -> list[tuple]:
    """hour_gpu_hist classified: per GPU (cell 0), or per GPU and UTC hour (in the key's order, unsorted)."""
    assert active_pm % 10 == 0, active_pm
    active = "util_pct >= :a_pct"
    held = f"util_pct >= 0 AND util_pct < :a_pct AND {_HIST_HELD}"
    idle = f"util_pct >= 0 AND util_pct < :a_pct AND NOT {_HIST_HELD}"
    sql = f"""
        SELECT gpu_id, {"hour" if per_hour else "0 AS cell"},
               sum(ticks),
               sum(ms),
               sum(CASE WHEN {active} THEN ms ELSE 0 END),
               sum(CASE WHEN {held} THEN ms ELSE 0 END),
               sum(CASE WHEN {idle} THEN ms ELSE 0 END),
               sum(CASE WHEN util_pct < 0 THEN ms ELSE 0 END),
               sum(coverage_pm_ms),
               sum(CASE WHEN {active} THEN energy_mj END),
               sum(CASE WHEN {held} THEN energy_mj END),
               sum(CASE WHEN {idle} THEN energy_mj END),
               0, {_rollup_gpm(gpm, conn, hist=True)}
        FROM hour_gpu_hist
        WHERE hour >= :h0 AND hour < :h1{_in_clause('gpu_id', gpu_ids)}{_not_in('hour', skip_hours)}
        GROUP BY gpu_id{", hour" if per_hour else ""}
    """
    return conn.execute(sql, {"h0": h0, "h1": h1, "a_pct": active_pm // 10,
                              "held_mib": held_bytes // 1_048_576}).fetchall()


def heat_hours(
    conn: sqlite3.Connection, h0: int, h1: int, active_pm: int,
    gpu_ids: Sequence[int], segments: Sequence[Segment], skip_hours: Sequence[int] = (),
) -> list[tuple[int, int, int]]:
    """(cell, active_ms, known_ms) over `gpu_ids` from hour_gpu_hist, for UTC hours [h0, h1).

    The heatmap at another active threshold, in a zone whose hours are UTC
    hours. `active_pm` must be a whole percent.
    """
    assert active_pm % 10 == 0, active_pm
    sql = f"""
        SELECT {cell_expr(f'hour * {HOUR_MS}', segments)} AS cell,
               sum(CASE WHEN util_pct >= :a_pct THEN ms ELSE 0 END),
               sum(CASE WHEN util_pct >= 0 THEN ms ELSE 0 END)
        FROM hour_gpu_hist
        WHERE hour >= :h0 AND hour < :h1{_in_clause('gpu_id', gpu_ids)}{_not_in('hour', skip_hours)}
        GROUP BY cell
    """
    return conn.execute(sql, {"h0": h0, "h1": h1, "a_pct": active_pm // 10}).fetchall()


def heat_quarters(
    conn: sqlite3.Connection, q0: int, q1: int, active_pm: int,
    gpu_ids: Sequence[int], segments: Sequence[Segment], skip_hours: Sequence[int] = (),
) -> list[tuple[int, int, int]]:
    """(cell, active_ms, known_ms) over `gpu_ids` from quarter_gpu, for UTC quarter hours [q0, q1).

    The heatmap alone, in a zone whose hours are not UTC hours: a quarter
    hour is placed exactly when the zone's offsets, and the instants they
    change, are whole quarter hours. `active_pm` must be a whole percent.
    In two steps: the inner GROUP BY follows the primary key (quarter first)
    as SQLite reads it, into one row per quarter hour; the outer one sorts
    only those, a fraction of the histogram's rows.
    """
    assert active_pm % 10 == 0, active_pm
    sql = f"""
        SELECT {cell_expr(f'quarter * {QUARTER_MS}', segments)} AS cell, sum(active), sum(known)
        FROM (
            SELECT quarter,
                   sum(CASE WHEN util_pct >= :a_pct THEN ms ELSE 0 END) AS active,
                   sum(ms) AS known
            FROM quarter_gpu
            WHERE quarter >= :q0 AND quarter < :q1{_in_clause('gpu_id', gpu_ids)}{_not_in('quarter / 4', skip_hours)}
            GROUP BY quarter
        )
        GROUP BY cell
    """
    return conn.execute(sql, {"q0": q0, "q1": q1, "a_pct": active_pm // 10}).fetchall()


# ---------------------------------------------------------------- identities

# The aggregate both raw identity queries share, over one row per holder per
# GPU per tick: (gpu_id, account_id, unit, ts, d = counted duration,
# mem_null, mem, sm_null, sm).
_IDENTITY_SUMS = """
        SELECT gpu_id, account_id, unit,
               sum(d),
               sum(CASE WHEN NOT sm_null AND sm * 10 < :active THEN d ELSE 0 END),
               sum(mem * d),
               sum(CASE WHEN mem_null THEN d ELSE 0 END),
               sum(CASE WHEN sm_null AND ts >= :sm_since THEN d ELSE 0 END),
               sum(CASE WHEN ts < :sm_since THEN d ELSE 0 END),
               sum(CASE WHEN NOT sm_null AND sm * 10 < :active AND NOT cpu_null AND cpu >= :cpu_busy
                        THEN d ELSE 0 END),
               sum(CASE WHEN NOT sm_null AND sm * 10 < :active AND cpu_null THEN d ELSE 0 END),
               {gpm_sums}
        FROM ({rows}
        )
        WHERE mem_null OR mem * 1048576 > :held
        GROUP BY gpu_id, account_id, unit
"""


_HOLDER_GPM_SUMS = """sum(CASE WHEN NOT sm_null AND sm * 10 >= :active AND gpm_known THEN d ELSE 0 END),
               sum(CASE WHEN NOT sm_null AND sm * 10 >= :active AND gpu_starved THEN d ELSE 0 END)"""


def _identity_sums(rows: str, gpm: Gpm) -> str:
    """_IDENTITY_SUMS over `rows`; the GPM sums are 0 where no GPM value was ever stored."""
    return _IDENTITY_SUMS.format(rows=rows, gpm_sums=_HOLDER_GPM_SUMS if gpm.raw and gpm.seen else "0, 0")


def _holder_gpm(gpm: Gpm, ts_expr: str) -> tuple[str, str]:
    """(columns, join): whether the holder's GPU had GPM SM activity known in the tick, and was starved.

    The GPU's row by gpu_sample's primary key, one per (tick, GPU): max() carries it.
    """
    if not (gpm.raw and gpm.seen):
        return "0 AS gpm_known, 0 AS gpu_starved", ""
    when = f"gs.status = 0 AND {ts_expr} >= {int(gpm.since_ms)}"
    return (f"""max({when} AND gs.sm_active_permille IS NOT NULL) AS gpm_known,
                   max({when} AND gs.util_permille >= :active
                       AND gs.sm_active_permille < {int(gpm.starved_pm)}) AS gpu_starved""",
            "\n            JOIN gpu_sample AS gs ON gs.tick_id = ps.tick_id AND gs.gpu_id = ps.gpu_id")


def _holder_columns(unit_col: str, has_cpu: bool) -> str:
    """Per (tick, GPU, account[, unit]): its compute processes' memory, SM and CPU, as the rollups sum them.

    CPU is that of the processes still running at the end of the tick (a
    row of one that left, kind & 4, has none). Schema 1 recorded no CPU:
    unknown throughout.
    """
    cpu = ("""max(ps.cpu_permille IS NULL AND NOT ps.kind & 4) AS cpu_null,
                   coalesce(sum(ps.cpu_permille), 0) AS cpu""" if has_cpu else "1 AS cpu_null, 0 AS cpu")
    return f"""ps.gpu_id AS gpu_id,
                   p.account_id AS account_id,
                   {unit_col} AS unit,
                   count(*) > count(ps.mem_mib) AS mem_null,
                   coalesce(sum(ps.mem_mib), 0) AS mem,
                   count(*) > count(ps.sm_util) AS sm_null,
                   coalesce(sum(ps.sm_util), 0) AS sm,
                   {cpu}"""


def identity_raw(
    conn: sqlite3.Connection, lo: int, hi: int, active_pm: int, held_bytes: int,
    gpu_ids: Sequence[int] | None, by_unit: bool, sm_since_ms: int = 0, cpu_busy_pm: int = 100,
    has_cpu: bool = True, gpm: Gpm | None = None,
) -> list[tuple]:
    """Per-account (or per account+unit) use of each GPU, from raw rows.

    Rows: (gpu_id, account_id, unit, *IDENTITY_COLUMNS). The inner GROUP BY
    makes an account count once per GPU and tick however many processes it
    has there; only compute processes count. A held tick is idle-held (every
    sm_util known, their sum below the active threshold, whatever the card as
    a whole did), busy (all known, at or above it) or SM unknown (any NULL).

    SM-unknown time counts only from `sm_since_ms` on: before it the rollups
    do not record it (schema 1), and both paths must give the same numbers;
    held time before it is returned as `sm_unrecorded_ms` instead.
    Idle-held time splits by the holder's CPU in the tick: waiting on CPU
    (`idle_cpu_busy_ms`: every running process's CPU known, together at
    least `cpu_busy_pm` permille of one core), CPU unknown, or abandoned (the
    rest). `has_cpu` False: a schema 1 database, without CPU columns.
    Every tick counts its whole duration: where ticks overlap use identity_clipped.
    """
    unit_col = "p.unit" if by_unit else "''"
    unit_where = " AND p.unit != ''" if by_unit else ""
    gpm_cols, gpm_join = _holder_gpm(_gpm(gpm), "t.ts_ms")
    rows = f"""
            SELECT {_holder_columns(unit_col, has_cpu)},
                   {gpm_cols},
                   t.ts_ms AS ts,
                   t.duration_ms AS d
            FROM tick AS t
            JOIN proc_sample AS ps ON ps.tick_id = t.tick_id
            JOIN process AS p ON p.proc_id = ps.proc_id{gpm_join}
            WHERE t.ts_ms >= :lo AND t.ts_ms < :hi
              AND ps.kind & 1{unit_where}{_in_clause('ps.gpu_id', gpu_ids)}
            GROUP BY ps.tick_id, ps.gpu_id, p.account_id, {unit_col}"""
    sql = _identity_sums(rows, _gpm(gpm))
    return _by_slices(conn, lo, hi, sql, {"active": active_pm, "held": held_bytes, "sm_since": sm_since_ms,
                                          "cpu_busy": cpu_busy_pm})


def identity_rollup(
    conn: sqlite3.Connection, h0: int, h1: int, gpu_ids: Sequence[int] | None, by_unit: bool,
    sm_since_ms: int = 0, has_sm_unknown: bool = True, skip_hours: Sequence[int] = (),
    gpm: Gpm | None = None,
) -> list[tuple]:
    """The same rows from hour_account / hour_unit for whole UTC hours [h0, h1) but `skip_hours`.

    `has_sm_unknown` False: a schema 1 database, without the column (then
    `sm_since_ms` is at or after h1, so no hour reads it), nor CPU: all its
    idle-held time is CPU unknown, as the raw rows of schema 1 say.
    """
    table, unit_col = ("hour_unit", "unit") if by_unit else ("hour_account", "''")
    sm_col = "sm_unknown_ms" if has_sm_unknown else "0"
    cpu_cols = "sum(idle_cpu_busy_ms), sum(idle_cpu_unknown_ms)" if has_sm_unknown else "0, sum(idle_held_ms)"
    gpm_cols = "sum(gpm_busy_ms), sum(starved_ms)" if _gpm(gpm).rollup else "0, 0"
    sql = f"""
        SELECT gpu_id, account_id, {unit_col} AS unit,
               sum(held_ms), sum(idle_held_ms), sum(mem_mib_ms), sum(unknown_mem_ms),
               sum(CASE WHEN hour >= :sm_since / {HOUR_MS} THEN {sm_col} ELSE 0 END),
               sum(CASE WHEN hour < :sm_since / {HOUR_MS} THEN held_ms ELSE 0 END),
               {cpu_cols},
               {gpm_cols}
        FROM {table}
        WHERE hour >= :h0 AND hour < :h1{_in_clause('gpu_id', gpu_ids)}{_not_in('hour', skip_hours)}
        GROUP BY gpu_id, account_id, unit
    """
    return conn.execute(sql, {"h0": h0, "h1": h1, "sm_since": sm_since_ms}).fetchall()


def identity_hist(
    conn: sqlite3.Connection, h0: int, h1: int, active_pm: int, held_bytes: int,
    gpu_ids: Sequence[int], account_ids: Sequence[int], by_unit: bool, skip_hours: Sequence[int] = (),
) -> list[tuple]:
    """identity_rollup's rows from hour_account_hist / hour_unit_hist, classified with these thresholds.

    Exact for any thresholds: a holder's SM and memory are integers (percent,
    MiB). A row is held when its memory is unknown (-1) or above the held
    threshold; idle-held when also its SM is known (>= 0) and below :active.
    An identity is listed on a GPU when it held it in any row, as the raw
    query lists it when any held tick remains (even one of duration 0).
    Histograms exist only for hours that record SM-unknown time (meta
    hist_since_hour >= sm_unknown_since_hour): sm_unrecorded_ms is 0. A
    row's CPU split (cpu_busy_ms, cpu_unknown_ms) is that of its idle-held
    time when the row is idle-held: all its ticks share its SM and memory.
    hour_account_hist is keyed by GPU and account first: with both named
    (`gpu_ids`, `account_ids`), SQLite reads one key range per pair and sums
    as it reads. hour_unit_hist is keyed by hour (units are many): sorted.
    """
    table, unit_col = ("hour_unit_hist", "unit") if by_unit else ("hour_account_hist", "''")
    accounts = "" if by_unit else _in_clause("account_id", account_ids)
    sql = f"""
        SELECT gpu_id, account_id, {unit_col} AS unit,
               sum(CASE WHEN {_HIST_HELD} THEN ms ELSE 0 END),
               sum(CASE WHEN {_HIST_HELD} AND sm_pct >= 0 AND sm_pct * 10 < :active THEN ms ELSE 0 END),
               sum(CASE WHEN {_HIST_HELD} THEN mem_mib_ms ELSE 0 END),
               sum(CASE WHEN mem_mib < 0 THEN ms ELSE 0 END),
               sum(CASE WHEN {_HIST_HELD} AND sm_pct < 0 THEN ms ELSE 0 END),
               0,
               sum(CASE WHEN {_HIST_HELD} AND sm_pct >= 0 AND sm_pct * 10 < :active THEN cpu_busy_ms ELSE 0 END),
               sum(CASE WHEN {_HIST_HELD} AND sm_pct >= 0 AND sm_pct * 10 < :active THEN cpu_unknown_ms ELSE 0 END),
               0, 0  -- busy time on a starved GPU: not in the histograms (Report.identity_starved_known)
        FROM {table}
        WHERE hour >= :h0 AND hour < :h1{_in_clause('gpu_id', gpu_ids)}{accounts}{_not_in('hour', skip_hours)}
        GROUP BY gpu_id, account_id{", unit" if by_unit else ""}  -- '' is no key column: it would cost a sort
        HAVING max({_HIST_HELD})
    """
    return conn.execute(sql, {"h0": h0, "h1": h1, "active": active_pm,
                              "held_mib": held_bytes // 1_048_576}).fetchall()


# ---------------------------------------------------------------- overlapping ticks
#
# Older collectors stored ticks that cover the same time twice: the wall
# clock stepped back inside a run, or a run replayed times already stored.
# Summing their durations would count that time twice (more GPU time than
# GPUs x window). Where ticks overlap, each GPU's row counts only the part of
# its interval (ts - d, ts] after the previous tick of that GPU in
# (ts_ms, tick_id) order: (max(ts - d, prev), ts]. Those intervals never
# overlap, so an instant is counted at most once per GPU; with equal tick
# durations exactly once. Which hours get this treatment is decided per UTC
# hour in classify.py (find_overlap), from the hourly sums.

# One row per gpu_sample in [:lo, :hi) with `d` its counted duration (clipped
# as above) and `cut` the part not counted. The previous tick of the GPU comes
# from lag() inside the range; for the GPU's first row in the range, from a
# backwards walk on tick_ts from :lo that stops at the row's own start (a
# tick ending before it cannot overlap it), with gpu_sample's primary key.
_CLIPPED_ROWS = """
    WITH ordered AS (
        SELECT t.tick_id AS tick_id, g.gpu_id AS gpu_id, t.ts_ms AS ts, t.duration_ms AS full_d,
               lag(t.ts_ms) OVER (PARTITION BY g.gpu_id ORDER BY t.ts_ms, t.tick_id) AS prev
        FROM tick AS t
        JOIN gpu_sample AS g ON g.tick_id = t.tick_id
        WHERE t.ts_ms >= :lo AND t.ts_ms < :hi{gpu_filter}
    ),
    clipped AS (
        SELECT tick_id, gpu_id, ts, full_d,
               min(full_d, ts - coalesce(prev, (
                   SELECT b.ts_ms
                   FROM tick AS b
                   JOIN gpu_sample AS bg ON bg.tick_id = b.tick_id AND bg.gpu_id = ordered.gpu_id
                   WHERE b.ts_ms < :lo AND b.ts_ms > ordered.ts - ordered.full_d
                   ORDER BY b.ts_ms DESC
                   LIMIT 1
               ), ts - full_d)) AS d
        FROM ordered
    )"""


def gpu_state_clipped(
    conn: sqlite3.Connection, lo: int, hi: int, active_pm: int, held_bytes: int,
    gpu_ids: Sequence[int] | None, segments: Sequence[Segment] | None, gpm: Gpm | None = None,
) -> list[tuple]:
    """gpu_state_raw for [lo, hi), counting each GPU's time once where ticks overlap.

    A row's energy is scaled to the part of its duration that counts (integer
    division), so energy by state goes with the time it is reported with.
    """
    return _state_clipped(conn, lo, hi, active_pm, held_bytes, gpu_ids, cell_expr("c.ts", segments), gpm)


def _state_clipped(
    conn: sqlite3.Connection, lo: int, hi: int, active_pm: int, held_bytes: int,
    gpu_ids: Sequence[int] | None, cell: str, gpm: Gpm | None,
) -> list[tuple]:
    """gpu_state_clipped with `cell` (an SQL expression of c.ts) as the cell key."""
    ensure(conn, lo, hi, look_back=True)
    gpm = _gpm(gpm)
    rows = f"""
            SELECT c.gpu_id AS gpu_id,
                   c.d AS d,
                   {_COVERAGE} AS cov,
                   CASE WHEN c.d = c.full_d THEN g.energy_mj
                        ELSE g.energy_mj * c.d / c.full_d END AS e,
                   {_gpm_rows(gpm, 'c.ts')},
                   c.full_d - c.d AS cut,
                   {cell} AS cell,
                   {_STATE_CASE} AS st
            FROM clipped AS c
            JOIN gpu_sample AS g ON g.tick_id = c.tick_id AND g.gpu_id = c.gpu_id"""
    sql = (_CLIPPED_ROWS.format(gpu_filter=_in_clause('g.gpu_id', gpu_ids))
           + _state_sums(rows, gpm))
    return conn.execute(sql, {"lo": lo, "hi": hi, "active": active_pm, "held": held_bytes}).fetchall()


def identity_clipped(
    conn: sqlite3.Connection, lo: int, hi: int, active_pm: int, held_bytes: int,
    gpu_ids: Sequence[int] | None, by_unit: bool, sm_since_ms: int = 0, cpu_busy_pm: int = 100,
    has_cpu: bool = True, gpm: Gpm | None = None,
) -> list[tuple]:
    """identity_raw for [lo, hi), with each GPU's tick counted as in gpu_state_clipped."""
    ensure(conn, lo, hi, look_back=True)
    unit_col = "p.unit" if by_unit else "''"
    unit_where = " AND p.unit != ''" if by_unit else ""
    gpm_cols, gpm_join = _holder_gpm(_gpm(gpm), "c.ts")
    rows = f"""
            SELECT {_holder_columns(unit_col, has_cpu)},
                   {gpm_cols},
                   c.ts AS ts,
                   c.d AS d
            FROM clipped AS c
            JOIN proc_sample AS ps ON ps.tick_id = c.tick_id AND ps.gpu_id = c.gpu_id
            JOIN process AS p ON p.proc_id = ps.proc_id{gpm_join}
            WHERE ps.kind & 1{unit_where}
            GROUP BY ps.tick_id, ps.gpu_id, p.account_id, {unit_col}"""
    sql = _CLIPPED_ROWS.format(gpu_filter=_in_clause('g.gpu_id', gpu_ids)) + _identity_sums(rows, _gpm(gpm))
    return conn.execute(sql, {"lo": lo, "hi": hi, "active": active_pm, "held": held_bytes,
                              "sm_since": sm_since_ms, "cpu_busy": cpu_busy_pm}).fetchall()


_GPU_HOUR_COVER = f"""
        SELECT hour, max(ms)
        FROM (
            SELECT t.ts_ms / {HOUR_MS} AS hour, sum(t.duration_ms) AS ms
            FROM tick AS t
            JOIN gpu_sample AS g ON g.tick_id = t.tick_id
            WHERE t.ts_ms >= :lo AND t.ts_ms < :hi
            GROUP BY hour, g.gpu_id
        )
        GROUP BY hour
        """


def gpu_hour_cover_raw(conn: sqlite3.Connection, h0: int, h1: int) -> list[tuple[int, int]]:
    """(UTC hour, the largest per-GPU sum of tick durations) for hours [h0, h1), from raw rows.

    The same number as max(total_ms) over hour_gpu (hour_cover_rollup) where
    the hour is rolled up and its raw rows remain.
    """
    # Keyed by whole UTC hours: rawload's slices (on hour boundaries) split no key.
    return _by_slices(conn, h0 * HOUR_MS, h1 * HOUR_MS, _GPU_HOUR_COVER, {})


def hour_gpu_totals(conn: sqlite3.Connection, hours: Sequence[int]) -> list[tuple[int, int, int]]:
    """(hour, gpu_id, total_ms) of hour_gpu for the given hours (a few: those with overlap)."""
    if not hours:
        return []
    return conn.execute(
        f"SELECT hour, gpu_id, total_ms FROM hour_gpu WHERE hour IN ({','.join(str(int(h)) for h in hours)})"
    ).fetchall()


# ---------------------------------------------------------------- coverage of time

def hour_cover_raw(conn: sqlite3.Connection, lo: int, hi: int) -> list[tuple[int, int]]:
    """(UTC hour, sum of tick durations) for ticks in [lo, hi)."""
    return conn.execute(
        f"""
        SELECT ts_ms / {HOUR_MS} AS hour, sum(duration_ms)
        FROM tick
        WHERE ts_ms >= :lo AND ts_ms < :hi
        GROUP BY hour
        """,
        {"lo": lo, "hi": hi},
    ).fetchall()


def hour_cover_rollup(conn: sqlite3.Connection, h0: int, h1: int) -> list[tuple[int, int]]:
    """(UTC hour, the best-covered GPU's total_ms) from hour_gpu.

    The busiest GPU's total equals the hour's tick durations whenever one
    GPU was sampled in every tick; it is only used to pick hours to look at
    closely, never as a result.
    """
    return conn.execute(
        """
        SELECT hour, max(total_ms)
        FROM hour_gpu
        WHERE hour >= :h0 AND hour < :h1
        GROUP BY hour
        """,
        {"h0": h0, "h1": h1},
    ).fetchall()


def ticks_between(conn: sqlite3.Connection, lo: int, hi: int) -> sqlite3.Cursor:
    """(ts_ms, duration_ms) of ticks in [lo, hi), in time order (streamed)."""
    return conn.execute(
        "SELECT ts_ms, duration_ms FROM tick WHERE ts_ms >= ? AND ts_ms < ? ORDER BY ts_ms",
        (lo, hi),
    )


def tick_before(conn: sqlite3.Connection, ts: int) -> int | None:
    row = conn.execute("SELECT max(ts_ms) FROM tick WHERE ts_ms < ?", (ts,)).fetchone()
    return row[0]


def tick_at_or_after(conn: sqlite3.Connection, ts: int) -> tuple[int, int] | None:
    return conn.execute(
        "SELECT ts_ms, duration_ms FROM tick WHERE ts_ms >= ? ORDER BY ts_ms LIMIT 1", (ts,)
    ).fetchone()


def first_last_tick(conn: sqlite3.Connection, lo: int, hi: int) -> tuple[int | None, int | None]:
    """First and last tick time in [lo, hi).

    Two statements on purpose: SQLite answers a lone min() or max() with one
    index seek, but `SELECT min(x), max(x)` walks the whole range (0.3 s on a year).
    """
    first = conn.execute("SELECT min(ts_ms) FROM tick WHERE ts_ms >= ? AND ts_ms < ?", (lo, hi)).fetchone()
    last = conn.execute("SELECT max(ts_ms) FROM tick WHERE ts_ms >= ? AND ts_ms < ?", (lo, hi)).fetchone()
    return first[0], last[0]


def last_status(conn: sqlite3.Connection, lo: int, hi: int) -> dict[int, int]:
    """gpu_id -> status in the last tick of the window (one tick, by index)."""
    last = conn.execute("SELECT tick_id, ts_ms FROM tick WHERE ts_ms >= ? AND ts_ms < ? ORDER BY ts_ms DESC LIMIT 1",
                        (lo, hi)).fetchone()
    if last is None:
        return {}
    ensure(conn, last[1], last[1] + 1)  # that tick's hour only, if compacted
    return dict(conn.execute("SELECT gpu_id, status FROM gpu_sample WHERE tick_id = ?", (last[0],)).fetchall())


# ---------------------------------------------------------------- runs and events

def runs(conn: sqlite3.Connection) -> list[tuple]:
    """(run_id, started_ms, stopped_ms, interval_ms, backend, hostname, version,
    next_started_ms). The run table has one row per collector start: small."""
    return conn.execute(
        """
        SELECT r.run_id, r.started_ms, r.stopped_ms, r.interval_ms, r.backend,
               r.hostname, r.version,
               (SELECT n.started_ms FROM run AS n
                WHERE n.run_id > r.run_id ORDER BY n.run_id LIMIT 1)
        FROM run AS r
        ORDER BY r.run_id
        """
    ).fetchall()


ERROR_KINDS = ("nvml_error", "gpu_lost", "init_failed", "db_error", "proc_hidden")


def error_events(conn: sqlite3.Connection, lo: int, hi: int) -> list[tuple]:
    """(gpu_id, kind, count, first_ms, last_ms, last_detail) in [lo, hi).

    `detail` is a bare column beside max(): SQLite documents that it then
    comes from the row holding the maximum, i.e. the latest event.
    """
    kinds = ",".join(f"'{k}'" for k in ERROR_KINDS)
    return conn.execute(
        f"""
        SELECT gpu_id, kind, count(*), min(ts_ms), max(ts_ms), detail
        FROM event
        WHERE ts_ms >= ? AND ts_ms < ? AND kind IN ({kinds})
        GROUP BY gpu_id, kind
        ORDER BY gpu_id, kind
        """,
        (lo, hi),
    ).fetchall()


def gap_events(conn: sqlite3.Connection, lo: int, hi: int, limit: int) -> list[tuple]:
    """(ts_ms, end_ms, run_id, detail) of 'gap' events overlapping [lo, hi).

    The one gap that may start before the window is found with a backwards
    index walk, not a scan of older events.
    """
    before = conn.execute(
        """
        SELECT ts_ms, end_ms, run_id, detail FROM event
        WHERE kind = 'gap' AND ts_ms < ? ORDER BY ts_ms DESC LIMIT 1
        """,
        (lo,),
    ).fetchall()
    inside = conn.execute(
        """
        SELECT ts_ms, end_ms, run_id, detail FROM event
        WHERE kind = 'gap' AND ts_ms >= ? AND ts_ms < ?
        ORDER BY ts_ms LIMIT ?
        """,
        (lo, hi, limit),
    ).fetchall()
    out = [r for r in before if r[1] is not None and r[1] > lo]
    return out + inside


def count_gap_events(conn: sqlite3.Connection, lo: int, hi: int) -> int:
    return conn.execute(
        "SELECT count(*) FROM event WHERE kind = 'gap' AND ts_ms >= ? AND ts_ms < ?", (lo, hi)
    ).fetchone()[0]


# ---------------------------------------------------------------- per local hour (`--table hour`, hourly.py)
#
# The GPU-state aggregate per GPU and local hour of the report's zone, for
# the time series of `--format csv --table hour`. Not read by any other
# report. A local hour is keyed by one integer (LOCAL_HOUR_SCALE):
#   (local hour number since 1970) * LOCAL_HOUR_SCALE + offset in seconds + LOCAL_HOUR_BIAS
# so that the two local hours a DST change gives the same wall-clock time
# (and the rare zone whose offset changes off a whole local hour) stay apart.

LOCAL_HOUR_SCALE = 200_000
LOCAL_HOUR_BIAS = 100_000  # more than any UTC offset (at most 26 h = 93 600 s)


def _offset_expr(ts_expr: str, segments: Sequence[Segment]) -> str:
    """SQL for the zone's offset (ms) at `ts_expr`, chosen as cell_expr chooses it."""
    if len(segments) == 1:
        return str(int(segments[0].offset_ms))
    whens = " ".join(
        f"WHEN {ts_expr} < {int(s.start_ms)} THEN {int(prev.offset_ms)}"
        for prev, s in zip(segments, segments[1:])
    )
    return f"(CASE {whens} ELSE {int(segments[-1].offset_ms)} END)"


def local_hour_key_expr(ts_expr: str, segments: Sequence[Segment]) -> str:
    """SQL for the local-hour key (LOCAL_HOUR_SCALE) of the instant `ts_expr` (>= 0)."""
    off = _offset_expr(ts_expr, segments)
    return (f"((({ts_expr}) + {off}) / {HOUR_MS}) * {LOCAL_HOUR_SCALE}"
            f" + {off} / 1000 + {LOCAL_HOUR_BIAS}")


def gpu_state_raw_hours(
    conn: sqlite3.Connection, lo: int, hi: int, active_pm: int, held_bytes: int,
    gpu_ids: Sequence[int], segments: Sequence[Segment], gpm: Gpm | None = None,
) -> list[tuple]:
    """gpu_state_raw's rows with the local-hour key (local_hour_key_expr) for the cell."""
    return _state_raw(conn, lo, hi, active_pm, held_bytes, gpu_ids, local_hour_key_expr("t.ts_ms", segments), gpm)


def gpu_state_clipped_hours(
    conn: sqlite3.Connection, lo: int, hi: int, active_pm: int, held_bytes: int,
    gpu_ids: Sequence[int], segments: Sequence[Segment], gpm: Gpm | None = None,
) -> list[tuple]:
    """gpu_state_clipped's rows (each GPU's time counted once) with the local-hour key for the cell."""
    return _state_clipped(conn, lo, hi, active_pm, held_bytes, gpu_ids, local_hour_key_expr("c.ts", segments), gpm)


def gpu_state_rollup_hours(
    conn: sqlite3.Connection, h0: int, h1: int, gpu_ids: Sequence[int], skip_hours: Sequence[int] = (),
    gpm: Gpm | None = None,
) -> list[tuple]:
    """gpu_state_rollup's rows per UTC hour: (gpu_id, hour, STATE_COLUMNS...) from hour_gpu, [h0, h1)."""
    sql = f"""
        SELECT gpu_id, hour,
               ticks, total_ms, active_ms, held_ms, idle_ms, unknown_ms, coverage_pm_ms,
               energy_active_mj, energy_held_mj, energy_idle_mj,
               0, {_rollup_gpm(gpm, conn).replace("sum(", "(")}
        FROM hour_gpu
        WHERE hour >= :h0 AND hour < :h1{_in_clause('gpu_id', gpu_ids)}{_not_in('hour', skip_hours)}
    """
    return conn.execute(sql, {"h0": h0, "h1": h1}).fetchall()


def gpu_state_hist_hours(
    conn: sqlite3.Connection, h0: int, h1: int, active_pm: int, held_bytes: int,
    gpu_ids: Sequence[int], skip_hours: Sequence[int] = (), gpm: Gpm | None = None,
) -> list[tuple]:
    """gpu_state_hist's rows per UTC hour: (gpu_id, hour, STATE_COLUMNS...), classified as it classifies.

    hour_gpu_hist is keyed by (gpu_id, hour, ...): the GROUP BY follows the
    key as SQLite reads it, without sorting. `active_pm` a whole percent.
    """
    return _hist_states(conn, h0, h1, active_pm, held_bytes, gpu_ids, skip_hours, gpm, per_hour=True)
