"""The human report: fits 80 columns, ASCII only (ssh sessions, any locale).

Colour is added only when the caller says so (--color, see cli.py); the
layout is the same either way. Every string that comes from the database
(names, units, GPU and host names, event details, the filters typed) goes
through `safe` exactly once, where it is read from the Report: terminal
controls and bidi characters are shown as escapes, never sent.
"""

from __future__ import annotations

import re

from .classify import HOLE_MIN_MS, Identity, Report
from .errors import escape as safe
from .window import HOUR_MS, fmt_duration, fmt_local

WIDTH = 80
TOP_N = 10
LIST_N = 8
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")

_GLYPH = {"active": "#", "idle_held": "+", "idle": "."}
_COLOUR = {"active": "32", "idle_held": "33", "idle": "2", "head": "1"}


class _Style:
    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def __call__(self, key: str, text: str) -> str:
        if not self.colour or not text:
            return text
        return f"\x1b[{_COLOUR[key]}m{text}\x1b[0m"


def _pct(x: float | None, width: int = 5) -> str:
    return f"{x * 100:{width}.1f}%" if x is not None else " " * (width - 1) + "-%"


def _h(ms: int) -> str:
    """GPU-hours: two decimals for small numbers, so short windows stay legible."""
    h = ms / HOUR_MS
    return f"{h:.2f}" if h < 10 else f"{h:.1f}"


def _bar(parts: list[tuple[str, int]], width: int, st: _Style) -> str:
    """A 3-part bar; widths by largest remainder so they add up exactly."""
    total = sum(v for _, v in parts)
    if total <= 0:
        return "[" + " " * width + "]"
    exact = [v * width / total for _, v in parts]
    cells = [int(x) for x in exact]
    order = sorted(range(len(parts)), key=lambda i: exact[i] - cells[i], reverse=True)
    for i in order[: width - sum(cells)]:
        cells[i] += 1
    return "[" + "".join(st(k, _GLYPH[k] * n) for (k, _), n in zip(parts, cells)) + "]"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "~"


def render(rep: Report, colour: bool = False) -> str:
    st = _Style(colour)
    o = rep.options
    tz = o.tz
    out: list[str] = []
    add = out.append
    h = rep.headline
    window_h = rep.window_ms / HOUR_MS

    def section(title: str) -> None:
        add("")
        add(st("head", title))

    tz_name = safe(o.tz_name)
    hosts = ", ".join(safe(x) for x in rep.hostnames) or "unknown host"
    add(st("head", _cut(f"gua-report: {hosts}", WIDTH)))
    add(f"{fmt_local(o.since_ms, tz)} -> {fmt_local(o.until_ms, tz)} {tz_name} "
        f"({window_h:.1f} h window)")
    users = ",".join(safe(u) for u in o.users)
    filt = []
    if o.gpus:
        filt.append("GPUs " + ",".join(safe(g) for g in o.gpus))
    if o.users:
        filt.append("users " + users)
    if filt:
        add(_cut("filter: " + "; ".join(filt), WIDTH))
    if o.users:
        # The state of a GPU-tick belongs to the card, not to one of its users:
        # say which numbers the user filter changes, so none is misread.
        add("  --user applies to TOP IDENTITIES and the per-process SM lines only;")
        add("  the other sections describe whole GPUs, whoever used them.")

    # 1. Headline
    section("GPU TIME")
    add(_bar([("active", h.active_ms), ("idle_held", h.held_ms), ("idle", h.idle_ms)], WIDTH - 2, st))
    add(f"  {st('active', '#')} active {_pct(h.share('active'))}   "
        f"{st('idle_held', '+')} idle-held {_pct(h.share('idle_held'))}   "
        f"{st('idle', '.')} truly idle {_pct(h.share('idle'))}")
    n_phys = len(rep.physical)
    line = f"  {_h(h.total_ms)} GPU-h on {n_phys} GPU{'s' if n_phys != 1 else ''}, {h.ticks:,} GPU-ticks"
    if h.unknown_ms:
        line += f", {_h(h.unknown_ms)} GPU-h unknown (not in the split)"
    add(line)
    add(f"  Rules: active = SM util >= {o.active_pm / 10:g} %; idle-held = below that while"
        f" compute")
    held = f"  processes hold > {_size(o.held_bytes)} (or unknown memory); else truly idle."
    if len(held) + len(" Basis: physical") <= WIDTH:
        add(held + " Basis: physical")
        add("  GPUs, time = sum of measured tick durations; shares of known time.")
    else:  # a held threshold in bytes that no unit divides
        add(held)
        add("  Basis: physical GPUs, time = sum of measured tick durations;")
        add("  shares of known time.")
    if rep.threshold_note:
        _wrapped(add, "Note: " + rep.threshold_note + ".")

    # 2. Idle capacity
    section("IDLE CAPACITY")
    for label, ms in (("idle-held", h.held_ms), ("truly idle", h.idle_ms)):
        eq = ms / rep.window_ms if rep.window_ms else 0.0
        add(f"  {label:<11}{_h(ms):>10} GPU-h  = {eq:5.2f} GPUs on average")
    add(f"  (equivalent GPUs = GPU-hours / {window_h:.1f} window hours)")

    # 3. Per GPU
    section("PER GPU")
    # GPM SM activity (Hopper+): a column only when some GPU reported it.
    gpm = any(g.totals.gpm_known_ms for g in rep.gpus)
    sm_head = f" {'SM act':>6}" if gpm else ""
    add(f"  {'#':>4} {'name':<20} {'GPU-h':>7} {'active':>6} {'held':>6} {'idle':>6}{sm_head}  notes")
    for g in rep.gpus:
        t = g.totals
        idx = f"{g.parent.index}.{g.row.mig_slot}" if g.is_mig and g.parent else str(g.row.index)
        notes = ", ".join(g.notes(tz) + ([f"starved {_hours_short(t.starved_ms)}h"] if t.starved_ms else []))
        name = safe(g.row.name.removeprefix("NVIDIA "))  # every card says it; the model is what matters
        sm = f" {_pct(t.sm_active, 5)}" if gpm else ""
        row = (f"  {idx:>4} {_cut(name, 20):<20} {_h(t.total_ms):>7} "
               f"{_pct(t.share('active'), 5)} {_pct(t.share('idle_held'), 5)} "
               f"{_pct(t.share('idle'), 5)}{sm}  ")
        add(row + _cut(notes, WIDTH - len(row)) if notes else row.rstrip())
    if gpm:
        _starved(add, rep)

    # 4. Identities
    section("TOP IDENTITIES (held = compute memory over the threshold; once per GPU+tick)")
    if not rep.users:
        add(_cut(f"  no process of {users} held a GPU in this window" if o.users
                 else "  no process held a GPU in this window", WIDTH))
    else:
        # The SM-unknown column costs the name column 4 characters: shown only when needed.
        sm_col = any(i.sm_unknown_ms for i in rep.users[:TOP_N] + rep.units[:TOP_N])
        _identity_table(add, rep.users, "user", sm_col)
        if rep.units:
            add("")
            _identity_table(add, rep.units, "unit (user)", sm_col)
        if any(i.unknown_mem_ms for i in rep.users + rep.units):
            add("  * memory not reported by NVML for part of the time: counted as held,")
            add("    not included in GB-h")
        if sm_col:
            add("  SM ?: share of held time with per-process SM unknown (MIG, unsupported),")
            add("    counted neither idle-held nor busy; ? = SM never known: idle-held unknown")
        _cpu_split(add, rep)

    # 5. Heatmap
    section(f"ACTIVE SHARE BY WEEKDAY AND HOUR ({tz_name}; tens of %, blank = no data)")
    add("     " + "".join(f"{hr:>3d}" if hr % 3 == 0 else "   " for hr in range(24)).rstrip())
    for wd in range(7):
        cells = []
        for hr in range(24):
            a, k = rep.heat.get(wd * 24 + hr, (0, 0))
            if not k:
                cells.append("   ")
            else:
                share = a / k
                # One digit per cell: 0 = under 10 %, 9 = 90 % or more; * = all active.
                glyph = "*" if a == k else str(min(9, int(share * 10)))
                cells.append(f"  {glyph}")
        add(f"  {WEEKDAYS[wd]}" + "".join(cells).rstrip())
    add("  (digit d: d*10 % to d*10+9 % of known GPU time active; * = 100 %)")

    # 6. Energy
    section("ENERGY")
    eg = rep.energy_gpus
    if not eg:
        add("  no GPU reported energy (NVML energy counter needs Volta or newer)")
    else:
        e: dict[str, int | None] = {"active": None, "idle_held": None, "idle": None}
        for g in eg:
            for key, v in (("active", g.totals.energy_active_mj), ("idle_held", g.totals.energy_held_mj),
                           ("idle", g.totals.energy_idle_mj)):
                if v is not None:
                    e[key] = (e[key] or 0) + v
        tot = sum(v or 0 for v in e.values())

        def kwh(v: int | None) -> str:
            return "-" if v is None else f"{v / 3.6e9:.2f} kWh"

        add(f"  {len(eg)} of {len(rep.physical)} GPUs reported energy; total {tot / 3.6e9:.2f} kWh"
            " (unknown-state time not split)")
        add(f"  active {kwh(e['active'])}   idle-held {kwh(e['idle_held'])}   "
            f"truly idle {kwh(e['idle'])}")

    # 7. Data quality
    section("DATA QUALITY")
    cov = h.coverage
    add(f"  utilization coverage: {'-' if cov is None else f'{cov * 100:.1f} %'} of known GPU time "
        "covered by driver samples")
    if rep.first_tick_ms is not None and rep.first_tick_ms - o.since_ms > HOLE_MIN_MS:
        add(f"  first sample in window: {fmt_local(rep.first_tick_ms, tz)} (no data before)")
    if h.unknown_ms:
        add(f"  unknown: {_h(h.unknown_ms)} GPU-h (NVML errors, lost GPUs, util not supported)")
    sm_users = rep.sm_unknown_users
    if sm_users:
        n = len(sm_users)
        add(f"  per-process SM unknown: {_h(sum(i.sm_unknown_ms for i in sm_users))} GPU-h held by "
            f"{n} user{'s' if n != 1 else ''} (MIG, unsupported);")
        add("    their idle-held is a lower bound")
    unrecorded = sum(i.sm_unrecorded_ms for i in rep.users)
    if rep.sm_recorded_since_ms is not None and unrecorded:
        add(f"  SM-unknown time not recorded before {fmt_local(rep.sm_recorded_since_ms, tz)} "
            "(schema 1 rollups):")
        add(f"    idle-held of the {_h(unrecorded)} GPU-h held before then is a lower bound")
    if rep.holes_total or rep.gap_events_total:
        add(f"  gaps: {rep.holes_total} stretch(es) >= {HOLE_MIN_MS // 60000} min without ticks, "
            f"{rep.gap_events_total} gap event(s)")
        for x in rep.holes[:LIST_N]:
            why = next((g.detail for g in rep.gap_events
                        if g.end_ms is not None and g.start_ms < x.end_ms and g.end_ms > x.start_ms), "")
            add(_cut(f"    {fmt_local(x.start_ms, tz)[5:]} -> {fmt_local(x.end_ms, tz)[5:]} "
                     f"({fmt_duration(x.end_ms - x.start_ms)})"
                     + (f" {safe(why)}" if why else "") + (" no later samples" if x.open_ended else ""), WIDTH))
        if rep.holes_total > LIST_N:
            add(f"    ... {rep.holes_total - LIST_N} more (see --format json)")
    else:
        add(f"  gaps: none (no stretch >= {HOLE_MIN_MS // 60000} min without ticks)")
    if h.overlap_ms or rep.overlap.hours:
        n = len(rep.overlap.hours)
        add(f"  overlap: ticks covering the same time twice in {n} UTC hour{'s' if n != 1 else ''} "
            "(clock set")
        add(f"    back, run replayed): {_h(h.overlap_ms)} GPU-h counted once, not twice")
    if rep.overlap.unremoved_hours:
        n = len(rep.overlap.unremoved_hours)
        add(f"  overlap kept in {n} UTC hour{'s' if n != 1 else ''} whose raw samples retention removed:")
        add(f"    about {_h(rep.overlap.unremoved_ms)} GPU-h there are counted twice (rollups only)")
    if rep.heat_note:
        _wrapped(add, f"heatmap: {rep.heat_note}")
    unclean = [r for r in rep.runs if r.clean is False]
    add(f"  collector runs: {len(rep.runs)} in window, {len(unclean)} unclean stop(s)")
    for r in unclean[:LIST_N]:
        when = fmt_local(r.last_tick_ms, tz) if r.last_tick_ms else "?"
        add(f"    run {r.run_id} started {fmt_local(r.started_ms, tz)[5:]}, last tick {when[5:]}, no clean stop")
    err_lines = []
    for g in rep.gpus:
        for err in g.errors:
            err_lines.append(f"    GPU {g.row.index}{'.' + str(g.row.mig_slot) if g.is_mig else ''}: "
                             f"{err.count} {safe(err.kind)} {fmt_local(err.first_ms, tz)[5:]} .. "
                             f"{fmt_local(err.last_ms, tz)[5:]} {safe(err.last_detail)}")
    for err in rep.host_errors:
        err_lines.append(f"    host: {err.count} {safe(err.kind)} {fmt_local(err.first_ms, tz)[5:]} .. "
                         f"{fmt_local(err.last_ms, tz)[5:]} {safe(err.last_detail)}")
    add(f"  NVML/collector errors: {'none' if not err_lines else ''}".rstrip())
    for line in err_lines[:LIST_N * 2]:
        add(_cut(line, WIDTH))
    for w in rep.warnings:
        _wrapped(add, f"warning: {safe(w)}")  # whole: a cut warning hides what to do about it
    return "\n".join(out) + "\n"


def _hours_short(ms: int) -> str:
    h = ms / HOUR_MS
    return f"{h:.2f}" if h < 1 else f"{h:.1f}"


def _starved(add, rep: Report) -> None:
    """Under the per-GPU table: active-but-starved time, and who was busy on a starved GPU."""
    o = rep.options
    physical = [g.totals for g in rep.physical if g.totals.gpm_known_ms]
    starved = sum(t.starved_ms for t in physical)
    add("  SM act: GPM SM activity, mean over the time it was known; -: no GPM")
    if physical:
        add(f"  active-but-starved: {_h(starved)} GPU-h (util >= {o.active_pm / 10:g} % but SM activity "
            f"< {rep.starved_pm / 10:g} %)")
    if rep.gpm_recorded_since_ms is not None:
        add(f"  GPM not recorded before {fmt_local(rep.gpm_recorded_since_ms, o.tz)} (older rollups)")
    if not rep.identity_starved_known:
        add("  busy on a starved GPU, per identity: unknown (histogram rollups; see --no-rollups)")
        return
    who = sorted((i for i in rep.users if i.starved(True)), key=lambda i: (-i.starved_ms, i.user))
    if who:
        text = ", ".join(f"{safe(i.user)} {_h(i.starved_ms)}" for i in who[:LIST_N])
        add(_cut(f"  busy on a starved GPU (GPU-h): {text}", WIDTH))


def _wrapped(add, text: str) -> None:
    """Text already escaped (or gua's own words), wrapped to the width, continued indented."""
    import textwrap  # only when there is a note to wrap

    for i, line in enumerate(textwrap.wrap(text, WIDTH - 4)):
        add(("  " if i == 0 else "    ") + line)


def _size(b: int) -> str:
    for unit, f in (("GB", 10**9), ("MB", 10**6)):
        if b >= f and b % (f // 1000) == 0:
            return f"{b / f:g} {unit}"
    for unit, f in (("GiB", 2**30), ("MiB", 2**20)):
        if b >= f and b % f == 0:
            return f"{b // f} {unit}"
    return f"{b} B"


def _cpu_split(add, rep: Report) -> None:
    """Idle-held GPU-hours of the listed identities by their CPU: abandoned, waiting on CPU, unknown."""
    users = [i for i in rep.users[:TOP_N] if i.idle_held_ms]
    units = [i for i in rep.units[:TOP_N] if i.idle_held_ms]
    if not users and not units:
        return
    add("")
    pct = f"{rep.cpu_busy_pm / 10:g} %"
    _wrapped(add, f"Idle-held by CPU: waiting on CPU = the identity's processes on that GPU used >= {pct} "
                  "of one core together in the tick (loading data); abandoned = less; CPU ? = not measured.")
    for rows, label in ((users, "user"), (units, "unit (user)")):
        if not rows:
            continue
        add(f"  {label:<33} {'idle-held':>9} {'abandoned':>10} {'waiting on CPU':>15} {'CPU ?':>6}")
        for i in rows:
            unit = safe(re.sub(r"([0-9a-f]{12})[0-9a-f]{4,}", r"\1", i.unit))
            name = f"{unit} ({safe(i.user)})" if i.unit else safe(i.user)
            add(f"  {_cut(name, 33):<33} {_h(i.idle_held_ms):>9} {_h(i.abandoned_ms):>10} "
                f"{_h(i.idle_cpu_busy_ms):>15} {_h(i.idle_cpu_unknown_ms):>6}")


def _identity_table(add, rows: list[Identity], label: str, sm_col: bool = False) -> None:
    # 80 columns either way: the SM ? column (6) takes 4 from the name and 1
    # each from idle-held and GB-h mem.
    name_w, idle_w, mem_w = (29, 9, 8) if sm_col else (33, 10, 9)
    sm_head = f" {'SM ?':>5}" if sm_col else ""
    add(f"  {label:<{name_w}} {'GPU-h held':>10} {'idle-held':>{idle_w}} {'idle %':>6}{sm_head} "
        f"{'GB-h mem':>{mem_w + 1}} {'GPUs':>4}")
    for i in rows[:TOP_N]:
        # Container ids are 64 hex digits; 12 identify them, as `docker ps` shows.
        unit = safe(re.sub(r"([0-9a-f]{12})[0-9a-f]{4,}", r"\1", i.unit))
        name = f"{unit} ({safe(i.user)})" if i.unit else safe(i.user)
        flag = "*" if i.unknown_mem_ms else " "
        if i.sm_all_unknown:
            # Nothing says whether it idled: 0 would read as "busy all the time".
            idle, idle_pct = "?", "?"
        else:
            idle = _h(i.idle_held_ms)
            idle_pct = f"{i.idle_held_ms / i.held_ms * 100 if i.held_ms else 0.0:5.0f}%"
        sm = ""
        if sm_col:
            share = i.sm_unknown_ms / i.held_ms if i.held_ms else 0.0
            sm = " " + ("-" if not i.sm_unknown_ms else "<1%" if share < 0.005 else f"{share * 100:.0f}%").rjust(5)
        add(f"  {_cut(name, name_w):<{name_w}} {_h(i.held_ms):>10} {idle:>{idle_w}} "
            f"{idle_pct:>6}{sm} {i.mem_gb_hours:>{mem_w}.1f}{flag} {len(i.gpu_ids):>4}")
    if len(rows) > TOP_N:
        rest = rows[TOP_N:]
        add(f"  ... {len(rest)} more, {_h(sum(i.held_ms for i in rest))} GPU-h held")
