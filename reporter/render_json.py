"""The JSON output: a versioned contract for scripts, documented in JSON.md.

Canonical values are integers (milliseconds, mJ, MiB x ms) straight from
the database sums; hours, shares and kWh beside them are conveniences
derived from those integers. Add fields freely; renaming or changing the
meaning of one needs FORMAT_VERSION + 1.
"""

from __future__ import annotations

from . import __version__
from .window import HOUR_MS, iso_utc

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms)
if TYPE_CHECKING:
    from typing import Any

    from .classify import GpuReport, Identity, Report, StateTotals

# 2: identities gained sm_unknown_ms: held time with SM unknown is no longer
# implied busy (held_ms - idle_held_ms), see JSON.md.
FORMAT_VERSION = 2
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def rounded(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(x, nd)


def ms_to_hours(ms: int) -> float:
    return round(ms / HOUR_MS, 4)


def _kwh(mj: int | None) -> float | None:
    return None if mj is None else round(mj / 3.6e9, 6)


def cpu_rule_text(cpu_busy_pm: int) -> str:
    """The rule that splits an identity's idle-held time by its CPU, in words (JSON and text)."""
    return (f"idle-held time is waiting on CPU when the identity's processes on that GPU used >= "
            f"{cpu_busy_pm / 10:g} % of one core together in the tick (loading or preprocessing data), "
            "CPU unknown when that was not measured, abandoned otherwise")


def _states(t: StateTotals) -> dict[str, Any]:
    return {
        "ticks": t.ticks,
        "total_ms": t.total_ms,
        "active_ms": t.active_ms,
        "idle_held_ms": t.held_ms,
        "idle_ms": t.idle_ms,
        "unknown_ms": t.unknown_ms,
        "known_ms": t.known_ms,
        "active_share": rounded(t.share("active")),
        "idle_held_share": rounded(t.share("idle_held")),
        "idle_share": rounded(t.share("idle")),
        "gpu_hours": ms_to_hours(t.total_ms),
        "utilization_coverage": rounded(t.coverage),
        "gpm_known_ms": t.gpm_known_ms,
        "sm_activity": rounded(t.sm_active),
        "tensor_known_ms": t.tensor_known_ms,
        "tensor_activity": rounded(t.tensor_active),
        "starved_ms": t.starved,
        "starved_gpu_hours": None if t.starved is None else ms_to_hours(t.starved),
    }


def _energy(t: StateTotals) -> dict[str, Any]:
    return {
        "active_mj": t.energy_active_mj,
        "idle_held_mj": t.energy_held_mj,
        "idle_mj": t.energy_idle_mj,
        "active_kwh": _kwh(t.energy_active_mj),
        "idle_held_kwh": _kwh(t.energy_held_mj),
        "idle_kwh": _kwh(t.energy_idle_mj),
    }


def _gpu(g: GpuReport) -> dict[str, Any]:
    r = g.row
    return {
        "uuid": r.uuid,
        "index": r.index,
        "name": r.name,
        "memory_total_bytes": r.memory_total,
        "mig": None if not g.is_mig else {
            "parent_uuid": g.parent.uuid if g.parent else None,
            "parent_index": g.parent.index if g.parent else None,
            "slot": r.mig_slot,
        },
        **_states(g.totals),
        "energy": _energy(g.totals) if g.totals.has_energy else None,
        "last_status": g.last_status,
        "errors": [
            {"kind": e.kind, "count": e.count, "first_ms": e.first_ms, "last_ms": e.last_ms,
             "last_detail": e.last_detail}
            for e in g.errors
        ],
    }


def starved_rule_text(active_pm: int, starved_pm: int) -> str:
    """The active-but-starved rule in words (JSON and text)."""
    return (f"active but starved: active (SM utilization >= {active_pm / 10:g} %) while GPM SM activity "
            f"was known and below {starved_pm / 10:g} % (the kernel keeps few SMs busy); not a state of its "
            "own: counted in active time; unknown where the GPU has no GPM (before Hopper)")


def _identity(i: Identity, uuid_of: dict[int, str], starved_known: bool) -> dict[str, Any]:
    d: dict[str, Any] = {"user": i.user, "uid": i.uid}
    if i.unit:
        d["unit"] = i.unit
    d.update({
        "held_ms": i.held_ms,
        "idle_held_ms": i.idle_held_ms,
        "mem_mib_ms": i.mem_mib_ms,
        "unknown_mem_ms": i.unknown_mem_ms,
        "sm_unknown_ms": i.sm_unknown_ms,
        "sm_unrecorded_ms": i.sm_unrecorded_ms,
        "idle_held_abandoned_ms": i.abandoned_ms,
        "idle_held_waiting_on_cpu_ms": i.idle_cpu_busy_ms,
        "idle_held_cpu_unknown_ms": i.idle_cpu_unknown_ms,
        "held_gpu_hours": ms_to_hours(i.held_ms),
        "idle_held_gpu_hours": ms_to_hours(i.idle_held_ms),
        "sm_unknown_gpu_hours": ms_to_hours(i.sm_unknown_ms),
        "idle_held_abandoned_gpu_hours": ms_to_hours(i.abandoned_ms),
        "idle_held_waiting_on_cpu_gpu_hours": ms_to_hours(i.idle_cpu_busy_ms),
        "mem_gb_hours": round(i.mem_gb_hours, 4),
        "memory_unknown": i.unknown_mem_ms > 0,
        "sm_unknown": i.sm_unknown_ms > 0,
        "gpm_busy_ms": i.gpm_busy_ms if starved_known else None,
        "starved_ms": i.starved(starved_known),
        "starved_gpu_hours": None if i.starved(starved_known) is None else ms_to_hours(i.starved_ms),
        "gpus": sorted(uuid_of.get(g, str(g)) for g in i.gpu_ids),
    })
    return d


def to_dict(rep: Report) -> dict[str, Any]:
    from .classify import StateTotals  # here: --help imports this module for FORMAT_VERSION

    o = rep.options
    window_h = rep.window_ms / HOUR_MS
    h = rep.headline
    uuid_of = {g.row.gpu_id: g.row.uuid for g in rep.gpus}
    energy_total = StateTotals()
    for g in rep.energy_gpus:
        energy_total.add(g.totals)
    cells: list[list[float | None]] = [[None] * 24 for _ in range(7)]
    active_ms: list[list[int]] = [[0] * 24 for _ in range(7)]
    known_ms: list[list[int]] = [[0] * 24 for _ in range(7)]
    for cell, (a, k) in rep.heat.items():
        wd, hr = divmod(cell, 24)
        active_ms[wd][hr], known_ms[wd][hr] = a, k
        cells[wd][hr] = rounded(a / k) if k else None
    return {
        "format_version": FORMAT_VERSION,
        "generator": f"gua-report {__version__}",
        "database": {
            "path": rep.db_path,
            "schema_version": rep.schema_version,
            "created_ms": rep.created_ms,
            "hostnames": rep.hostnames,
        },
        "window": {
            "since": iso_utc(o.since_ms),
            "until": iso_utc(o.until_ms),
            "since_ms": o.since_ms,
            "until_ms": o.until_ms,
            "hours": round(window_h, 4),
            "tz": o.tz_name,
            "first_sample_ms": rep.first_tick_ms,
            "last_sample_ms": rep.last_tick_ms,
        },
        "filters": {"gpus": list(o.gpus), "users": list(o.users)},
        "rules": {
            "active_threshold_permille": o.active_pm,
            "held_threshold_bytes": o.held_bytes,
            "text": (
                f"active: SM utilization >= {o.active_pm / 10:g} %; idle-held: below that "
                f"and compute processes hold > {o.held_bytes} bytes or memory NVML cannot "
                "report; truly idle: otherwise; unknown: NVML error, lost GPU, or "
                "utilization not supported"
            ),
            "basis": "physical GPUs; time = sum of each tick's measured duration",
            "note": rep.threshold_note,
            "cpu_busy_permille": rep.cpu_busy_pm,
            "cpu_text": cpu_rule_text(rep.cpu_busy_pm),
            "starved_sm_permille": rep.starved_pm,
            "starved_text": starved_rule_text(o.active_pm, rep.starved_pm),
        },
        "headline": _states(h),
        "idle_capacity": {
            "window_hours": round(window_h, 4),
            "idle_held_gpu_hours": ms_to_hours(h.held_ms),
            "idle_gpu_hours": ms_to_hours(h.idle_ms),
            "idle_held_equivalent_gpus": round(h.held_ms / rep.window_ms, 4) if rep.window_ms else None,
            "idle_equivalent_gpus": round(h.idle_ms / rep.window_ms, 4) if rep.window_ms else None,
        },
        "gpus": [_gpu(g) for g in rep.gpus],
        "identities": {
            "users": [_identity(i, uuid_of, rep.identity_starved_known) for i in rep.users],
            "units": [_identity(i, uuid_of, rep.identity_starved_known) for i in rep.units],
        },
        "heatmap": {
            "tz": o.tz_name,
            "weekdays": list(WEEKDAYS),
            "active_share": cells,
            "active_ms": active_ms,
            "known_ms": known_ms,
            "unplaced_known_ms": rep.heat_unplaced_ms,
            "unplaced_before_ms": rep.heat_unplaced_before_ms if rep.heat_unplaced_ms else None,
            "note": rep.heat_note,
        },
        "energy": {
            "gpus_reporting": len(rep.energy_gpus),
            "gpus_total": len(rep.physical),
            **_energy(energy_total),
        },
        "data_quality": {
            "utilization_coverage": rounded(h.coverage),
            "unknown_ms": h.unknown_ms,
            "sm_unknown_ms": sum(i.sm_unknown_ms for i in rep.users),
            "sm_unknown_users": len(rep.sm_unknown_users),
            "sm_recorded_since_ms": rep.sm_recorded_since_ms,
            "sm_unrecorded_ms": sum(i.sm_unrecorded_ms for i in rep.users),
            "gpm_recorded_since_ms": rep.gpm_recorded_since_ms,
            "identity_starved_known": rep.identity_starved_known,
            "overlap_ms": h.overlap_ms,
            "overlap_hours": len(rep.overlap.hours),
            "overlap_unremoved_ms": rep.overlap.unremoved_ms,
            "overlap_unremoved_hours": len(rep.overlap.unremoved_hours),
            "gap_events": [
                {"start_ms": g.start_ms, "end_ms": g.end_ms, "run_id": g.run_id, "detail": g.detail}
                for g in rep.gap_events
            ],
            "gap_events_total": rep.gap_events_total,
            "holes": [
                {"start_ms": x.start_ms, "end_ms": x.end_ms, "open_ended": x.open_ended}
                for x in rep.holes
            ],
            "holes_total": rep.holes_total,
            "runs": [
                {"run_id": r.run_id, "started_ms": r.started_ms, "stopped_ms": r.stopped_ms,
                 "clean": r.clean, "last_tick_ms": r.last_tick_ms, "interval_ms": r.interval_ms,
                 "backend": r.backend, "hostname": r.hostname, "version": r.version}
                for r in rep.runs
            ],
            "unclean_stops": sum(1 for r in rep.runs if r.clean is False),
            "host_errors": [
                {"kind": e.kind, "count": e.count, "first_ms": e.first_ms, "last_ms": e.last_ms,
                 "last_detail": e.last_detail}
                for e in rep.host_errors
            ],
            "warnings": rep.warnings,
        },
        # Diagnostics only (not part of the contract's comparisons): how the
        # numbers were obtained.
        "source": {
            "rollups": rep.plan.rollup_source,
            "heatmap": rep.plan.heat if rep.plan.h1 > rep.plan.h0 else "raw",
            "rollup_hours": rep.plan.h1 - rep.plan.h0 - len(rep.plan.skip_hours),
            "raw_ranges_ms": [list(r) for r in rep.plan.raw_ranges],
            "overlap_ranges_ms": [list(r) for r in rep.plan.clip_ranges],
            "note": rep.plan.note,
        },
    }


def render(rep: Report) -> str:
    import json

    return json.dumps(to_dict(rep), indent=2, sort_keys=False) + "\n"
