"""CSV output as one rectangular table per call (`--format csv --table NAME`), like `sadf -d`.

Each table is a header row and one row per GPU, identity, (identity, unit),
local hour and GPU, heatmap cell or data-quality event, every row as wide
as the header, for a spreadsheet or a data frame. Values and names are
those of the JSON output (to_dict; JSON.md), with nested fields joined by
'.' as in the long table (render_csv); the hour table's, which the JSON
does not have, come from hourly.py with the same names. Beside them, times
are written in ISO 8601 in the report's zone with its offset
(2026-11-28T10:00:00+05:30), and a few hour columns are derived from the
integer milliseconds the same way the JSON derives its own. Every text
cell goes through render_csv's formula neutralisation.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from .render_csv import csv_cell, csv_text, write
from .render_json import WEEKDAYS, ms_to_hours, rounded, to_dict

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from datetime import tzinfo
    from typing import Any

    from .classify import Report
    from .hourly import HourRow

    Rows = Iterator[dict[str, Any]]
    # (the JSON document, the window's since and until, the zone) -> rows by column name
    Maker = Callable[[dict[str, Any], dict[str, Any], tzinfo], Rows]

# The window every row of an aggregate table sums over (ISO 8601, the report's zone).
_WINDOW = ("since", "until")
_STATES = (
    "ticks", "total_ms", "active_ms", "idle_held_ms", "idle_ms", "unknown_ms", "known_ms",
    "active_share", "idle_held_share", "idle_share", "gpu_hours",
)
GPU_COLUMNS = (
    *_WINDOW, "index", "uuid", "name", "memory_total_bytes", "mig.parent_uuid", "mig.parent_index", "mig.slot",
    *_STATES, "active_gpu_hours", "idle_held_gpu_hours", "idle_gpu_hours", "unknown_gpu_hours",
    "utilization_coverage", "energy.active_mj", "energy.idle_held_mj", "energy.idle_mj", "energy.active_kwh",
    "energy.idle_held_kwh", "energy.idle_kwh", "last_status", "error_count",
)
_IDENTITY = (
    "held_ms", "idle_held_ms", "mem_mib_ms", "unknown_mem_ms", "sm_unknown_ms", "sm_unrecorded_ms",
    "idle_held_abandoned_ms", "idle_held_waiting_on_cpu_ms", "idle_held_cpu_unknown_ms", "held_gpu_hours",
    "idle_held_gpu_hours", "sm_unknown_gpu_hours", "idle_held_abandoned_gpu_hours",
    "idle_held_waiting_on_cpu_gpu_hours", "mem_gb_hours", "memory_unknown", "sm_unknown",
    "gpm_busy_ms", "starved_ms", "starved_gpu_hours", "gpus",
)
IDENTITY_COLUMNS = (*_WINDOW, "user", "uid", *_IDENTITY)
UNIT_COLUMNS = (*_WINDOW, "user", "uid", "unit", *_IDENTITY)
HOUR_COLUMNS = (
    "hour", "start", "end", "tz", "index", "uuid", "mig.parent_uuid", "mig.slot", "ticks", "total_ms", "active_ms",
    "idle_held_ms", "idle_ms", "unknown_ms", "known_ms", "active_share", "idle_held_share", "idle_share", "note",
)
HEATMAP_COLUMNS = (*_WINDOW, "tz", "weekday", "weekday_index", "hour", "active_ms", "known_ms", "active_share")
# The hour table's note on a row that is not exact (hourly.HourRow.approximate).
APPROXIMATE_NOTE = ("approximate: a rolled-up UTC hour whose raw samples retention removed is counted whole "
                    "in the local hour holding its start")
EVENT_COLUMNS = (
    "kind", "start", "end", "start_ms", "end_ms", "gpu", "gpu_uuid", "count", "run_id", "open_ended", "clean",
    "detail",
)


def iso_local(ts_ms: int | None, tz: tzinfo) -> str | None:
    """2026-11-28T10:00:00+05:30 (with .mmm when not a whole second, as the JSON's since and until)."""
    if ts_ms is None:
        return None
    text = datetime.fromtimestamp(ts_ms // 1000, tz).isoformat()  # a whole second: no fraction
    ms = ts_ms % 1000
    return f"{text[:19]}.{ms:03d}{text[19:]}" if ms else text


def _get(obj: dict[str, Any] | None, dotted: str) -> Any:
    """obj['energy']['active_mj'] for 'energy.active_mj'; None where a part is null."""
    value: Any = obj
    for key in dotted.split("."):
        if value is None:
            return None
        value = value[key]
    return value


def _gpus(d: dict[str, Any], window: dict[str, Any], tz: tzinfo) -> Rows:
    for g in d["gpus"]:
        yield {
            **window, **{c: _get(g, c) for c in GPU_COLUMNS if c in g or "." in c},
            "active_gpu_hours": ms_to_hours(g["active_ms"]),
            "idle_held_gpu_hours": ms_to_hours(g["idle_held_ms"]),
            "idle_gpu_hours": ms_to_hours(g["idle_ms"]),
            "unknown_gpu_hours": ms_to_hours(g["unknown_ms"]),
            "error_count": sum(e["count"] for e in g["errors"]),
        }


def _identities(kind: str) -> Maker:
    def rows(d: dict[str, Any], window: dict[str, Any], tz: tzinfo) -> Rows:
        for i in d["identities"][kind]:
            yield {**window, **i, "gpus": ";".join(i["gpus"])}  # a list of plain values, as the long table

    return rows


def _hours_of_week(d: dict[str, Any], window: dict[str, Any], tz: tzinfo) -> Rows:
    hm = d["heatmap"]
    for wd in range(7):
        for hr in range(24):
            yield {**window, "tz": hm["tz"], "weekday": WEEKDAYS[wd], "weekday_index": wd, "hour": hr,
                   "active_ms": hm["active_ms"][wd][hr], "known_ms": hm["known_ms"][wd][hr],
                   "active_share": hm["active_share"][wd][hr]}


def local_hour(number: int, offset_ms: int) -> str:
    """Wall-clock hour `number` (since 1970-01-01T00:00 local) at that offset: 2026-11-28T10:00:00+05:30."""
    zone = timezone(timedelta(milliseconds=offset_ms))
    return (datetime(1970, 1, 1) + timedelta(hours=number)).replace(tzinfo=zone).isoformat()


def hour_rows(rep: Report, hours: list[HourRow]) -> Rows:
    """The rows of the hour table: hourly.series, with the GPUs named as the JSON's `gpus` names them."""
    o = rep.options
    gpus = {g.row.gpu_id: g for g in rep.gpus}
    when: dict[str, Any] = {}
    last: tuple[int, int, int] | None = None
    for h in hours:
        if (h.hour_number, h.offset_ms, h.start_ms) != last:  # rows come by hour, then GPU
            last = (h.hour_number, h.offset_ms, h.start_ms)
            when = {"hour": local_hour(h.hour_number, h.offset_ms), "start": iso_local(h.start_ms, o.tz),
                    "end": iso_local(h.end_ms, o.tz), "tz": o.tz_name}
        g, t = gpus[h.gpu_id], h.totals
        yield {
            **when,
            "index": g.row.index, "uuid": g.row.uuid,
            "mig.parent_uuid": (g.parent.uuid if g.parent else None) if g.is_mig else None,
            "mig.slot": g.row.mig_slot if g.is_mig else None,
            "ticks": t.ticks, "total_ms": t.total_ms, "active_ms": t.active_ms, "idle_held_ms": t.held_ms,
            "idle_ms": t.idle_ms, "unknown_ms": t.unknown_ms, "known_ms": t.known_ms,
            "active_share": rounded(t.share("active")), "idle_held_share": rounded(t.share("idle_held")),
            "idle_share": rounded(t.share("idle")),
            "note": APPROXIMATE_NOTE if h.approximate else None,
        }


def _events(d: dict[str, Any], window: dict[str, Any], tz: tzinfo) -> Rows:
    dq = d["data_quality"]
    out: list[dict[str, Any]] = []
    for r in dq["runs"]:
        out.append({"kind": "run", "start_ms": r["started_ms"],
                    "end_ms": r["stopped_ms"] if r["stopped_ms"] is not None else r["last_tick_ms"],
                    "run_id": r["run_id"], "clean": r["clean"],
                    "detail": f"{r['backend']} on {r['hostname']}, gua {r['version']}, "
                              f"every {r['interval_ms']} ms"})
    for g in dq["gap_events"]:
        out.append({"kind": "gap", "start_ms": g["start_ms"], "end_ms": g["end_ms"], "run_id": g["run_id"],
                    "detail": g["detail"]})
    for h in dq["holes"]:
        out.append({"kind": "hole", "start_ms": h["start_ms"], "end_ms": h["end_ms"],
                    "open_ended": h["open_ended"]})
    errors = [(gpu, e) for gpu in d["gpus"] for e in gpu["errors"]]
    errors += [(None, e) for e in dq["host_errors"]]
    for gpu, e in errors:
        out.append({"kind": e["kind"], "start_ms": e["first_ms"], "end_ms": e["last_ms"],
                    "gpu": gpu["index"] if gpu else None, "gpu_uuid": gpu["uuid"] if gpu else None,
                    "count": e["count"], "detail": e["last_detail"]})
    out.sort(key=lambda r: r["start_ms"])  # stable: runs, gaps, holes, errors at the same instant
    for r in out:
        yield {c: None for c in EVENT_COLUMNS} | r | {"start": iso_local(r["start_ms"], tz),
                                                      "end": iso_local(r["end_ms"], tz)}


# name -> (columns, rows from the JSON document); the hour table's rows are
# not in the JSON: hour_rows, from the series hourly.build reads (maker None).
TABLES: dict[str, tuple[tuple[str, ...], Maker | None]] = {
    "gpu": (GPU_COLUMNS, _gpus),
    "identity": (IDENTITY_COLUMNS, _identities("users")),
    "unit": (UNIT_COLUMNS, _identities("units")),
    "hour": (HOUR_COLUMNS, None),
    "heatmap": (HEATMAP_COLUMNS, _hours_of_week),
    "event": (EVENT_COLUMNS, _events),
}


def render(rep: Report, table: str, hours: list[HourRow] | None = None) -> str:
    """One table ('gpu', 'identity', 'unit', 'hour', 'heatmap' or 'event') of the report as CSV text.

    'hour' needs `hours`, the series hourly.build read with the report.
    """
    o = rep.options
    columns, make = TABLES[table]
    if make is None:
        if hours is None:
            raise ValueError(f"table {table!r} needs the hourly series (hourly.build)")
        rows = hour_rows(rep, hours)
    else:
        rows = make(to_dict(rep), {"since": iso_local(o.since_ms, o.tz), "until": iso_local(o.until_ms, o.tz)},
                    o.tz)
    return write([csv_text(c) for c in columns], ([csv_cell(r[c]) for c in columns] for r in rows))
