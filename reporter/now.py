"""`gua-report now`: every GPU's state and every process holding GPU memory, from the newest tick.

Reads one tick, its rows, and the collector's `proc_gpu_state` (schema 2),
which it keeps up to date as it writes each tick: how long a process has
been idle never needs a scan of history. A schema 1 database has no such
table: there "idle since" comes from the last 24 hours of raw rows (a
bounded range on tick_ts), and says so.

Schema 2 also records CPU (host per tick, each GPU process's per tick): an
idle-held process is *waiting on CPU* when, in a tick of the last few
minutes in which it was idle on that GPU, its CPU reached the collector's
rule (meta rollup_cpu_busy_permille); *abandoned* when its CPU is known now
and stayed below the rule in all of them; *CPU unknown* otherwise (schema 1,
first tick of a process, /proc unreadable). Those ticks are a seek on
tick_ts and proc_sample's primary key, never a scan.

Exit codes are the report's (errors.Exit) plus NOT_RECORDING when the newest
tick is too old to call "now". With --check they follow the monitoring-plugins
convention instead (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN) and the output is
one status line with perfdata (now_render.check_line).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import tzinfo

from . import __version__
from .errors import EXIT_TABLE, FLEET_ONLY, Exit, ReportError, escape
from .opendb import open_readonly
from .rawload import ensure
from .window import DAY_MS, WindowError, fmt_duration, fmt_local, parse_duration_ms, zone

DEFAULT_DB = "/var/lib/gua/gua.db"
# The collector's proc_gpu_state counts a process active at this SM use
# (gua_collector.schema.ACTIVE_PERMILLE); the GPU-level state uses the same.
ACTIVE_PERMILLE = 100
HELD_BYTES = 100_000_000  # compute memory above this makes a GPU (and a process) held
MIB = 1_048_576
STALE_INTERVALS = 3  # the newest tick older than this many intervals is not "now"
# Schema 1: idle since from this much raw history before the newest tick, no more.
RAW_LOOKBACK_MS = DAY_MS
# Same as the collector's schema.PROC_STATE_HOLE_MS: an observation that resumes
# after a longer break restarts a process's idle clock.
HOLE_MS = 300_000

# The collector's rule for "waiting on CPU" when meta does not say
# (gua_collector.schema.ROLLUP_CPU_BUSY_PERMILLE; the reporter does not import
# the collector): 100 = 10 % of one core over a tick.
CPU_BUSY_PERMILLE = 100
# How far back an idle-held process's CPU is looked at: one tick (10 s by
# default) is too little evidence to call a process abandoned, since a data
# loader that waits on a disk or the network between bursts can spend a
# whole tick below the rule; 5 minutes bridges such pauses and still calls a
# finished job abandoned within minutes of its end. At least CPU_WINDOW_TICKS
# ticks when the collector's interval is long.
CPU_WINDOW_MS = 300_000
CPU_WINDOW_TICKS = 3

KIND_COMPUTE, KIND_GRAPHICS, KIND_EXITED = 1, 2, 4
CPU_STATES = ("abandoned", "waiting_on_cpu", "cpu_unknown")  # of an idle-held process, in listing order
STATUS_NAMES = {0: "ok", 1: "error", 2: "lost"}

# monitoring-plugins return codes (--check only)
CHECK_OK, CHECK_WARNING, CHECK_CRITICAL, CHECK_UNKNOWN = 0, 1, 2, 3


@dataclass
class GpuNow:
    gpu_id: int
    uuid: str
    index: int
    label: str  # "0", or "0.1" for MIG slot 1 of GPU 0
    name: str
    memory_total: int | None  # bytes
    parent_uuid: str | None
    mig_slot: int | None
    status: str  # ok / error / lost
    util_permille: int | None
    mem_used_mib: int | None
    state: str = "unknown"  # active / idle_held / idle / unknown
    order: tuple[int, int] = (0, -1)


@dataclass
class ProcNow:
    gpu: GpuNow
    proc_id: int
    pid: int
    start_ms: int
    user: str
    uid: int | None
    unit: str
    comm: str
    kind: int
    mem_mib: int | None
    sm_util: int | None
    state: str = ""  # idle_held / idle / active / sm_unknown / graphics
    first_ms: int | None = None
    last_active_ms: int | None = None
    idle_since_ms: int | None = None
    idle_ms: int | None = None
    lower_bound: bool = False  # idle since at or before what the database can tell
    cpu_permille: int | None = None  # CPU over the newest tick, 1000 = one core; None unknown
    rss_mib: int | None = None  # resident host memory at the newest tick
    cpu_max_permille: int | None = None  # idle-held only: highest known CPU in its idle ticks of the window
    cpu_state: str | None = None  # idle-held only: one of CPU_STATES


@dataclass
class NowReport:
    path: str
    schema_version: int
    hostname: str
    as_of_ms: int  # ts_ms of the newest tick
    now_ms: int
    interval_ms: int
    run_id: int
    basis: str  # "state" (proc_gpu_state) or "raw_24h" (schema 1)
    basis_since_ms: int | None  # idle since at this instant may be earlier in truth
    tz: tzinfo
    tz_name: str
    cpu_recorded: bool = True  # schema 2: the database has CPU columns
    host_cpu_permille: int | None = None  # all host CPUs busy over the newest tick, 0..1000
    cpu_busy_permille: int = CPU_BUSY_PERMILLE  # the rule: waiting on CPU at or above this
    cpu_busy_from_meta: bool = False  # the rule came from meta, not the default
    cpu_window_ms: int = CPU_WINDOW_MS
    gpus: list[GpuNow] = field(default_factory=list)
    procs: list[ProcNow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def idle_held(self) -> list[ProcNow]:
        return [p for p in self.procs if p.state == "idle_held"]

    def with_cpu_state(self, cpu_state: str) -> list[ProcNow]:
        """Idle-held processes in one CPU state, longest idle first."""
        return [p for p in self.procs if p.state == "idle_held" and p.cpu_state == cpu_state]

    @property
    def abandoned(self) -> list[ProcNow]:
        return self.with_cpu_state("abandoned")

    @property
    def freeable_mib(self) -> int:
        """What ending the abandoned processes would free: those waiting on CPU are working."""
        return sum(p.mem_mib or 0 for p in self.abandoned)

    @property
    def freeable_unknown(self) -> int:
        return sum(1 for p in self.abandoned if p.mem_mib is None)


class NotRecording(ReportError):
    """The newest tick is too old to be "now" (or there is none)."""

    def __init__(self, message: str, last_tick_ms: int | None, interval_ms: int | None,
                 stopped_ms: int | None) -> None:
        super().__init__(Exit.NOT_RECORDING, message)
        self.last_tick_ms = last_tick_ms
        self.interval_ms = interval_ms
        self.stopped_ms = stopped_ms


# --- reading -----------------------------------------------------------------------
# All through primary keys or tick_ts; nothing here grows with history.
Q_LATEST_TICK = "SELECT tick_id, run_id, ts_ms FROM tick ORDER BY ts_ms DESC LIMIT 1"
Q_HOST_CPU = "SELECT cpu_permille FROM tick WHERE tick_id = ?"  # schema 2
Q_NEWEST_RUN = "SELECT run_id, stopped_ms, interval_ms, hostname FROM run ORDER BY run_id DESC LIMIT 1"
Q_RUN = "SELECT interval_ms, hostname FROM run WHERE run_id = ?"
Q_GPUS = """
SELECT g.gpu_id, g.uuid, g.gpu_index, g.name, g.memory_total, p.uuid, p.gpu_index, g.mig_slot,
       s.status, s.util_permille, s.mem_used_mib
FROM gpu_sample AS s
JOIN gpu AS g ON g.gpu_id = s.gpu_id
LEFT JOIN gpu AS p ON p.gpu_id = g.parent_id
WHERE s.tick_id = ?
"""
_PROC_COLUMNS = """
SELECT ps.gpu_id, ps.proc_id, ps.kind, ps.mem_mib, ps.sm_util,
       p.pid, p.start_ms, p.comm, p.unit, a.uid, a.username"""
_CPU_COLUMNS = ", ps.cpu_permille, ps.rss_mib"  # schema 2; schema 1 reads NULL for both
_PROC_FROM = """
FROM proc_sample AS ps
JOIN process AS p ON p.proc_id = ps.proc_id
JOIN account AS a ON a.account_id = p.account_id"""
Q_PROCS_STATE = (_PROC_COLUMNS + _CPU_COLUMNS + ", st.first_ms, st.known_from_ms, st.last_active_ms"
                 + _PROC_FROM + """
LEFT JOIN proc_gpu_state AS st ON st.gpu_id = ps.gpu_id AND st.proc_id = ps.proc_id
WHERE ps.tick_id = ?""")
Q_PROCS_PLAIN = _PROC_COLUMNS + ", NULL, NULL, NULL, NULL, NULL" + _PROC_FROM + "\nWHERE ps.tick_id = ?"
# Schema 2: per (GPU, process), the highest known CPU over the window's ticks in
# which it ran on that GPU idle (SM known and below the active threshold),
# as the collector's per-tick rule sees them: CPU during SM work fed the GPU
# and says nothing about waiting. tick_ts gives the window's few ticks,
# proc_sample's primary key (tick_id, ...) their rows: a seek, not a scan.
Q_CPU_WINDOW = """
SELECT ps.gpu_id, ps.proc_id, max(ps.cpu_permille)
FROM tick AS t
JOIN proc_sample AS ps ON ps.tick_id = t.tick_id
WHERE t.ts_ms > ? AND t.ts_ms <= ? AND ps.kind & 5 = 1 AND ps.sm_util * 10 < ?
GROUP BY ps.gpu_id, ps.proc_id
"""
# Schema 1: the history of the newest tick's processes, oldest first, from tick_ts.
Q_RAW_HISTORY = """
SELECT t.ts_ms, t.duration_ms, ps.gpu_id, ps.proc_id, ps.sm_util
FROM tick AS t
JOIN proc_sample AS ps ON ps.tick_id = t.tick_id
WHERE t.ts_ms >= ? AND t.ts_ms <= ? AND ps.proc_id IN (SELECT value FROM json_each(?))
ORDER BY t.ts_ms
"""
Q_FIRST_TICK_FROM = "SELECT min(ts_ms) FROM tick WHERE ts_ms >= ?"
Q_TICK_BEFORE = "SELECT 1 FROM tick WHERE ts_ms < ? LIMIT 1"


def _meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _check_fresh(conn: sqlite3.Connection, latest: tuple | None, now_ms: int,
                 tz: tzinfo, tz_name: str) -> None:
    """Raise NotRecording unless the newest tick is recent and its collector still runs."""
    run = conn.execute(Q_NEWEST_RUN).fetchone()
    interval = run[2] if run else None
    stopped = run[1] if run else None
    if latest is None:
        raise NotRecording("gua-collector has not recorded any tick in this database yet",
                           None, interval, stopped)
    ts = latest[2]
    when = f"{fmt_local(ts, tz, seconds=True)} {escape(tz_name)}"
    age = max(0, now_ms - ts)
    if stopped is not None and stopped >= ts:
        raise NotRecording(f"gua-collector is not recording: it stopped at "
                           f"{fmt_local(stopped, tz, seconds=True)} {escape(tz_name)}; newest tick "
                           f"{when} ({fmt_duration(age)} ago)", ts, interval, stopped)
    if interval is not None and age > STALE_INTERVALS * interval:
        raise NotRecording(f"gua-collector is not recording since {when} ({fmt_duration(age)} ago, "
                           f"more than {STALE_INTERVALS} ticks of {fmt_duration(interval)}): "
                           "check `systemctl status gua-collector`", ts, interval, stopped)


def _cpu_rule(raw: str | None, warnings: list[str]) -> tuple[int, bool]:
    """The collector's waiting-on-CPU rule from meta (permille of one core), and whether meta had it."""
    if raw is None:
        return CPU_BUSY_PERMILLE, False  # schema 1, or a database that predates the key
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        warnings.append(f"meta rollup_cpu_busy_permille is {raw!r}, not a permille: "
                        f"using {CPU_BUSY_PERMILLE}")
        return CPU_BUSY_PERMILLE, False
    return value, True


def _cpu_state(p: ProcNow, busy_permille: int) -> str:
    """Of an idle-held process: evidence of CPU work wins; abandoned needs its CPU known now."""
    if p.cpu_max_permille is not None and p.cpu_max_permille >= busy_permille:
        return "waiting_on_cpu"
    if p.cpu_permille is None:
        return "cpu_unknown"  # NULL is "not measured", never evidence of doing nothing
    return "abandoned"


def _gpu_state(g: GpuNow, compute: list[tuple[int | None]]) -> str:
    """SCHEMA.md's classification of one GPU-tick."""
    if g.status != "ok" or g.util_permille is None:
        return "unknown"
    if g.util_permille >= ACTIVE_PERMILLE:
        return "active"
    held = any(m is None for m, in compute) or sum(m or 0 for m, in compute) * MIB > HELD_BYTES
    return "idle_held" if held else "idle"


def _proc_state(p: ProcNow) -> str:
    if not p.kind & KIND_COMPUTE:
        return "graphics"  # a display server's context never holds a card (SCHEMA.md)
    if p.sm_util is None:
        return "sm_unknown"
    if p.sm_util * 10 >= ACTIVE_PERMILLE:
        return "active"
    if p.mem_mib is None or p.mem_mib * MIB > HELD_BYTES:
        return "idle_held"
    return "idle"


def _fold_raw(conn: sqlite3.Connection, as_of: int, procs: list[ProcNow]) -> int | None:
    """Schema 1: the collector's proc_gpu_state fold over the last RAW_LOOKBACK_MS of raw rows.

    Returns the first tick read when older ticks exist (idle since at that
    instant may be earlier in truth), else None.
    """
    lo = as_of - RAW_LOOKBACK_MS
    ids = "[" + ",".join(str(p.proc_id) for p in procs) + "]"
    wanted = {(p.gpu.gpu_id, p.proc_id) for p in procs}
    state: dict[tuple[int, int], list[int | None]] = {}  # first, known_from, last_active, last_seen
    for ts, d, gpu_id, proc_id, sm in conn.execute(Q_RAW_HISTORY, (lo, as_of, ids)):
        key = (gpu_id, proc_id)
        if key not in wanted:
            continue
        active = sm is not None and sm * 10 >= ACTIVE_PERMILLE
        s = state.get(key)
        if s is None:
            state[key] = [ts, ts, ts if active else None, ts]
            continue
        last_seen = s[3]
        assert last_seen is not None
        if sm is None or ts - d - last_seen > HOLE_MS:
            s[1] = ts
        if active:
            s[2] = ts
        s[3] = ts
    for p in procs:
        s = state.get((p.gpu.gpu_id, p.proc_id))
        if s is not None:
            p.first_ms, p.last_active_ms = s[0], s[2]
            p.idle_since_ms = s[1] if s[2] is None or s[1] is None or s[1] > s[2] else s[2]
    if conn.execute(Q_TICK_BEFORE, (lo,)).fetchone() is None:
        return None
    return conn.execute(Q_FIRST_TICK_FROM, (lo,)).fetchone()[0]


def read_now(conn: sqlite3.Connection, path: str, schema_version: int, now_ms: int,
             tz: tzinfo, tz_name: str) -> NowReport:
    """Everything `now` shows, from one snapshot. Raises NotRecording."""
    conn.execute("BEGIN")  # one snapshot: the tick and the state the collector wrote with it
    try:
        latest = conn.execute(Q_LATEST_TICK).fetchone()
        _check_fresh(conn, latest, now_ms, tz, tz_name)
        tick_id, run_id, as_of = latest
        interval, hostname = conn.execute(Q_RUN, (run_id,)).fetchone()
        has_state = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'proc_gpu_state'").fetchone()
        rep = NowReport(path=path, schema_version=schema_version, hostname=hostname, as_of_ms=as_of,
                        now_ms=now_ms, interval_ms=interval, run_id=run_id,
                        basis="state" if has_state else "raw_24h", basis_since_ms=None, tz=tz, tz_name=tz_name)
        rep.cpu_recorded = schema_version >= 2
        if rep.cpu_recorded:
            rep.host_cpu_permille = conn.execute(Q_HOST_CPU, (tick_id,)).fetchone()[0]
            rep.cpu_busy_permille, rep.cpu_busy_from_meta = _cpu_rule(
                _meta(conn, "rollup_cpu_busy_permille"), rep.warnings)
        rep.cpu_window_ms = max(CPU_WINDOW_MS, CPU_WINDOW_TICKS * (interval or 0))
        ensure(conn, as_of - rep.cpu_window_ms, as_of + 1)  # rows of compacted hours, if it reaches one
        gpus: dict[int, GpuNow] = {}
        for (gpu_id, uuid, index, name, total, parent_uuid, parent_index, slot,
             status, util, mem) in conn.execute(Q_GPUS, (tick_id,)):
            mig = parent_uuid is not None
            gpus[gpu_id] = GpuNow(
                gpu_id, uuid, parent_index if mig else index, f"{parent_index}.{slot}" if mig else str(index),
                name, total, parent_uuid, slot, STATUS_NAMES.get(status, str(status)), util, mem,
                order=(parent_index if mig else index, slot if mig and slot is not None else -1))
        compute: dict[int, list[tuple[int | None]]] = {g: [] for g in gpus}
        procs: list[ProcNow] = []
        # A schema 2 database always has proc_gpu_state, and schema 1 neither it nor CPU columns.
        for (gpu_id, proc_id, kind, mem, sm, pid, start, comm, unit, uid, user, cpu, rss,
             first, known_from, last_active) in conn.execute(Q_PROCS_STATE if has_state else Q_PROCS_PLAIN,
                                                             (tick_id,)):
            if kind & KIND_COMPUTE and gpu_id in compute:
                compute[gpu_id].append((mem,))
            if kind & KIND_EXITED or gpu_id not in gpus:
                continue  # left during the tick: holds nothing now
            p = ProcNow(gpus[gpu_id], proc_id, pid, start, user, uid, unit, comm, kind, mem, sm,
                        cpu_permille=cpu, rss_mib=rss)
            if has_state and first is not None:
                p.first_ms, p.last_active_ms = first, last_active
                p.idle_since_ms = known_from if last_active is None or known_from > last_active else last_active
            procs.append(p)
        for g in gpus.values():
            g.state = _gpu_state(g, compute[g.gpu_id])
        window: dict[tuple[int, int], int | None] = {}
        if rep.cpu_recorded and any(_proc_state(p) == "idle_held" for p in procs):
            window = {(g, p): mx for g, p, mx in conn.execute(
                Q_CPU_WINDOW, (as_of - rep.cpu_window_ms, as_of, ACTIVE_PERMILLE))}
        if has_state:
            since = int(_meta(conn, "proc_state_since_ms") or 0)
            rep.basis_since_ms = since or None
        elif procs:
            rep.basis_since_ms = _fold_raw(conn, as_of, procs)
            rep.warnings.append(f"schema {schema_version} database: idle since is taken from the last "
                                f"{RAW_LOOKBACK_MS // 3_600_000} hours of raw samples (the collector keeps it "
                                "from schema 2 on)")
    finally:
        conn.execute("COMMIT")
    for p in procs:
        p.state = _proc_state(p)
        if p.state == "idle_held":
            # The newest tick is one of the window's (the process is idle in it); max() of both
            # keeps that true whatever the window query found.
            known = [v for v in (window.get((p.gpu.gpu_id, p.proc_id)), p.cpu_permille) if v is not None]
            p.cpu_max_permille = max(known, default=None)
            p.cpu_state = _cpu_state(p, rep.cpu_busy_permille)
        if p.state in ("idle_held", "idle"):
            if p.idle_since_ms is None:
                # No state row (cannot happen in a database the collector wrote): only now is known.
                p.idle_since_ms, p.lower_bound = as_of, True
            p.idle_ms = max(0, as_of - p.idle_since_ms)
            if rep.basis_since_ms is not None and p.idle_since_ms <= rep.basis_since_ms:
                p.lower_bound = True
        else:
            p.idle_since_ms = None
    rep.gpus = sorted(gpus.values(), key=lambda g: g.order)
    order = {g.gpu_id: n for n, g in enumerate(rep.gpus)}
    rank = {"idle": 3, "sm_unknown": 4, "active": 5, "graphics": 6}
    rank.update((s, n) for n, s in enumerate(CPU_STATES))
    # Idle-held first: abandoned, then waiting on CPU, then CPU unknown, each longest
    # idle first; then the rest by state, GPU, memory.
    rep.procs = sorted(procs, key=lambda p: (
        rank[p.cpu_state or p.state], p.idle_since_ms if p.state == "idle_held" else 0, order[p.gpu.gpu_id],
        -(p.mem_mib or 0), p.pid))
    return rep


# --- command line ----------------------------------------------------------------------
class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Usage errors become an exception: exit 2 normally, UNKNOWN (3) with --check."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _ArgError(message)


def _epilog() -> str:
    codes = "\n".join(f"  {int(c)}  {text}" for c, text in EXIT_TABLE
                      if c != Exit.EMPTY_WINDOW and c not in FLEET_ONLY)
    return (
        "From the newest tick: each GPU's state, the host's CPU, and each process\n"
        "holding GPU memory (GPU, pid, user, unit, command, memory, SM, CPU and\n"
        "RSS now). IDLE is how long since the process last used >= "
        f"{ACTIVE_PERMILLE / 10:g} % SM on\n"
        "that GPU, or was first seen, or had its SM unknown, or went unobserved\n"
        f"for over 5 minutes. A compute process below {ACTIVE_PERMILLE / 10:g} % that holds "
        f"> {HELD_BYTES // 1_000_000} MB (or\n"
        "memory NVML cannot report) is idle-held. Display servers (graphics only)\n"
        "never are; SM unknown (MIG, unsupported) is never called idle.\n"
        "Idle-held processes are split by their CPU (% of one core): waiting on\n"
        "CPU when, in a tick of the last 5 minutes (at least 3 ticks) in which it\n"
        "idled on that GPU, it used at least the collector's rule (meta\n"
        f"rollup_cpu_busy_permille, default {CPU_BUSY_PERMILLE} = {CPU_BUSY_PERMILLE / 10:g} %); "
        "abandoned when its CPU\n"
        "is known now and stayed below; CPU unknown otherwise (first tick of a\n"
        "process, /proc unreadable, schema 1). Abandoned come first, longest idle\n"
        "first, with the memory ending them would free; then waiting on CPU.\n"
        f"When the newest tick is older than {STALE_INTERVALS} collector intervals, "
        "or the collector\n"
        "stopped, nothing is shown as now: exit 9 (UNKNOWN with --check).\n\n"
        f"exit codes (without --check):\n{codes}\n\n"
        "exit codes with --check (monitoring-plugins convention, for Icinga,\n"
        "Nagios, Zabbix or cron): one status line with perfdata on stdout, and\n"
        "  0  OK: no process idle-held longer than --warn (or --crit)\n"
        "  1  WARNING: a process idle-held longer than --warn\n"
        "  2  CRITICAL: a process idle-held longer than --crit\n"
        "  3  UNKNOWN: collector not recording, database missing, unreadable,\n"
        "     not gua, newer or corrupt, or bad arguments\n"
        "A process waiting on CPU is working: it never counts toward WARNING or\n"
        "CRITICAL (the status line says how many); abandoned and CPU unknown do.\n"
        "These codes apply in --check mode only.\n\n"
        "--format json is a versioned contract of its own (\"command\": \"now\");\n"
        "csv is one row per process with a header. See JSON.md beside the\n"
        "gua_report package sources. Names from the database are printed with\n"
        "control and bidi characters escaped in text; csv cells that begin like a\n"
        "formula (= + - @) get a leading '."
    )


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gua-report now",
        description="Who holds which GPU now, and for how long it has been idle.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", default=DEFAULT_DB, metavar="PATH", help=f"database (default {DEFAULT_DB})")
    p.add_argument("--format", choices=("text", "json", "csv"), default="text",
                   help="text (80 columns, default), json (a versioned contract) or csv (one row "
                        "per process); not with --check")
    p.add_argument("--tz", default=None, metavar="ZONE",
                   help="IANA time zone for times shown (default: the host's zone)")
    p.add_argument("--check", action="store_true",
                   help="monitoring plugin mode: one status line, exit 0/1/2/3 (see below)")
    p.add_argument("--warn", metavar="DUR",
                   help="with --check: WARNING when a process not waiting on CPU is idle-held longer "
                        "than DUR (2h, 90m)")
    p.add_argument("--crit", metavar="DUR",
                   help="with --check: CRITICAL when such a process is idle-held longer than DUR "
                        "(8h, 1d)")
    p.add_argument("--version", action="version", version=f"gua-report {__version__}")
    return p


@dataclass(frozen=True)
class CheckLimits:
    warn_ms: int | None
    crit_ms: int | None


def _duration(option: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        ms = parse_duration_ms(text)
    except WindowError as exc:
        raise WindowError(f"argument {option}: {exc}") from None
    if ms is None:
        raise WindowError(f"argument {option}: {text!r} is not a duration (use 90m, 2h, 1d)")
    return ms


def _limits(args: argparse.Namespace) -> CheckLimits | None:
    warn, crit = _duration("--warn", args.warn), _duration("--crit", args.crit)
    if not args.check:
        if warn is not None or crit is not None:
            raise WindowError("--warn and --crit need --check")
        return None
    if warn is None and crit is None:
        raise WindowError("--check needs --warn DUR, --crit DUR or both")
    if warn is not None and crit is not None and warn > crit:
        raise WindowError(f"--warn ({args.warn}) must not be longer than --crit ({args.crit})")
    if args.format != "text":
        raise WindowError("--check prints one status line: --format does not apply")
    return CheckLimits(warn, crit)


def run(argv: Sequence[str]) -> int:
    from . import now_render

    argv = list(argv)
    check = "--check" in argv
    try:
        args = make_parser().parse_args(argv)
    except _ArgError as exc:
        msg = escape(str(exc), ascii_only=False)
        if check:
            return _write(now_render.unknown_line(f"bad arguments: {msg}"), CHECK_UNKNOWN)
        sys.stderr.write(f"gua-report now: error: {msg}\n")
        return int(Exit.BAD_ARGS)
    fmt = args.format
    try:
        limits = _limits(args)
        tz, tz_name = zone(args.tz)
        now_ms = int(time.time() * 1000)
        db = open_readonly(args.db)
        try:
            rep = read_now(db.conn, args.db, db.schema_version, now_ms, tz, tz_name)
        except sqlite3.DatabaseError as exc:
            msg = str(exc)
            what = "is corrupt" if "malformed" in msg or "not a database" in msg else "cannot be read"
            raise ReportError(Exit.CORRUPT, f"{args.db} {what} ({msg})") from None
        finally:
            db.conn.close()
        if db.warning:
            rep.warnings.insert(0, db.warning)
    except WindowError as exc:
        if check:
            return _write(now_render.unknown_line(f"bad arguments: {escape(str(exc), ascii_only=False)}"),
                          CHECK_UNKNOWN)
        return _fail(Exit.BAD_ARGS, str(exc), fmt, None)
    except ReportError as exc:
        if check:
            return _write(now_render.unknown_line(escape(exc.message, ascii_only=False)), CHECK_UNKNOWN)
        return _fail(exc.code, exc.message, fmt, exc if isinstance(exc, NotRecording) else None)
    if limits is not None:
        line, code = now_render.check_line(rep, limits.warn_ms, limits.crit_ms)
        return _write(line, code)
    if fmt == "json":
        return _write(now_render.render_json(rep), Exit.OK)
    if fmt == "csv":
        return _write(now_render.render_csv(rep), Exit.OK)
    return _write(now_render.render_text(rep), Exit.OK)


def _write(text: str, code: int) -> int:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return int(code)


def _fail(code: Exit, message: str, fmt: str, stale: NotRecording | None) -> int:
    sys.stderr.write(f"gua-report now: error: {escape(message, ascii_only=False)}\n")
    if fmt == "json":
        from .now_render import error_json

        _write(error_json(int(code), message, stale), code)
    return int(code)
