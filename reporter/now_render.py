"""Output of `gua-report now`: text (80 columns), JSON, CSV, and the --check status line.

Every string from the database (user, command, unit, GPU and host names)
goes through `escape` in text and in the status line; JSON carries the
exact strings; CSV carries them too, with formula-like cells neutralised.
The JSON and CSV shapes are a contract: JSON.md, "gua-report now".
"""

from __future__ import annotations

import csv
import io
import json
import re
import textwrap
from datetime import datetime
from typing import Any

from . import __version__
from .errors import escape
from .now import (
    ACTIVE_PERMILLE,
    CHECK_CRITICAL,
    CHECK_OK,
    CHECK_UNKNOWN,
    CHECK_WARNING,
    CPU_STATES,
    HELD_BYTES,
    MIB,
    NotRecording,
    NowReport,
    ProcNow,
)
from .window import fmt_duration, fmt_local, iso_utc

# 1: first version (gua 0.2). 2: CPU beside the GPU; freeable_* count the
# abandoned only, --check no longer counts processes waiting on CPU (JSON.md).
# Its own number: the window report's format_version (render_json.FORMAT_VERSION)
# moves independently.
NOW_FORMAT_VERSION = 2
WIDTH = 80

_STATE_TEXT = {"active": "active", "idle_held": "idle-held", "idle": "idle", "unknown": "unknown",
               "sm_unknown": "SM unknown", "graphics": "display"}


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "~"


def _mem(mib: int | None) -> str:
    if mib is None:
        return "?"
    return f"{mib} MiB" if mib < 1024 else f"{mib / 1024:.1f} GiB"


def _sm(pct: int | None) -> str:
    return "?" if pct is None else f"{pct}%"


def _short(mib: int | None) -> str:
    """Memory in at most 5 columns: 512M, 30.0G, 141G."""
    if mib is None:
        return "?"
    if mib < 1024:
        return f"{mib}M"
    return f"{mib / 1024:.1f}G" if mib < 100 * 1024 else f"{mib // 1024}G"


def _cpu(permille: int | None) -> str:
    """Per cent of one core, floored like SM and util (9.5 % is below a 10 % rule); 5 columns."""
    if permille is None:
        return "?"
    pct = permille // 10
    return f"{pct}%" if pct < 10_000 else f"{permille // 1000}c"  # 100 cores and up: cores


def _pct(permille: int) -> str:
    return f"{permille / 10:g}%"


def _since(ts_ms: int, as_of_ms: int, rep: NowReport) -> str:
    """Like ps STIME: HH:MM the same local day, else MonDD (5 columns)."""
    t = datetime.fromtimestamp(ts_ms / 1000, rep.tz)
    same_day = t.date() == datetime.fromtimestamp(as_of_ms / 1000, rep.tz).date()
    return t.strftime("%H:%M") if same_day else t.strftime("%b%d")


def _span(ms: int) -> str:
    """A threshold as typed: 2h, 90m -> 1h30m, 1d (fmt_duration without its zero parts)."""
    text = fmt_duration(ms)
    return re.sub(r"(?<=[dh])00[hm]$", "", text)


def _idle(p: ProcNow) -> str:
    assert p.idle_ms is not None
    return (">" if p.lower_bound else "") + fmt_duration(p.idle_ms)


# --- text -----------------------------------------------------------------------------------
# 80 columns with SINCE; VRAM is GPU memory, RSS host memory, CPU % of one core. UNIT keeps
# "slurm:job_NNNN" whole. Idle-held rows need no SM column (below 10 % by definition); the
# others show SM in STATE ("active 70%"), which leaves room for 10 characters there.
_PROC_COLS = f"  {'GPU':>4} {'PID':>7} {'USER':<8} {'UNIT':<14} {'COMMAND':<9} {'VRAM':>5} {'CPU':>5} {'RSS':>5}"
_HELD_HEAD = _PROC_COLS + f" {'IDLE':>7} SINCE"
_OTHER_HEAD = _PROC_COLS + " STATE"
_SECTION = {
    "abandoned": "ABANDONED: idle-held, CPU below {rule} of a core, longest idle first",
    "waiting_on_cpu": "WAITING ON CPU: idle-held, CPU >= {rule} of a core in the last {window}",
    "cpu_unknown": "CPU UNKNOWN: idle-held, CPU not measured",
}


def _proc_cols(p: ProcNow) -> str:
    unit = re.sub(r"([0-9a-f]{12})[0-9a-f]{4,}", r"\1", p.unit)  # container ids: 12 digits, as docker ps
    return (f"  {p.gpu.label:>4} {p.pid:>7} {_cut(escape(p.user), 8):<8} {_cut(escape(unit) or '-', 14):<14} "
            f"{_cut(escape(p.comm), 9):<9} {_short(p.mem_mib):>5} {_cpu(p.cpu_permille):>5} {_short(p.rss_mib):>5}")


def _held_row(p: ProcNow, rep: NowReport) -> str:
    assert p.idle_since_ms is not None
    return _proc_cols(p) + f" {_idle(p):>7} {_since(p.idle_since_ms, rep.as_of_ms, rep)}"


def _other_row(p: ProcNow) -> str:
    if p.state == "active":
        state = f"active {_sm(p.sm_util)}"
    elif p.state == "idle":
        state = f"idle {_idle(p)}"
    else:
        state = _STATE_TEXT[p.state]
    return _proc_cols(p) + " " + state


def _plural(n: int, word: str = "process") -> str:
    """"1 process", "2 processes" (every noun here is one)."""
    return f"{n} {word}" + ("" if n == 1 else "es")


def _memory_total(procs: list[ProcNow]) -> str:
    unknown = sum(1 for p in procs if p.mem_mib is None)
    more = f" + {unknown} of unknown size" if unknown else ""
    return _mem(sum(p.mem_mib or 0 for p in procs)) + more


def _host_cpu(rep: NowReport) -> str:
    if not rep.cpu_recorded:
        return f"host CPU: not recorded (schema {rep.schema_version} database)"
    if rep.host_cpu_permille is None:
        return "host CPU: ? (not measured over the newest tick)"
    return f"host CPU: {_cpu(rep.host_cpu_permille)} busy over the newest tick (all cores together)"


def _para(text: str) -> list[str]:
    return ["  " + line for line in textwrap.wrap(text, WIDTH - 2, break_on_hyphens=False)]


def render_text(rep: NowReport) -> str:
    out: list[str] = []
    add = out.append
    tz = escape(rep.tz_name)
    age = max(0, rep.now_ms - rep.as_of_ms)
    rule, window = _pct(rep.cpu_busy_permille), _span(rep.cpu_window_ms)
    add(_cut(f"gua-report now: {escape(rep.hostname)}", WIDTH))
    add(_cut(f"as of {fmt_local(rep.as_of_ms, rep.tz, seconds=True)} {tz} (newest tick, {fmt_duration(age)} "
             f"ago; ticks every {fmt_duration(rep.interval_ms)})", WIDTH))
    add(_host_cpu(rep))

    add("")
    add("GPUS")
    add(f"  {'#':>4} {'NAME':<22} {'STATE':<10} {'SM':>4} {'MEMORY USED':>19}  PROCESSES")
    nprocs = {g.gpu_id: 0 for g in rep.gpus}
    for p in rep.procs:
        nprocs[p.gpu.gpu_id] += 1
    for g in rep.gpus:
        name = _cut(escape(g.name.removeprefix("NVIDIA ")), 22)
        state = _STATE_TEXT[g.state] if g.status == "ok" else f"NVML {g.status}"
        util = "?" if g.util_permille is None else f"{g.util_permille // 10}%"
        total = "?" if g.memory_total is None else f"{g.memory_total / MIB / 1024:.1f}"
        used = "?" if g.mem_used_mib is None else f"{g.mem_used_mib / 1024:.1f}"
        add(f"  {g.label:>4} {name:<22} {state:<10} {util:>4} {used + ' / ' + total + ' GiB':>19}  "
            f"{nprocs[g.gpu_id]}")
    if not rep.gpus:
        add("  no GPU in the newest tick")

    add("")
    if not rep.idle_held:
        add("IDLE-HELD: none (no process holds GPU memory below the SM threshold)")
    else:
        for cpu_state in CPU_STATES:
            procs = rep.with_cpu_state(cpu_state)
            if not procs and cpu_state != "abandoned":
                continue
            if not procs:
                add("ABANDONED: none known (no idle-held process is known to be idle on CPU too)")
                add("")
                continue
            add(_cut(_SECTION[cpu_state].format(rule=rule, window=window), WIDTH))
            add(_HELD_HEAD)
            for p in procs:
                add(_held_row(p, rep))
            n = len(procs)
            if cpu_state == "abandoned":
                add(_cut(f"  {_plural(n, 'abandoned process')} could free {_memory_total(procs)}", WIDTH))
            elif cpu_state == "waiting_on_cpu":
                add(_cut(f"  {_plural(n)} waiting on CPU {'hold' if n != 1 else 'holds'} {_memory_total(procs)}: "
                         "working, not counted as freeable", WIDTH))
                if any(p.cpu_permille is None or p.cpu_permille < rep.cpu_busy_permille for p in procs):
                    add(_cut(f"  CPU is the newest tick's: one below {rule} now reached it earlier in the "
                             f"last {window}", WIDTH))
            else:
                add(_cut(f"  {_plural(n)} with CPU unknown {'hold' if n != 1 else 'holds'} "
                         f"{_memory_total(procs)}", WIDTH))
            add("")
        out.pop()  # the blank line after the last section

    others = [p for p in rep.procs if p.state != "idle_held"]
    if others:
        add("")
        add("OTHER PROCESSES HOLDING GPU MEMORY")
        add(_OTHER_HEAD)
        for p in others:
            add(_other_row(p))

    add("")
    rules = (f"Rules: active = SM >= {ACTIVE_PERMILLE / 10:g} % over the newest tick. A compute process below "
             f"that holding > {HELD_BYTES // 1_000_000} MB (or memory NVML cannot report) is idle-held; display "
             f"servers never are. IDLE: time since it last reached {ACTIVE_PERMILLE / 10:g} % on that GPU (or "
             f"was first seen, had SM unknown, or went unobserved > 5 min); SINCE: when, in {tz}. SM unknown: "
             "NVML does not report it (MIG, unsupported), never counted as idle. CPU: % of one core over the "
             "newest tick, its child processes (DataLoader workers) included; "
             "VRAM: GPU memory, RSS: resident host memory (M, G: MiB, GiB).")
    source = ("meta rollup_cpu_busy_permille" if rep.cpu_busy_from_meta
              else "the collector's default; meta does not set rollup_cpu_busy_permille")
    rules += (f" An idle-held process is waiting on CPU when, in a tick of the last {window} in which it "
              f"idled on that GPU, its CPU reached {rule} of a core ({source}); abandoned when its CPU is "
              "known now and stayed below; CPU unknown (?) when not measured (first tick of a process, /proc "
              "unreadable, schema 1): never called abandoned.")
    out.extend(_para(rules))
    if any(p.state == "idle" for p in rep.procs):
        add(f"  idle (OTHER): below the threshold, holding <= {HELD_BYTES // 1_000_000} MB.")
    if rep.basis_since_ms is not None:
        add(_cut(f"  >: idle at least that long; the database tells nothing before "
                 f"{fmt_local(rep.basis_since_ms, rep.tz)}.", WIDTH))
    for w in rep.warnings:
        for line in _wrap(f"warning: {escape(w)}", WIDTH - 2):
            add("  " + line)
    return "\n".join(out) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "  " + word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return [_cut(x, width) for x in lines]


# --- json ------------------------------------------------------------------------------------
def _proc_dict(p: ProcNow) -> dict[str, Any]:
    return {
        "gpu": p.gpu.label,
        "gpu_uuid": p.gpu.uuid,
        "pid": p.pid,
        "start_ms": p.start_ms or None,
        "user": p.user,
        "uid": p.uid,
        "unit": p.unit,
        "command": p.comm,
        "kind": p.kind,
        "compute": bool(p.kind & 1),
        "mem_mib": p.mem_mib,
        "sm_util": p.sm_util,
        "state": p.state,
        "first_seen_ms": p.first_ms,
        "last_active_ms": p.last_active_ms,
        "idle_since_ms": p.idle_since_ms,
        "idle_ms": p.idle_ms,
        "idle_ms_lower_bound": p.lower_bound if p.idle_ms is not None else None,
        "cpu_permille": p.cpu_permille,
        "cpu_max_permille": p.cpu_max_permille,
        "cpu_state": p.cpu_state,
        "rss_mib": p.rss_mib,
    }


def _group(procs: list[ProcNow]) -> dict[str, Any]:
    return {
        "processes": len(procs),
        "mem_mib": sum(p.mem_mib or 0 for p in procs),
        "memory_unknown": sum(1 for p in procs if p.mem_mib is None),
        "longest_idle_ms": max((p.idle_ms or 0 for p in procs), default=None),
    }


def to_dict(rep: NowReport) -> dict[str, Any]:
    held = rep.idle_held
    return {
        "format_version": NOW_FORMAT_VERSION,
        "generator": f"gua-report {__version__}",
        "command": "now",
        "database": {"path": rep.path, "schema_version": rep.schema_version, "hostname": rep.hostname},
        "as_of_ms": rep.as_of_ms,
        "as_of": iso_utc(rep.as_of_ms),
        "age_ms": max(0, rep.now_ms - rep.as_of_ms),
        "interval_ms": rep.interval_ms,
        "run_id": rep.run_id,
        "tz": rep.tz_name,
        "idle_basis": rep.basis,
        "idle_basis_since_ms": rep.basis_since_ms,
        "host_cpu_permille": rep.host_cpu_permille,
        "rules": {"active_threshold_permille": ACTIVE_PERMILLE, "held_threshold_bytes": HELD_BYTES,
                  "cpu_busy_permille": rep.cpu_busy_permille,
                  "cpu_busy_source": "meta" if rep.cpu_busy_from_meta else "default",
                  "cpu_window_ms": rep.cpu_window_ms},
        "gpus": [{
            "uuid": g.uuid,
            "index": g.index,
            "label": g.label,
            "name": g.name,
            "mig": None if g.parent_uuid is None else {"parent_uuid": g.parent_uuid, "slot": g.mig_slot},
            "status": g.status,
            "state": g.state,
            "util_permille": g.util_permille,
            "mem_used_mib": g.mem_used_mib,
            "memory_total_bytes": g.memory_total,
            "processes": sum(1 for p in rep.procs if p.gpu is g),
        } for g in rep.gpus],
        "processes": [_proc_dict(p) for p in rep.procs],
        "idle_held": {
            "processes": len(held),
            "freeable_mib": rep.freeable_mib,
            "freeable_bytes": rep.freeable_mib * MIB,
            "memory_unknown": rep.freeable_unknown,
            "longest_idle_ms": max((p.idle_ms or 0 for p in held), default=None),
            **{cpu_state: _group(rep.with_cpu_state(cpu_state)) for cpu_state in CPU_STATES},
        },
        "warnings": list(rep.warnings),
    }


def render_json(rep: NowReport) -> str:
    return json.dumps(to_dict(rep), indent=2) + "\n"


def error_json(code: int, message: str, stale: NotRecording | None) -> str:
    error: dict[str, Any] = {"code": code, "message": message}
    if stale is not None:
        error.update(last_tick_ms=stale.last_tick_ms, interval_ms=stale.interval_ms, stopped_ms=stale.stopped_ms)
    doc = {"format_version": NOW_FORMAT_VERSION, "generator": f"gua-report {__version__}", "command": "now",
           "error": error}
    return json.dumps(doc, indent=2) + "\n"


# --- csv -------------------------------------------------------------------------------------
CSV_HEADER = ("as_of_ms", "gpu", "gpu_uuid", "gpu_name", "gpu_state", "pid", "start_ms", "user", "uid",
              "unit", "command", "kind", "mem_mib", "sm_util", "state", "first_seen_ms", "last_active_ms",
              "idle_since_ms", "idle_ms", "idle_ms_lower_bound",
              # format_version 2: appended, so that columns read by position keep their place
              "cpu_state", "cpu_permille", "cpu_max_permille", "rss_mib", "host_cpu_permille")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def csv_cell(v: Any) -> str:
    """Numbers as numbers; text a spreadsheet would run as a formula gets a leading "'".

    (The same rule as render_csv's cells; kept here so `now` does not import
    the window report's modules.)
    """
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    s = str(v)
    if s.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(s):
        return "'" + s
    return s


def render_csv(rep: NowReport) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for p in rep.procs:
        d = _proc_dict(p)
        row = {**d, "as_of_ms": rep.as_of_ms, "gpu_name": p.gpu.name, "gpu_state": p.gpu.state,
               "host_cpu_permille": rep.host_cpu_permille}
        w.writerow(csv_cell(row[k]) for k in CSV_HEADER)
    return buf.getvalue()


# --- --check ---------------------------------------------------------------------------------
def _plain(text: str) -> str:
    """A status line's text: escaped, and no '|' (it starts the perfdata)."""
    return escape(text).replace("|", "\\x7c")


def _threshold(ms: int | None) -> str:
    return "" if ms is None else f"{ms / 1000:g}"


def check_line(rep: NowReport, warn_ms: int | None, crit_ms: int | None) -> tuple[str, int]:
    """The monitoring-plugins status line and its return code.

    Counted against the limits: abandoned processes and those whose CPU is
    unknown. A process waiting on CPU is working (loading or preprocessing
    data); its owner cannot be asked to free the GPU as for a forgotten job,
    so it never raises the status: the line says how many there are. CPU
    unknown counts because not measuring must not silence the check (a
    schema 1 database, or /proc hidden from the collector, measures none).
    """
    held = rep.idle_held
    counted = rep.abandoned + rep.with_cpu_state("cpu_unknown")  # abandoned first: named first
    waiting = rep.with_cpu_state("waiting_on_cpu")
    limit_ms = warn_ms if warn_ms is not None else crit_ms
    assert limit_ms is not None
    over_warn = [p for p in counted if warn_ms is not None and (p.idle_ms or 0) > warn_ms]
    over_crit = [p for p in counted if crit_ms is not None and (p.idle_ms or 0) > crit_ms]
    if over_crit:
        status, code, over, limit = "CRITICAL", CHECK_CRITICAL, over_crit, crit_ms
    elif over_warn:
        status, code, over, limit = "WARNING", CHECK_WARNING, over_warn, warn_ms
    else:
        status, code, over, limit = "OK", CHECK_OK, [], limit_ms
    assert limit is not None
    n = len(over)
    text = f"{_plural(n)} idle-held longer than {_span(limit)}"
    if over:
        p = over[0]  # the longest idle abandoned one, else the longest idle with CPU unknown
        text += (f" ({_kinds(over)}): {p.user} pid {p.pid} on GPU {p.gpu.label}, "
                 f"{_CPU_TEXT[p.cpu_state or '']} {_idle(p)} ({_mem(p.mem_mib)})")
        if code == CHECK_CRITICAL and len(over_warn) > n:
            text += f"; {len(over_warn)} longer than {_span(warn_ms or 0)}"
    elif counted:
        text += f" ({_kinds(counted)}, longest {_idle(max(counted, key=lambda q: q.idle_ms or 0))})"
    if waiting:
        text += f"; {len(waiting)} waiting on CPU, not counted"
    longest_s = max((p.idle_ms or 0 for p in counted), default=0) // 1000
    perf = (f"idle_held_procs={len(held)};;; abandoned_procs={len(rep.abandoned)};;; "
            f"waiting_cpu_procs={len(waiting)};;; cpu_unknown_procs={len(counted) - len(rep.abandoned)};;; "
            f"longest_idle_s={longest_s};{_threshold(warn_ms)};{_threshold(crit_ms)};0; "
            f"freeable_bytes={rep.freeable_mib * MIB}B;;;0;")
    return f"GUA {status} - {_plain(text)} | {perf}\n", code


_CPU_TEXT = {"abandoned": "abandoned", "cpu_unknown": "CPU unknown", "waiting_on_cpu": "waiting on CPU"}


def _kinds(procs: list[ProcNow]) -> str:
    """"2 abandoned, 1 CPU unknown": how many of each counted kind."""
    counts = [(sum(1 for p in procs if p.cpu_state == s), _CPU_TEXT[s]) for s in ("abandoned", "cpu_unknown")]
    return ", ".join(f"{n} {what}" for n, what in counts if n)


def unknown_line(message: str) -> str:
    return f"GUA UNKNOWN - {_plain(message)}\n"


__all__ = ["CHECK_UNKNOWN", "check_line", "error_json", "render_csv", "render_json", "render_text",
           "unknown_line"]
