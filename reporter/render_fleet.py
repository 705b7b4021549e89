"""The fleet report of `gua-report merge` and `--ssh`: text (80 columns), JSON, CSV.

Every string here came from another host's document (host, user and GPU
names, warnings, error messages, ssh's own words): in text it goes through
`safe` exactly once, where it is read from the Fleet; in CSV a cell that
begins like a formula is neutralised as render_csv does. JSON carries the
strings exactly (json.dumps escapes controls itself).
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from datetime import tzinfo
from typing import Any

from . import __version__
from .errors import escape as safe
from .merge import FLEET_FORMAT_VERSION, MERGED, TOP_GPUS_JSON, Fleet, FleetUser, Host, States
from .render_csv import HEADER, csv_cell, csv_text, flatten
from .render_json import ms_to_hours, rounded
from .render_text import _bar, _cut, _h, _pct, _size, _Style
from .window import HOUR_MS, fmt_local, iso_utc

WIDTH = 80
TOP_USERS = 10
HOSTS_PER_USER = 4  # per-host detail lines under one user in text
TOP_GPUS = 10
LOW_COVERAGE = 0.95  # below this the utilization split is less trustworthy (JSON.md)
# A document may carry megabytes in one string: text shows a bounded part
# (JSON has it all), so a hostile host cannot flood the admin's screen.
TEXT_CHARS = 300
WARNINGS_N = 8

# What each host status means, in words (text) — JSON carries the key.
STATUS_TEXT = {
    "merged": "merged", "mismatch": "not merged", "duplicate": "duplicate", "refused": "refused",
    "error": "error", "unreachable": "unreachable", "no_gua": "no gua-report", "failed": "failed",
}


def _states(s: States) -> dict[str, Any]:
    return {
        "ticks": s.ticks, "total_ms": s.total_ms, "active_ms": s.active_ms, "idle_held_ms": s.idle_held_ms,
        "idle_ms": s.idle_ms, "unknown_ms": s.unknown_ms, "known_ms": s.known_ms,
        "active_share": rounded(s.share(s.active_ms)), "idle_held_share": rounded(s.share(s.idle_held_ms)),
        "idle_share": rounded(s.share(s.idle_ms)), "gpu_hours": ms_to_hours(s.total_ms),
        "utilization_coverage": rounded(s.coverage),
    }


def _equivalent(ms: int, window_ms: int) -> float | None:
    return round(ms / window_ms, 4) if window_ms else None


def _host(h: Host) -> dict[str, Any]:
    r = h.report
    d: dict[str, Any] = {
        "host": h.label, "source": h.source, "status": h.status, "reason": h.reason,
        "error_code": h.error_code, "format_version": h.format_version, "notes": list(h.notes),
    }
    if r is None:
        return {**d, "generator": None, "hostnames": None, "window": None, "gpus": None, "headline": None,
                "idle_held_equivalent_gpus": None, "data_quality": None}
    q = r.quality
    return {
        **d,
        "generator": r.generator,
        "hostnames": list(r.hostnames),
        "window": {"since_ms": r.since_ms, "until_ms": r.until_ms, "tick_ms": r.tick_ms},
        "gpus": r.physical_gpus,
        "headline": _states(r.headline),
        "idle_held_equivalent_gpus": _equivalent(r.headline.idle_held_ms, r.until_ms - r.since_ms),
        "data_quality": {
            "utilization_coverage": rounded(q.coverage), "unknown_ms": q.unknown_ms, "holes_total": q.holes_total,
            "gap_events_total": q.gap_events_total, "unclean_stops": q.unclean_stops, "errors": q.errors,
            "warnings": list(q.warnings),
        },
    }


def _user(u: FleetUser) -> dict[str, Any]:
    return {
        "user": u.user, "uids": sorted(u.uids), "held_ms": u.held_ms, "idle_held_ms": u.idle_held_ms,
        "sm_unknown_ms": u.sm_unknown_ms if u.sm_unknown_complete else None,
        "mem_mib_ms": u.mem_mib_ms, "unknown_mem_ms": u.unknown_mem_ms,
        "held_gpu_hours": ms_to_hours(u.held_ms), "idle_held_gpu_hours": ms_to_hours(u.idle_held_ms),
        "mem_gb_hours": round(u.mem_mib_ms * 1_048_576 / 1e9 / HOUR_MS, 4),
        "gpus": u.gpus, "hosts_total": len(u.hosts),
        "hosts": [
            {"host": host, "uid": x.uid, "held_ms": x.held_ms, "idle_held_ms": x.idle_held_ms,
             "sm_unknown_ms": x.sm_unknown_ms, "mem_mib_ms": x.mem_mib_ms, "unknown_mem_ms": x.unknown_mem_ms,
             "gpus": list(x.gpus)}
            for host, x in u.hosts
        ],
    }


def to_dict(fleet: Fleet, tz_name: str) -> dict[str, Any]:
    t, wms = fleet.totals, fleet.window_ms
    merged = fleet.merged
    return {
        "format_version": FLEET_FORMAT_VERSION,
        "generator": f"gua-report {__version__}",
        "command": "merge",
        "window": None if fleet.since_ms is None or fleet.until_ms is None else {
            "since": iso_utc(fleet.since_ms), "until": iso_utc(fleet.until_ms),
            "since_ms": fleet.since_ms, "until_ms": fleet.until_ms, "hours": round(wms / HOUR_MS, 4),
            "tz": tz_name,
        },
        "rules": None if fleet.active_pm is None else {
            "active_threshold_permille": fleet.active_pm, "held_threshold_bytes": fleet.held_bytes,
        },
        "filters": {"gpus": list(fleet.filter_gpus), "users": list(fleet.filter_users)},
        "fleet": {
            "hosts_total": len(fleet.hosts),
            "hosts_merged": len(merged),
            "gpus": fleet.gpus,
            **_states(t),
            "active_gpu_hours": ms_to_hours(t.active_ms),
            "idle_held_gpu_hours": ms_to_hours(t.idle_held_ms),
            "idle_gpu_hours": ms_to_hours(t.idle_ms),
            "active_equivalent_gpus": _equivalent(t.active_ms, wms),
            "idle_held_equivalent_gpus": _equivalent(t.idle_held_ms, wms),
            "idle_equivalent_gpus": _equivalent(t.idle_ms, wms),
        },
        "hosts": [_host(h) for h in fleet.hosts],
        "identities": {"users": [_user(u) for u in fleet.users]},
        "worst_idle_held_gpus": [
            {"host": w.host, "uuid": w.gpu.uuid, "index": w.gpu.index, "name": w.gpu.name,
             "idle_held_ms": w.gpu.states.idle_held_ms, "total_ms": w.gpu.states.total_ms,
             "idle_held_share": rounded(w.gpu.states.share(w.gpu.states.idle_held_ms)),
             "idle_held_gpu_hours": ms_to_hours(w.gpu.states.idle_held_ms), "holders": list(w.holders)}
            for w in fleet.worst[:TOP_GPUS_JSON]
        ],
    }


def render_json(fleet: Fleet, tz_name: str) -> str:
    return json.dumps(to_dict(fleet, tz_name), indent=2) + "\n"


def render_csv(fleet: Fleet, tz_name: str) -> str:
    """section,subject,metric,value rows, as render_csv writes the host report."""
    d = to_dict(fleet, tz_name)
    rows: list[tuple[str, str, str, Any]] = []

    def block(section: str, subject: str, data: Any) -> None:
        rows.extend((section, subject, m, v) for m, v in flatten("", data))

    block("report", "", {k: d[k] for k in ("format_version", "generator", "command")})
    for key in ("window", "rules", "filters", "fleet"):
        if d[key] is not None:
            block(key, "", d[key])
    for h in d["hosts"]:
        block("host", h["host"], h)
    for u in d["identities"]["users"]:
        per_host = u.pop("hosts")
        block("user", u["user"], u)
        for x in per_host:
            block("user_host", f"{u['user']}/{x['host']}", x)
    for w in d["worst_idle_held_gpus"]:
        block("worst_gpu", f"{w['host']}/{w['uuid']}", w)
    buf = io.StringIO()
    w_plain = csv.writer(buf, lineterminator="\n")
    # A bare CR in a cell is not quoted by the csv module, but a spreadsheet
    # reads it as a line break: a host could forge rows. Quote such rows.
    w_quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    w_plain.writerow(HEADER)
    for section, subject, metric, value in rows:
        cells = (csv_text(section), csv_text(subject), csv_text(metric), csv_cell(value))
        (w_quoted if any("\r" in c for c in cells) else w_plain).writerow(cells)
    return buf.getvalue()


# ---------------------------------------------------------------- text

def _short(text: str, n: int = TEXT_CHARS) -> str:
    """Escaped, and at most n characters of it (escapes count, so the bound holds on screen)."""
    return _cut(safe(text[: n * 2]), n)


def _wrapped(add: Any, text: str, indent: str = "  ", more: str = "    ") -> None:
    """A long line (already escaped) over several, never past 80 columns."""
    for line in textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=more,
                              break_long_words=True, break_on_hyphens=False):
        add(line)


def render_text(fleet: Fleet, tz: tzinfo, tz_name: str) -> str:
    out: list[str] = []
    add = out.append
    merged = fleet.merged
    n_hosts, n_merged = len(fleet.hosts), len(merged)
    head = f"gua-report fleet: {n_hosts} host{'s' if n_hosts != 1 else ''}, {n_merged} merged"
    if n_hosts > n_merged:
        head += f", {n_hosts - n_merged} not (see HOSTS)"
    add(head)
    if fleet.since_ms is not None and fleet.until_ms is not None:
        add(f"{fmt_local(fleet.since_ms, tz)} -> {fmt_local(fleet.until_ms, tz)} {safe(tz_name)} "
            f"({fleet.window_ms / HOUR_MS:.1f} h window)")
    if fleet.filter_gpus or fleet.filter_users:
        filt = [f"GPUs {','.join(safe(g) for g in fleet.filter_gpus)}"] if fleet.filter_gpus else []
        filt += [f"users {','.join(safe(u) for u in fleet.filter_users)}"] if fleet.filter_users else []
        add(_cut("filter: " + "; ".join(filt), WIDTH))
    if merged:
        _totals(add, fleet)
    else:
        add("")
        add("No host could be merged: each host's line below says why.")
    _hosts(add, fleet)
    if merged:
        _users(add, fleet)
        _worst(add, fleet)
        _quality(add, fleet)
    return "\n".join(out) + "\n"


def _totals(add: Any, fleet: Fleet) -> None:
    t, wms = fleet.totals, fleet.window_ms
    n = len(fleet.merged)
    add("")
    add(f"FLEET GPU TIME ({n} host{'s' if n != 1 else ''})")
    add(_bar([("active", t.active_ms), ("idle_held", t.idle_held_ms), ("idle", t.idle_ms)],
             WIDTH - 2, _Style(False)))
    add(f"  # active {_pct(t.share(t.active_ms))}   + idle-held {_pct(t.share(t.idle_held_ms))}   "
        f". truly idle {_pct(t.share(t.idle_ms))}")
    line = f"  {_h(t.total_ms)} GPU-h on {fleet.gpus} GPU{'s' if fleet.gpus != 1 else ''}"
    if t.unknown_ms:
        line += f", {_h(t.unknown_ms)} GPU-h unknown (not in the split)"
    add(line)
    for label, ms in (("idle-held", t.idle_held_ms), ("truly idle", t.idle_ms)):
        eq = ms / wms if wms else 0.0
        add(f"  {label:<11}{_h(ms):>10} GPU-h  = {eq:6.2f} GPUs on average")
    add(f"  (equivalent GPUs = GPU-hours / {wms / HOUR_MS:.1f} window hours)")
    if fleet.active_pm is not None and fleet.held_bytes is not None:
        add(f"  Rules: active = SM util >= {fleet.active_pm / 10:g} %; idle-held = below that while"
            " compute")
        add(f"  processes hold > {_size(fleet.held_bytes)} (or unknown memory); else truly idle.")


def _hosts(add: Any, fleet: Fleet) -> None:
    add("")
    add("HOSTS")
    add(f"  {'host':<24} {'GPUs':>4} {'GPU-h':>8} {'active':>6} {'held':>6} {'idle':>6}  status")
    for h in fleet.hosts:
        name = _cut(safe(h.label), 24)
        status = STATUS_TEXT.get(h.status, h.status)
        r = h.report
        if r is None:
            add(f"  {name:<24} {'-':>4} {'-':>8} {'-':>6} {'-':>6} {'-':>6}  {status}")
            continue
        s = r.headline
        add(f"  {name:<24} {r.physical_gpus:>4} {_h(s.total_ms):>8} {_pct(s.share(s.active_ms))} "
            f"{_pct(s.share(s.idle_held_ms))} {_pct(s.share(s.idle_ms))}  {status}")
    for h in fleet.hosts:
        if h.reason:
            _wrapped(add, f"{_short(h.label, 40)}: {_short(h.reason)}")


def _users(add: Any, fleet: Fleet) -> None:
    add("")
    add("TOP IDENTITIES ACROSS HOSTS (held = compute memory over the threshold)")
    if not fleet.users:
        add("  no process held a GPU on any merged host in this window")
        return
    add(f"  {'user / host':<32} {'GPU-h held':>10} {'idle-held':>10} {'idle %':>6} {'GB-h mem':>10} "
        f"{'GPUs':>4}")

    def row(name: str, held: int, idle: int, mib_ms: int, unknown_mem: int, gpus: int) -> str:
        pct = f"{idle / held * 100 if held else 0.0:5.0f}%"
        gbh = mib_ms * 1_048_576 / 1e9 / HOUR_MS
        return (f"  {_cut(name, 32):<32} {_h(held):>10} {_h(idle):>10} {pct:>6} {gbh:>9.1f}"
                f"{'*' if unknown_mem else ' '} {gpus:>4}")

    for u in fleet.users[:TOP_USERS]:
        hosts = len(u.hosts)
        name = f"{safe(u.user)} ({hosts} hosts)" if hosts > 1 else safe(u.user)
        add(row(name, u.held_ms, u.idle_held_ms, u.mem_mib_ms, u.unknown_mem_ms, u.gpus))
        if hosts > 1:
            for host, x in u.hosts[:HOSTS_PER_USER]:
                add(row(f"  {safe(host)}", x.held_ms, x.idle_held_ms, x.mem_mib_ms, x.unknown_mem_ms,
                        len(x.gpus)))
            if hosts > HOSTS_PER_USER:
                add(f"      ... {hosts - HOSTS_PER_USER} more hosts (see --format json)")
    if len(fleet.users) > TOP_USERS:
        rest = fleet.users[TOP_USERS:]
        add(f"  ... {len(rest)} more, {_h(sum(u.held_ms for u in rest))} GPU-h held")
    if any(u.unknown_mem_ms for u in fleet.users):
        add("  * memory not reported by NVML for part of the time: counted as held,")
        add("    not included in GB-h")
    if any(u.sm_unknown_ms for u in fleet.users):
        add("  Part of the held time had per-process SM unknown (MIG, unsupported): there")
        add("    idle-held is a lower bound (see each host's report).")


def _worst(add: Any, fleet: Fleet) -> None:
    add("")
    add("WORST IDLE-HELD GPUS")
    if not fleet.worst:
        add("  no GPU was idle-held on any merged host in this window")
        return
    add(f"  {'host':<20} {'#':>3}  {'name':<18} {'idle-held':>9} {'share':>6}  held by")
    for w in fleet.worst[:TOP_GPUS]:
        s = w.gpu.states
        row = (f"  {_cut(safe(w.host), 20):<20} {w.gpu.index:>3}  "
               f"{_cut(safe(w.gpu.name.removeprefix('NVIDIA ')), 18):<18} {_h(s.idle_held_ms):>9} "
               f"{_pct(s.share(s.idle_held_ms))}  ")
        holders = ", ".join(safe(u) for u in w.holders) or "-"
        add(row + _cut(holders, WIDTH - len(row)))
    if len(fleet.worst) > TOP_GPUS:
        add(f"  ... {len(fleet.worst) - TOP_GPUS} more idle-held GPUs (see --format json)")
    add("  (idle-held GPU-h; share of the GPU's known time; held by: users whose")
    add("   processes held it at some time in the window)")


def _quality(add: Any, fleet: Fleet) -> None:
    add("")
    add("DATA QUALITY (per host; gua-report --since ... on the host for details)")
    for h in fleet.hosts:
        r = h.report
        if r is None or h.status != MERGED and not r.quality.warnings and not h.notes:
            continue
        q = r.quality
        parts = []
        if q.coverage is None:
            parts.append("coverage -")
        elif q.coverage < LOW_COVERAGE:
            parts.append(f"coverage {q.coverage * 100:.1f} % (low: utilization less trustworthy)")
        else:
            parts.append(f"coverage {q.coverage * 100:.1f} %")
        parts.append(f"{q.holes_total} gap(s)" if q.holes_total else "no gaps")
        if q.unclean_stops:
            parts.append(f"{q.unclean_stops} unclean stop(s)")
        parts.append(f"{q.errors} NVML/collector error(s)" if q.errors else "no errors")
        if q.unknown_ms:
            parts.append(f"{_h(q.unknown_ms)} GPU-h unknown")
        _wrapped(add, f"{_short(h.label, 40)}: " + "; ".join(parts))
        for note in h.notes:
            _wrapped(add, f"note: {_short(note)}", indent="    ", more="      ")
        for w in q.warnings[:WARNINGS_N]:
            _wrapped(add, f"warning: {_short(w)}", indent="    ", more="      ")
        if len(q.warnings) > WARNINGS_N:
            add(f"    ... {len(q.warnings) - WARNINGS_N} more warnings (see --format json)")
