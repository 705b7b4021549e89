"""The time series of `--format csv --table hour`: each GPU's state time per local hour.

One row per local hour of the window (in --tz) and GPU of the report (the
JSON's `gpus`, MIG instances included, --gpu applies), classified with the
report's thresholds. Read only for that table, in the same read
transaction as the Report, with the Report's own plan (classify.Plan), so
that for every GPU the hours add up exactly to the Report's numbers:

- whole UTC hours the plan takes from the rollups ([h0, h1) but the hours
  with overlapping ticks): where that UTC hour is one local hour (the zone's
  offset whole hours there, no offset change inside it), from the rollup rows
  of that hour, hour_gpu or hour_gpu_hist as the plan reads them. Elsewhere
  (+05:30, +05:45) a UTC hour straddles two local hours, which the rollups
  cannot split by state (quarter_gpu knows only utilization): from the raw
  rows of that hour while retention keeps them (they give the rollups'
  numbers, SCHEMA.md). Where retention removed them, the UTC hour's rollup
  is counted whole in the local hour holding its start, and both local hours
  it touches say so (`approximate`);
- the plan's raw ranges (the window's partial hours, hours not rolled up,
  --no-rollups, thresholds the rollups cannot classify): raw rows;
- the plan's clipped ranges (ticks that overlap: a clock stepped back):
  raw rows with each GPU's time counted once, as the Report counts them.

A tick counts in the local hour of its `ts_ms` (its end), as the window
counts it: the first and last hours are those parts of the hour inside the
window.
"""

from __future__ import annotations

import sqlite3
from bisect import bisect_right

from . import classify, query
from .window import HOUR_MS, Segment, offset_segments

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms)
if TYPE_CHECKING:
    from collections.abc import Iterable

    from .classify import Options, Report

    Key = tuple[int, int, int]  # (gpu_id, local hour number since 1970, offset ms)


class HourRow:
    """One GPU's state time in one local hour (the part of it inside the window)."""

    __slots__ = ("gpu_id", "hour_number", "offset_ms", "start_ms", "end_ms", "totals", "approximate")

    def __init__(self, gpu_id: int, hour_number: int, offset_ms: int, start_ms: int, end_ms: int,
                 totals: classify.StateTotals, approximate: bool) -> None:
        self.gpu_id = gpu_id
        # The local hour: wall-clock hour `hour_number` (hours since 1970-01-01T00:00
        # local) at UTC offset `offset_ms`; a DST change's repeated hour is two rows.
        self.hour_number = hour_number
        self.offset_ms = offset_ms
        self.start_ms = start_ms  # the part of the hour inside the window (and its offset): [start, end)
        self.end_ms = end_ms
        self.totals = totals  # zero where the GPU has no tick in the hour
        # Rolled-up UTC hours without raw rows, in a zone whose hours are not UTC
        # hours, were counted whole in the local hour holding their start.
        self.approximate = approximate


class _Offsets:
    """The zone's offset at an instant, chosen as the SQL's CASE over the segments chooses it."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments
        self.starts = [s.start_ms for s in segments]

    def at(self, ts_ms: int) -> int:
        return self.segments[max(0, bisect_right(self.starts, ts_ms) - 1)].offset_ms

    def key(self, ts_ms: int) -> tuple[int, int]:
        off = self.at(ts_ms)
        return (ts_ms + off) // HOUR_MS, off

    def hour_is_local(self, hour: int) -> bool:
        """The UTC hour is one local hour: a whole-hour offset, unchanged inside the hour."""
        lo, hi = hour * HOUR_MS, (hour + 1) * HOUR_MS
        if self.at(lo) % HOUR_MS:
            return False
        i = bisect_right(self.starts, lo)
        return i >= len(self.starts) or self.starts[i] >= hi


def _decode(cell: int) -> tuple[int, int]:
    """query.local_hour_key_expr's integer -> (local hour number, offset ms)."""
    number, rest = divmod(cell, query.LOCAL_HOUR_SCALE)
    return number, (rest - query.LOCAL_HOUR_BIAS) * 1000


def _runs(hours: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted hours -> [h0, h1) runs of consecutive ones."""
    out: list[list[int]] = []
    for h in hours:
        if out and out[-1][1] == h:
            out[-1][1] = h + 1
        else:
            out.append([h, h + 1])
    return [(a, b) for a, b in out]


def series(conn: sqlite3.Connection, rep: Report) -> list[HourRow]:
    """The rows of `--table hour`, by local hour, then GPU in the Report's order.

    Read with the connection (and transaction) the Report was built with.
    Every local hour from the first to the last one with a tick of any
    listed GPU, for every listed GPU (zeros where it has none).
    """
    o, plan = rep.options, rep.plan
    offsets = _Offsets(offset_segments(o.tz, o.since_ms, o.until_ms))
    gpu_ids = [g.row.gpu_id for g in rep.gpus]
    sums: dict[Key, classify.StateTotals] = {}
    approximate: set[Key] = set()

    def add(gpu_id: int, number: int, off: int, values: list[int | None]) -> None:
        key = (gpu_id, number, off)
        totals = sums.get(key)
        if totals is None:
            totals = sums[key] = classify.StateTotals()
        totals.add_row(values)

    def take_local(rows: list[tuple]) -> None:
        for gpu_id, cell, *values in rows:
            add(gpu_id, *_decode(cell), values)

    gpm = rep.gpm
    if plan.h1 > plan.h0 and gpu_ids:
        skip = set(plan.skip_hours)
        pruned = _pruned_before(conn)
        from_rollups: list[int] = []  # one local hour each, or (raw rows removed) counted whole
        from_raw: list[int] = []
        for h in range(plan.h0, plan.h1):
            if h in skip:
                continue
            if offsets.hour_is_local(h) or h * HOUR_MS < pruned:
                from_rollups.append(h)
            else:
                from_raw.append(h)
        for h0, h1 in _runs(from_rollups):
            if plan.hist:
                rows = query.gpu_state_hist_hours(conn, h0, h1, o.active_pm, o.held_bytes, gpu_ids, plan.skip_hours,
                                                  gpm)
            else:
                rows = query.gpu_state_rollup_hours(conn, h0, h1, gpu_ids, plan.skip_hours, gpm)
            for gpu_id, hour, *values in rows:
                number, off = offsets.key(hour * HOUR_MS)
                add(gpu_id, number, off, values)
                if not offsets.hour_is_local(hour):
                    approximate.add((gpu_id, number, off))
                    approximate.add((gpu_id, *offsets.key((hour + 1) * HOUR_MS - 1)))
        for h0, h1 in _runs(from_raw):
            take_local(query.gpu_state_raw_hours(conn, h0 * HOUR_MS, h1 * HOUR_MS, o.active_pm, o.held_bytes,
                                                 gpu_ids, offsets.segments, gpm))
    for lo, hi in plan.raw_ranges:
        take_local(query.gpu_state_raw_hours(conn, lo, hi, o.active_pm, o.held_bytes, gpu_ids,
                                             offsets.segments, gpm))
    for lo, hi in plan.clip_ranges:
        take_local(query.gpu_state_clipped_hours(conn, lo, hi, o.active_pm, o.held_bytes, gpu_ids,
                                                 offsets.segments, gpm))
    return _dense(rep, offsets, gpu_ids, sums, approximate)


def _pruned_before(conn: sqlite3.Connection) -> int:
    """meta raw_pruned_before_ms: raw rows before it were removed by retention (0: none)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'raw_pruned_before_ms'").fetchone()
    try:
        return int(row[0]) if row else 0
    except ValueError:
        return 0


def _dense(rep: Report, offsets: _Offsets, gpu_ids: list[int], sums: dict[Key, classify.StateTotals],
           approximate: set[Key]) -> list[HourRow]:
    """Every local hour between the first and the last one with time, for every GPU."""
    if not sums:
        return []
    o = rep.options
    first = min(n * HOUR_MS - off for _, n, off in sums)
    last = max((n + 1) * HOUR_MS - off for _, n, off in sums)
    lo_all, hi_all = max(o.since_ms, first), min(o.until_ms, last)
    hours: list[tuple[int, int, int, int]] = []  # (number, offset, start, end)
    segs = offsets.segments
    for i, seg in enumerate(segs):
        seg_end = segs[i + 1].start_ms if i + 1 < len(segs) else o.until_ms
        lo, hi = max(lo_all, seg.start_ms), min(hi_all, seg_end)
        if hi <= lo:
            continue
        off = seg.offset_ms
        for n in range((lo + off) // HOUR_MS, (hi - 1 + off) // HOUR_MS + 1):
            hours.append((n, off, max(lo, n * HOUR_MS - off), min(hi, (n + 1) * HOUR_MS - off)))
    listed = {(n, off) for n, off, _, _ in hours}
    missing = {(n, off) for _, n, off in sums} - listed
    if missing:  # cannot happen: every key comes from an instant of the window
        raise AssertionError(f"local hours outside the window: {sorted(missing)}")
    out: list[HourRow] = []
    for n, off, start, end in hours:
        for gpu_id in gpu_ids:
            key = (gpu_id, n, off)
            out.append(HourRow(gpu_id, n, off, start, end, sums.get(key) or classify.StateTotals(),
                               key in approximate))
    return out


def build(conn: sqlite3.Connection, db_path: str, schema_version: int, opts: Options,
          open_warning: str = "") -> tuple[Report, list[HourRow]]:
    """classify.build, and the series read in the same transaction (one snapshot: the sums agree)."""
    rows: list[HourRow] = []

    def read(c: sqlite3.Connection, rep: Report) -> None:
        rows[:] = series(c, rep)  # a report read again gets its series again

    rep = classify.build(conn, db_path, schema_version, opts, open_warning, also=read)
    return rep, rows
