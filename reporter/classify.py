"""Turn query results into a Report: plan rollup vs raw, add the parts, find gaps.

Data flow: opendb (connection) -> query (SQL aggregates) -> here (Report
records, pure integer sums) -> render_text / render_json / render_csv.
The records are plain classes with __slots__, not dataclasses: importing
dataclasses (and inspect with it) and building each class cost ~20 ms at
every start of gua-report, more than a one-hour report takes.
Every number in a Report is an integer sum of database facts or a ratio of
two of them, so the rollup path and the raw path give identical output.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import tzinfo

from . import opendb, query, rawload
from .errors import Exit, ReportError
from .window import HOUR_MS, QUARTER_MS, Segment, WindowError, fmt_local, offset_segments

Range = tuple[int, int]  # [lo, hi) in UTC epoch ms

STATES = ("active", "idle_held", "idle")
HOLE_MIN_MS = 5 * 60_000  # a hole between ticks this long is reported as a gap
_SUSPECT_SLACK_MS = 60_000  # an hour this short of ticks is looked at tick by tick
HOLES_KEPT = 1000
GAP_EVENTS_KEPT = 1000
# An hour's ticks overlap when their durations add up to more than the time
# from the last tick before the hour to the hour's last tick, by more than
# this. Older collectors took ts from the wall clock and the duration from the
# monotonic clock, each rounded to the ms: consecutive ticks disagree by a ms
# or so, a few ms over an hour. The collector calls a wall clock more than
# 1 s behind a step (service.CLOCK_STEP_MS); below it is measurement noise.
OVERLAP_SLACK_MS = 1000
STATUS_NAMES = {0: "ok", 1: "error", 2: "lost"}
# An idle-held identity whose running processes used at least this much CPU
# together in a tick (permille of one core: 10 %) was waiting on the CPU
# there, when the database's meta does not say (collector/schema.py's
# ROLLUP_CPU_BUSY_PERMILLE; the reporter does not import the collector).
CPU_BUSY_PERMILLE = 100


class Options:
    """The report asked for: window, zone, thresholds, filters. Not changed once made."""

    __slots__ = ("since_ms", "until_ms", "tz", "tz_name", "active_pm", "held_bytes", "gpus", "users",
                 "use_rollups")

    def __init__(self, since_ms: int, until_ms: int, tz: tzinfo, tz_name: str, active_pm: int = 100,
                 held_bytes: int = 100_000_000, gpus: tuple[str, ...] = (), users: tuple[str, ...] = (),
                 use_rollups: bool = True) -> None:
        self.since_ms = since_ms
        self.until_ms = until_ms
        self.tz = tz
        self.tz_name = tz_name
        self.active_pm = active_pm
        self.held_bytes = held_bytes
        self.gpus = gpus
        self.users = users
        self.use_rollups = use_rollups


class Plan:
    """Which hours come from rollups and which time ranges from raw rows.

    Rollup hours are read from the classified hourly rollups (hour_gpu,
    hour_account, hour_unit) when the report's thresholds are theirs, else
    from the histograms (hour_*_hist), classified here (`hist`). Their
    heatmap: `heat` "hour" places the rows just read (the zone's hours are
    UTC hours); "quarter" reads quarter_gpu for hours [heat_from, h1) and raw
    rows for [h0, heat_from) (hours rolled up before the histograms
    existed); "raw" reads raw rows for all of them.
    """

    __slots__ = ("h0", "h1", "raw_ranges", "heat", "note", "clip_ranges", "skip_hours", "hist", "heat_from")

    def __init__(self, h0: int, h1: int, raw_ranges: tuple[Range, ...], heat: str, note: str,
                 clip_ranges: tuple[Range, ...] = (), skip_hours: tuple[int, ...] = (), hist: bool = False,
                 heat_from: int | None = None) -> None:
        self.h0 = h0  # rollup hours [h0, h1); h0 == h1: none
        self.h1 = h1
        self.raw_ranges = raw_ranges
        self.heat = heat  # "hour", "quarter" or "raw"
        self.note = note  # why rollups were not (fully) used, for the diagnostics
        # Time where ticks overlap (Overlap.hours inside the window): read from raw
        # rows with each GPU's time counted once. Not in raw_ranges; the rollup
        # hours among them (skip_hours) are not read from the rollups.
        self.clip_ranges = clip_ranges
        self.skip_hours = skip_hours
        self.hist = hist
        self.heat_from = h0 if heat_from is None else heat_from

    @property
    def rollup_source(self) -> str:
        """For the diagnostics: "hourly", "histograms", or "none" (every tick from raw rows)."""
        if self.h1 <= self.h0:
            return "none"
        return "histograms" if self.hist else "hourly"


class Overlap:
    """UTC hours of the window in which ticks cover the same time twice (older collectors)."""

    __slots__ = ("hours", "unremoved_hours", "unremoved_ms")

    def __init__(self, hours: tuple[int, ...] = (), unremoved_hours: tuple[int, ...] = (),
                 unremoved_ms: int = 0) -> None:
        self.hours = hours  # counted once per GPU, from raw rows
        # Hours with overlap whose raw rows retention removed: only their rollups
        # remain, built from the overlapping rows; they are reported as written.
        self.unremoved_hours = unremoved_hours
        # Sum over those hours' physical GPU-hours of the time beyond one hour:
        # roughly the GPU time they count twice.
        self.unremoved_ms = unremoved_ms


class StateTotals:
    """Sums of GPU-tick facts by state (query.STATE_COLUMNS)."""

    __slots__ = query.STATE_COLUMNS

    def __init__(self) -> None:
        self.ticks = 0
        self.total_ms = 0
        self.active_ms = 0
        self.held_ms = 0
        self.idle_ms = 0
        self.unknown_ms = 0
        self.coverage_pm_ms = 0
        self.energy_active_mj: int | None = None
        self.energy_held_mj: int | None = None
        self.energy_idle_mj: int | None = None
        self.overlap_ms = 0  # time of overlapping ticks not counted (an earlier tick covered it)
        self.gpm_known_ms = 0  # status 0 with GPM SM activity known (from query.Gpm.since_ms)
        self.sm_active_pm_ms = 0  # sum(duration x sm_active_permille) over that time
        self.tensor_known_ms = 0
        self.tensor_active_pm_ms = 0
        self.starved_ms = 0  # active, with SM activity known and below the starved rule

    def add_row(self, values: Sequence[int | None]) -> None:
        """Add one query row's columns in query.STATE_COLUMNS order."""
        for name, v in zip(query.STATE_COLUMNS, values):
            cur = getattr(self, name)
            if name.startswith("energy_"):
                # NULL means "no row of this state had energy": keep it NULL
                # until some part of the window had a value.
                if v is not None:
                    setattr(self, name, (cur or 0) + v)
            else:
                setattr(self, name, cur + (v or 0))

    def add(self, other: StateTotals) -> None:
        self.add_row([getattr(other, n) for n in query.STATE_COLUMNS])

    @property
    def known_ms(self) -> int:
        return self.active_ms + self.held_ms + self.idle_ms

    def share(self, state: str) -> float | None:
        ms = {"active": self.active_ms, "idle_held": self.held_ms, "idle": self.idle_ms}[state]
        return ms / self.known_ms if self.known_ms else None

    @property
    def coverage(self) -> float | None:
        """Share of known time the driver's utilization samples covered."""
        return self.coverage_pm_ms / (1000 * self.known_ms) if self.known_ms else None

    @property
    def sm_active(self) -> float | None:
        """Mean GPM SM activity (0..1) over the time it was known; None: never known."""
        return self.sm_active_pm_ms / (1000 * self.gpm_known_ms) if self.gpm_known_ms else None

    @property
    def tensor_active(self) -> float | None:
        """Mean GPM tensor-pipe activity (0..1) over the time it was known; None: never known."""
        return self.tensor_active_pm_ms / (1000 * self.tensor_known_ms) if self.tensor_known_ms else None

    @property
    def starved(self) -> int | None:
        """Active-but-starved time; None where GPM SM activity was never known (not 0)."""
        return self.starved_ms if self.gpm_known_ms else None

    @property
    def has_energy(self) -> bool:
        return any(getattr(self, f"energy_{s}_mj") is not None for s in ("active", "held", "idle"))


class ErrorSummary:
    """Error events of one kind (and GPU) in the window."""

    __slots__ = ("gpu_id", "kind", "count", "first_ms", "last_ms", "last_detail")

    def __init__(self, gpu_id: int | None, kind: str, count: int, first_ms: int, last_ms: int,
                 last_detail: str) -> None:
        self.gpu_id = gpu_id
        self.kind = kind
        self.count = count
        self.first_ms = first_ms
        self.last_ms = last_ms
        self.last_detail = last_detail


class GpuReport:
    """One GPU or MIG instance with samples in the window."""

    __slots__ = ("row", "parent", "totals", "errors", "last_status")

    def __init__(self, row: query.GpuRow, parent: query.GpuRow | None, totals: StateTotals,
                 errors: list[ErrorSummary], last_status: str | None) -> None:
        self.row = row
        self.parent = parent
        self.totals = totals
        self.errors = errors
        self.last_status = last_status

    @property
    def is_mig(self) -> bool:
        return self.row.parent_id is not None

    def notes(self, tz: tzinfo) -> list[str]:
        """Short words for the per-GPU table; JSON carries the same facts as fields."""
        out: list[str] = []
        n_err = sum(e.count for e in self.errors if e.kind == "nvml_error")
        if self.is_mig:
            out.append(f"MIG of {self.parent.index if self.parent else '?'}")
        if self.last_status == "lost":
            lost = [e for e in self.errors if e.kind == "gpu_lost"]
            out.append("LOST" + (f" since {fmt_local(lost[0].last_ms, tz)[5:]}" if lost else ""))  # the latest loss
        elif self.last_status == "error":
            out.append("NVML error now")
        if n_err:
            out.append(f"{n_err} error{'s' if n_err != 1 else ''}")
        if self.totals.unknown_ms and self.last_status != "lost":
            if n_err:
                out.append(f"unk {_hours_text(self.totals.unknown_ms)}h")
            elif self.is_mig:
                out.append("util n/a")
            else:
                out.append(f"util n/a {_hours_text(self.totals.unknown_ms)}h")
        return out


def _fmt_offset(ms: int) -> str:
    """+05:30, -03:30, +12:45."""
    sign = "-" if ms < 0 else "+"
    minutes = abs(ms) // 60_000
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _hours_text(ms: int) -> str:
    h = ms / HOUR_MS
    return f"{h:.2f}" if h < 1 else f"{h:.1f}"


class Identity:
    """One user, or one (user, unit) pair; sums of per-GPU-per-tick facts."""

    __slots__ = ("user", "uid", "unit", *query.IDENTITY_COLUMNS, "gpu_ids")

    def __init__(self, user: str, uid: int | None, unit: str) -> None:
        self.user = user
        self.uid = uid
        self.unit = unit  # '' for the per-user rows
        self.held_ms = 0
        self.idle_held_ms = 0  # held with every sm_util known and their sum below the threshold
        self.mem_mib_ms = 0
        self.unknown_mem_ms = 0
        self.sm_unknown_ms = 0  # held with some sm_util unknown: neither idle-held nor busy
        self.sm_unrecorded_ms = 0  # held before the database records SM-unknown time
        # Idle-held time by the identity's CPU in the tick (rule: Report.cpu_busy_pm):
        self.idle_cpu_busy_ms = 0  # waiting on CPU: it loads or preprocesses data
        self.idle_cpu_unknown_ms = 0  # CPU not measured (first tick of a process, schema 1, /proc hidden)
        self.gpm_busy_ms = 0  # busy (held, SM known, >= the active threshold) where its GPU's GPM was known
        self.starved_ms = 0  # ... and its GPU was active but starved
        self.gpu_ids: set[int] = set()

    def add_row(self, gpu_id: int, values: Sequence[int | None]) -> None:
        """Add one query row's columns in query.IDENTITY_COLUMNS order."""
        for name, v in zip(query.IDENTITY_COLUMNS, values):
            setattr(self, name, getattr(self, name) + (v or 0))
        self.gpu_ids.add(gpu_id)

    @property
    def sm_all_unknown(self) -> bool:
        """Idle-held is unknown, not 0: SM use was unknown whenever it was recorded,
        and no held tick is known to have idled."""
        return (self.sm_unknown_ms > 0 and self.idle_held_ms == 0
                and self.sm_unknown_ms + self.sm_unrecorded_ms == self.held_ms)

    def starved(self, known: bool) -> int | None:
        """Busy time on a starved GPU; None where unknown: the report could not count it
        (`known` False: histograms, Report.identity_starved_known), or none of its busy
        time was on a GPU whose GPM SM activity was known."""
        return self.starved_ms if known and self.gpm_busy_ms else None

    @property
    def abandoned_ms(self) -> int:
        """Idle-held with its CPU known and below the rule: it does nothing at all."""
        return self.idle_held_ms - self.idle_cpu_busy_ms - self.idle_cpu_unknown_ms

    @property
    def mem_gb_hours(self) -> float:
        return self.mem_mib_ms * 1_048_576 / 1e9 / HOUR_MS


class Hole:
    """A stretch inside the window that no tick covers."""

    __slots__ = ("start_ms", "end_ms", "open_ended")

    def __init__(self, start_ms: int, end_ms: int, open_ended: bool) -> None:
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.open_ended = open_ended  # no tick after it: the collector may be down now


class RunInfo:
    """A collector run overlapping the window."""

    __slots__ = ("run_id", "started_ms", "stopped_ms", "interval_ms", "backend", "hostname", "version",
                 "clean", "last_tick_ms")

    def __init__(self, run_id: int, started_ms: int, stopped_ms: int | None, interval_ms: int, backend: str,
                 hostname: str, version: str, clean: bool | None, last_tick_ms: int | None) -> None:
        self.run_id = run_id
        self.started_ms = started_ms
        self.stopped_ms = stopped_ms
        self.interval_ms = interval_ms
        self.backend = backend
        self.hostname = hostname
        self.version = version
        self.clean = clean  # None: still running (the latest run, not stopped)
        self.last_tick_ms = last_tick_ms  # for an unclean stop: the last tick it wrote


class GapEvent:
    """A `gap` event of the collector overlapping the window."""

    __slots__ = ("start_ms", "end_ms", "run_id", "detail")

    def __init__(self, start_ms: int, end_ms: int | None, run_id: int | None, detail: str) -> None:
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.run_id = run_id
        self.detail = detail


class Report:
    """Everything the renderers print; built by `build`."""

    __slots__ = ("options", "plan", "db_path", "schema_version", "created_ms", "hostnames", "gpus", "headline",
                 "users", "units", "heat", "first_tick_ms", "last_tick_ms", "holes", "holes_total",
                 "gap_events", "gap_events_total", "runs", "host_errors", "warnings", "sm_since_ms", "overlap",
                 "heat_unplaced_ms", "heat_unplaced_before_ms", "heat_unplaced_offsets", "threshold_note",
                 "cpu_busy_pm", "gpm", "gpm_since_ms", "identity_starved_known")

    def __init__(
        self, *, options: Options, plan: Plan, db_path: str, schema_version: int, created_ms: int | None,
        hostnames: list[str], gpus: list[GpuReport], headline: StateTotals, users: list[Identity],
        units: list[Identity], heat: dict[int, tuple[int, int]], first_tick_ms: int | None,
        last_tick_ms: int | None, holes: list[Hole], holes_total: int, gap_events: list[GapEvent],
        gap_events_total: int, runs: list[RunInfo], host_errors: list[ErrorSummary], warnings: list[str],
        sm_since_ms: int = 0, overlap: Overlap | None = None, heat_unplaced_ms: int = 0,
        heat_unplaced_before_ms: int | None = None, heat_unplaced_offsets: tuple[int, ...] = (),
        threshold_note: str | None = None, cpu_busy_pm: int = CPU_BUSY_PERMILLE,
        gpm: query.Gpm = query.CURRENT_GPM, gpm_since_ms: int = 0, identity_starved_known: bool = True,
    ) -> None:
        self.options = options
        self.plan = plan
        self.db_path = db_path
        self.schema_version = schema_version
        self.created_ms = created_ms
        self.hostnames = hostnames
        self.gpus = gpus
        self.headline = headline
        self.users = users
        self.units = units
        self.heat = heat  # cell -> (active_ms, known_ms)
        self.first_tick_ms = first_tick_ms
        self.last_tick_ms = last_tick_ms
        self.holes = holes
        self.holes_total = holes_total
        self.gap_events = gap_events
        self.gap_events_total = gap_events_total
        self.runs = runs
        self.host_errors = host_errors  # events with no GPU (init_failed, db_error)
        self.warnings = warnings
        # SM-unknown time is recorded for ticks from this instant on (an hour
        # boundary; 0: always). Rollups older than schema 2 do not record it.
        self.sm_since_ms = sm_since_ms
        self.overlap = overlap if overlap is not None else Overlap()
        # Known GPU time of physical GPUs that the heatmap cannot place, and why:
        # hours before `heat_unplaced_before_ms` exist only as UTC-hour rollups
        # written by gua 0.1.0, without quarter hours (retention removed their
        # raw rows before the upgrade), and the zone's offset is not whole hours.
        self.heat_unplaced_ms = heat_unplaced_ms
        self.heat_unplaced_before_ms = heat_unplaced_before_ms
        self.heat_unplaced_offsets = heat_unplaced_offsets  # the zone's offsets (ms) that are not whole hours
        # Why these thresholds are classified from raw samples where rollups
        # exist (thresholds_note); None when they are not.
        self.threshold_note = threshold_note
        # Idle-held time is waiting on CPU when the identity's running
        # processes used at least this (permille of one core) in the tick.
        self.cpu_busy_pm = cpu_busy_pm
        # Active but starved: an active tick whose GPM SM activity was below this (permille).
        self.gpm = gpm  # where the database records GPM: what a further read in the transaction needs
        # GPM is counted from this instant on (hours rolled up before schema 3: not recorded).
        self.gpm_since_ms = gpm_since_ms
        # False: some rolled-up hours came from histograms, which do not record an
        # identity's busy time on a starved GPU: Identity.starved is None.
        self.identity_starved_known = identity_starved_known

    @property
    def window_ms(self) -> int:
        return self.options.until_ms - self.options.since_ms

    @property
    def physical(self) -> list[GpuReport]:
        return [g for g in self.gpus if not g.is_mig]

    @property
    def energy_gpus(self) -> list[GpuReport]:
        return [g for g in self.physical if g.totals.has_energy]

    @property
    def sm_unknown_users(self) -> list[Identity]:
        """Listed users with held time whose per-process SM was unknown."""
        return [i for i in self.users if i.sm_unknown_ms]

    @property
    def heat_note(self) -> str | None:
        """Why part of the known GPU time is not in the heatmap; None when all of it is."""
        if not self.heat_unplaced_ms:
            return None
        before = self.heat_unplaced_before_ms
        when = f"before {fmt_local(before, self.options.tz)} " if before else ""
        if self.heat_unplaced_offsets:
            zone = "a " + " / ".join(_fmt_offset(o) for o in self.heat_unplaced_offsets) + " zone"
        else:
            zone = "a zone whose offset changes off the UTC hour"
        return (f"hours {when}exist only as UTC-hour rollups of gua 0.1.0 (retention removed their raw "
                f"samples before the upgrade); {zone} cannot place them in local hours, so "
                f"{self.heat_unplaced_ms / HOUR_MS:.2f} GPU-h of known time is not in the heatmap")

    @property
    def starved_pm(self) -> int:
        """The active-but-starved rule: SM activity below this (permille) while active."""
        return self.gpm.starved_pm

    @property
    def gpm_recorded_since_ms(self) -> int | None:
        """Where GPM recording starts inside the window; None: all of it records it (where supported)."""
        return self.gpm_since_ms if self.gpm_since_ms > self.options.since_ms else None

    @property
    def sm_recorded_since_ms(self) -> int | None:
        """Where SM-unknown recording starts inside the window; None: all of it records it."""
        return self.sm_since_ms if self.sm_since_ms > self.options.since_ms else None


# ---------------------------------------------------------------- planning

def make_plan(meta: dict[str, str], opts: Options, segments: Sequence[Segment]) -> Plan:
    """Rollups for the window's whole UTC hours that have them, raw rows for the rest.

    Classified hourly rollups serve the rollup thresholds; the histograms
    serve any held threshold and any active threshold in whole percent
    (SCHEMA.md), exactly. Only an active threshold such as 7.5 %, or a
    database without histograms (gua 0.1.0's, at other thresholds), sends
    whole hours to raw rows, and the report says so (threshold_note).
    """
    since, until = opts.since_ms, opts.until_ms
    whole = ((since, until),)
    if not opts.use_rollups:
        return Plan(0, 0, whole, "raw", "--no-rollups")
    if "rollup_next_hour" not in meta:
        return Plan(0, 0, whole, "raw", "no hour rolled up yet")
    try:
        same = (int(meta.get("rollup_active_permille", -1)) == opts.active_pm
                and int(meta.get("rollup_held_bytes", -1)) == opts.held_bytes)
        next_hour = int(meta["rollup_next_hour"])
        # Absent: no histograms (schema 1; hours before it: rolled up without them).
        hist_since = int(meta["hist_since_hour"]) if "hist_since_hour" in meta else None
        sm_since = int(meta.get("sm_unknown_since_hour", "0"))
    except ValueError:
        return Plan(0, 0, whole, "raw", "unreadable rollup meta")
    whole_pct = opts.active_pm % 10 == 0
    h0 = -(-since // HOUR_MS)  # first whole hour starting at or after since
    late = ""  # why rollup hours start later than the window's first whole hour
    if not same:
        why = thresholds_note(meta, opts)
        if why:
            return Plan(0, 0, whole, "raw", why)
        assert hist_since is not None  # thresholds_note: no histograms, no hours from them
        # Histograms start where SM-unknown time is recorded, or later.
        if max(hist_since, sm_since) > h0:
            h0 = max(hist_since, sm_since)
            late = "no histograms before the upgrade to schema 2"
        # Thresholds beyond the caps: answered by hours rolled up with steps.
        try:
            steps_since = hist_steps(meta, opts)
        except (KeyError, ValueError):
            return Plan(0, 0, whole, "raw", "unreadable rollup meta")
        if steps_since is not None and steps_since > h0:
            h0 = steps_since
            late = "these thresholds are read from histograms only since the upgrade to schema 4"
    h1 = min(until // HOUR_MS, next_hour)
    if h1 <= h0:
        return Plan(0, 0, whole, "raw", "no whole rolled-up hour in the window", hist=not same)
    raw = tuple(r for r in ((since, h0 * HOUR_MS), (h1 * HOUR_MS, until)) if r[1] > r[0])
    # Rollup hours are UTC hours: they map onto local hours when the zone's
    # offset (and every change of it) falls on whole hours. Quarter hours do
    # in every zone in use today (+05:30, +05:45, +12:45); a zone's historic
    # offsets (local mean time) may not, and their hours are read raw.
    if _aligned(segments, HOUR_MS):
        return Plan(h0, h1, raw, "hour", late, hist=not same)
    if _aligned(segments, QUARTER_MS) and whole_pct and hist_since is not None:
        heat_from = min(max(h0, hist_since), h1)
        note = late or ("" if heat_from == h0 else "heatmap from raw rows before the quarter-hour rollups begin")
        return Plan(h0, h1, raw, "quarter", note, hist=not same, heat_from=heat_from)
    return Plan(h0, h1, raw, "raw", late or ("heatmap from raw rows: time zone offset is not whole quarter hours"
                if hist_since is not None else "heatmap from raw rows: no quarter-hour rollups"), hist=not same)


# Why a report at other thresholds reads raw rows for hours that are rolled up.
THRESHOLDS_NOT_WHOLE = ("an active threshold that is not a whole percent is classified from raw samples "
                        "(the rollups keep utilization in whole percent)")
THRESHOLDS_NO_HIST = ("thresholds other than the rollups' are classified from raw samples (this database's "
                      "rollups were written by gua 0.1.0, without histograms)")
THRESHOLDS_BEYOND_HIST = ("an active threshold above {pct} % or a held threshold of {mib} MiB or more is classified "
                          "from raw samples (the rollups keep utilization up to {pct} % and memory up to {mib} MiB)")
THRESHOLDS_BETWEEN_STEPS = ("an active threshold above {pct} % that is not a multiple of {pct_step} %, or a held "
                            "threshold above {mib} MiB that is not a multiple of {mib_step} MiB, is classified from "
                            "raw samples (the rollups keep utilization in {pct_step} % steps above {pct} % and "
                            "memory in {mib_step} MiB steps above {mib} MiB)")


def _within_caps(opts: Options, pct: int, mib: int) -> bool:
    """Thresholds the capped keys answer: util_pct >= a_pct for a_pct <= pct, mem_mib > held_mib for held_mib < mib."""
    return opts.active_pm <= 10 * pct and opts.held_bytes // 1_048_576 < mib


def hist_steps(meta: dict[str, str], opts: Options) -> int | None:
    """The first hour whose histograms answer these thresholds only through schema 4's steps; None: no need.

    None also when the thresholds are within the caps (or no caps exist).
    Raises ValueError for unreadable meta.
    """
    if "hist_pct_cap" not in meta or _within_caps(opts, int(meta["hist_pct_cap"]), int(meta["hist_mib_cap"])):
        return None
    return int(meta["hist_steps_since_hour"])


def thresholds_note(meta: dict[str, str], opts: Options) -> str | None:
    """Why the report's thresholds send rolled-up hours to raw samples; None when they do not.

    The same with and without --no-rollups (which reads raw samples anyway):
    it is about the thresholds and the database, not about this run.
    """
    try:
        if (int(meta.get("rollup_active_permille", -1)) == opts.active_pm
                and int(meta.get("rollup_held_bytes", -1)) == opts.held_bytes):
            return None
    except ValueError:
        return None
    if "hist_since_hour" not in meta:
        return THRESHOLDS_NO_HIST
    if opts.active_pm % 10:
        return THRESHOLDS_NOT_WHOLE
    if "hist_pct_cap" not in meta:
        return None  # schema 2 wrote the histograms uncapped
    try:
        pct, mib = int(meta["hist_pct_cap"]), int(meta["hist_mib_cap"])
    except (KeyError, ValueError):
        return THRESHOLDS_NO_HIST
    # Beyond the caps, exact through schema 4's steps for a multiple of a step (schema.py, HIST_*_STEP).
    if _within_caps(opts, pct, mib):
        return None
    held_mib = opts.held_bytes // 1_048_576
    if "hist_steps_since_hour" not in meta:
        return THRESHOLDS_BEYOND_HIST.format(pct=pct, mib=mib)
    try:
        pct_step, mib_step = int(meta["hist_pct_step"]), int(meta["hist_mib_step"])
        int(meta["hist_steps_since_hour"])
    except (KeyError, ValueError):
        return THRESHOLDS_NO_HIST
    if ((opts.active_pm > 10 * pct and opts.active_pm % (10 * pct_step))
            or (held_mib > mib and held_mib % mib_step)):
        return THRESHOLDS_BETWEEN_STEPS.format(pct=pct, mib=mib, pct_step=pct_step, mib_step=mib_step)
    return None


def _aligned(segments: Sequence[Segment], grain_ms: int) -> bool:
    """Every offset of the zone over the window, and every instant it changes, is a whole `grain_ms`."""
    return all(s.offset_ms % grain_ms == 0 for s in segments) and all(
        s.start_ms % grain_ms == 0 for s in segments[1:])


def subtract(ranges: Iterable[Range], cuts: Sequence[Range]) -> tuple[Range, ...]:
    """The parts of `ranges` outside every one of `cuts` (all half-open, cuts sorted)."""
    out: list[Range] = []
    for lo, hi in ranges:
        for c_lo, c_hi in cuts:
            if c_hi <= lo or c_lo >= hi:
                continue
            if c_lo > lo:
                out.append((lo, c_lo))
            lo = max(lo, c_hi)
        if hi > lo:
            out.append((lo, hi))
    return tuple(out)


def with_overlap(plan: Plan, hours: Sequence[int], since: int, until: int) -> Plan:
    """Move the UTC `hours` (with overlapping ticks) of the window to clip_ranges."""
    if not hours:
        return plan
    cuts: list[Range] = []
    for h in sorted(hours):
        lo, hi = max(since, h * HOUR_MS), min(until, (h + 1) * HOUR_MS)
        if hi <= lo:
            continue
        if cuts and cuts[-1][1] == lo:
            cuts[-1] = (cuts[-1][0], hi)
        else:
            cuts.append((lo, hi))
    return Plan(
        plan.h0, plan.h1,
        raw_ranges=subtract(plan.raw_ranges, cuts),
        heat=plan.heat,
        note=plan.note,
        clip_ranges=tuple(cuts),
        skip_hours=tuple(h for h in sorted(hours) if plan.h0 <= h < plan.h1),
        hist=plan.hist,
        heat_from=plan.heat_from,
    )


def _meta_int(meta: dict[str, str], key: str) -> int | None:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        return None


def hour_cover(conn: sqlite3.Connection, meta: dict[str, str], opts: Options) -> dict[int, int]:
    """UTC hour touching the window -> the busiest GPU's sum of tick durations in the whole hour.

    From the rollups' total_ms where the hour is rolled up (whatever the
    thresholds: total_ms counts every row), else (or with --no-rollups) from
    raw rows; both give the same number while the hour's raw rows remain.
    """
    first_h, last_h = opts.since_ms // HOUR_MS, (opts.until_ms - 1) // HOUR_MS
    rolled_next = _meta_int(meta, "rollup_next_hour") if opts.use_rollups else None
    split = min(last_h + 1, max(first_h, rolled_next if rolled_next is not None else first_h))
    cover: dict[int, int] = {}
    if split > first_h:
        cover.update(query.hour_cover_rollup(conn, first_h, split))
    if last_h + 1 > split:
        cover.update(query.gpu_hour_cover_raw(conn, split, last_h + 1))
    return cover


def find_overlap(conn: sqlite3.Connection, meta: dict[str, str], cover: dict[int, int],
                 physical_ids: set[int]) -> Overlap:
    """The UTC hours whose ticks overlap: a GPU has more than an hour of time in them.

    A GPU's ticks that do not overlap cover disjoint intervals, so one UTC
    hour's add up to at most the hour, plus what its first tick reaches back
    into the hour before (a fraction of a tick interval, while the collector
    runs steadily); the slack absorbs the rest. An hour holding more
    (`cover`, by OVERLAP_SLACK_MS) is counted from raw rows with each
    instant once per GPU. That costs nothing on an ordinary database: the
    sums are the ones the gap search reads anyway.

    What this does not see: an overlap shorter than the hour's shortfall,
    e.g. a clock stepped back by a few seconds (less than a tick interval),
    or an overlap beside a stretch without ticks in the same hour. Such an
    hour still holds at most an hour (+ the slack) of each GPU's time, so GPU
    time never exceeds GPUs x window by more than the slack per GPU-hour, and
    the first tick's reach back before the window, as in every report.

    The decision is made per whole UTC hour, whatever the window, the GPU
    filter or the data source, so that every report (and --no-rollups)
    counts the same tick the same way. Hours whose raw rows retention removed
    (in part) keep their rollups: nothing is left to count once.
    """
    pruned = _meta_int(meta, "raw_pruned_before_ms") or 0
    complete_from = -(-pruned // HOUR_MS)  # hours before it lost raw rows to retention
    over = sorted(h for h, ms in cover.items() if ms > HOUR_MS + OVERLAP_SLACK_MS)
    hours = tuple(h for h in over if h >= complete_from)
    unremoved = tuple(h for h in over if h < complete_from)
    excess = sum(max(0, total - HOUR_MS) for _, gpu_id, total in query.hour_gpu_totals(conn, unremoved)
                 if gpu_id in physical_ids)
    return Overlap(hours, unremoved, excess)


# ---------------------------------------------------------------- GPU selection

def select_gpus(rows: Sequence[query.GpuRow], selectors: Sequence[str]) -> list[int] | None:
    """--gpu values (index or UUID, or a UUID prefix) -> gpu_ids; MIG instances
    of a selected GPU come with it. None: no filter."""
    if not selectors:
        return None
    chosen: set[int] = set()
    for sel in selectors:
        s = sel.strip()
        hits = {r.gpu_id for r in rows if r.parent_id is None and s.isdigit() and r.index == int(s)}
        hits |= {r.gpu_id for r in rows if r.uuid.lower() == s.lower()}
        if not hits and len(s) >= 6:
            hits = {r.gpu_id for r in rows if r.uuid.lower().startswith(s.lower())}
        if not hits:
            known = ", ".join(sorted({str(r.index) for r in rows if r.parent_id is None}))
            raise WindowError(f"no GPU matches --gpu {sel!r} (indexes in this database: {known or 'none'})")
        chosen |= hits
    chosen |= {r.gpu_id for r in rows if r.parent_id in chosen}
    return sorted(chosen)


# ---------------------------------------------------------------- build

def build(conn: sqlite3.Connection, db_path: str, schema_version: int, opts: Options,
          open_warning: str = "", also: Callable[[sqlite3.Connection, Report], None] | None = None) -> Report:
    """Run every query in one read transaction and assemble the Report.

    `also(conn, report)` reads more in the same transaction (the hourly
    series), and again whenever the report is read again.

    A connection opendb opened without locks (no collector running) reads
    pages as they are on disk: if a collector starts or stops meanwhile, it
    may checkpoint pages under the read, which then fails ("malformed") or
    mixes two states. Whatever the outcome, such a read is done again, by
    then through the collector's -wal and its locks (opendb.open_readonly
    decides afresh), so a healthy database is never called corrupt.
    """
    reopened: list[sqlite3.Connection] = []
    try:
        for attempt in range(opendb.READ_TRIES):
            try:
                rep = _build_snapshot(conn, db_path, schema_version, opts, also)
                failure: Exception | None = None
            except (sqlite3.DatabaseError, ReportError, WindowError) as exc:
                failure = exc
            if not opendb.changed_under(conn):
                if failure is not None:
                    raise failure
                break
            if attempt == opendb.READ_TRIES - 1:
                raise ReportError(
                    Exit.CORRUPT,
                    f"{db_path} changed during each of {opendb.READ_TRIES} reads (a collector starting "
                    "and stopping?); it is not known to be corrupt: run gua-report again",
                )
            opendb.settle(attempt + 1)
            db = opendb.open_readonly(db_path)
            reopened.append(db.conn)
            conn, schema_version, open_warning = db.conn, db.schema_version, db.warning
    finally:
        for c in reopened:
            c.close()
    if open_warning:
        rep.warnings.insert(0, open_warning)
    return rep


def _build_snapshot(conn: sqlite3.Connection, db_path: str, schema_version: int, opts: Options,
                    also: Callable[[sqlite3.Connection, Report], None] | None) -> Report:
    conn.execute("BEGIN")  # one snapshot for the whole report, however long the collector writes
    try:
        rep = _build(conn, db_path, schema_version, opts)
        if also is not None:
            also(conn, rep)
        return rep
    finally:
        conn.execute("COMMIT")


def _build(conn: sqlite3.Connection, db_path: str, schema_version: int, opts: Options) -> Report:
    since, until = opts.since_ms, opts.until_ms
    meta = query.meta(conn)
    segments = offset_segments(opts.tz, since, until)
    gpu_rows = query.gpus(conn)
    by_id = {r.gpu_id: r for r in gpu_rows}
    gpu_ids = select_gpus(gpu_rows, opts.gpus)
    physical_ids = {r.gpu_id for r in gpu_rows if r.parent_id is None}
    all_gpus = sorted(by_id)
    gpm = query.gpm_facts(conn, meta)
    cover = hour_cover(conn, meta, opts)
    overlap = find_overlap(conn, meta, cover, physical_ids)
    plan = with_overlap(make_plan(meta, opts, segments), overlap.hours, since, until)

    # GPU state per GPU, and the heatmap over physical GPUs.
    per_gpu: dict[int, StateTotals] = {}
    heat: dict[int, list[int]] = {}

    def take(rows: list[tuple], totals: bool, cells: bool) -> None:
        for gpu_id, cell, *values in rows:
            if totals:
                per_gpu.setdefault(gpu_id, StateTotals()).add_row(values)
            if cells and gpu_id in physical_ids:
                active, held, idle = values[2] or 0, values[3] or 0, values[4] or 0
                c = heat.setdefault(cell, [0, 0])
                c[0] += active
                c[1] += active + held + idle

    if plan.h1 > plan.h0:
        heat_gpus = sorted(physical_ids if gpu_ids is None else physical_ids.intersection(gpu_ids))
        cells: list[tuple[int, int, int]] = []  # (cell, active_ms, known_ms)
        if plan.hist:
            take(query.gpu_state_hist(conn, plan.h0, plan.h1, opts.active_pm, opts.held_bytes,
                                      all_gpus if gpu_ids is None else gpu_ids, plan.skip_hours, gpm),
                 totals=True, cells=False)
            if plan.heat == "hour":
                cells = query.heat_hours(conn, plan.h0, plan.h1, opts.active_pm, heat_gpus, segments,
                                         plan.skip_hours)
        else:  # the classified rollups: in a zone of UTC hours, they place themselves in the heatmap
            here = plan.heat == "hour"
            take(query.gpu_state_rollup(conn, plan.h0, plan.h1, gpu_ids, segments if here else None,
                                        plan.skip_hours, gpm), totals=True, cells=here)
        if plan.heat == "quarter":
            cells = query.heat_quarters(conn, plan.heat_from * 4, plan.h1 * 4, opts.active_pm, heat_gpus,
                                        segments, plan.skip_hours)
        for cell, active, known in cells:
            c = heat.setdefault(cell, [0, 0])
            c[0] += active
            c[1] += known
        if plan.heat != "hour":  # the heatmap of the hours the quarter hours do not cover, from raw rows
            raw_to = plan.heat_from if plan.heat == "quarter" else plan.h1
            for lo, hi in subtract(((plan.h0 * HOUR_MS, raw_to * HOUR_MS),), plan.clip_ranges):
                take(query.gpu_state_raw(conn, lo, hi, opts.active_pm, opts.held_bytes, gpu_ids, segments, gpm),
                     totals=False, cells=True)
    sm_since_ms = sm_recorded_since(meta, schema_version)
    cpu_busy_pm = cpu_busy_rule(meta)
    # The raw ranges' identity rows are read here, with their GPU states and
    # a slice at a time: compacted hours (schema 5) are then decoded once
    # for the three queries, not once per query (rawload.slices).
    raw_identities: dict[bool, list[tuple]] = {False: [], True: []}
    for lo, hi in plan.raw_ranges:
        for a, b in rawload.slices(conn, lo, hi):
            take(query.gpu_state_raw(conn, a, b, opts.active_pm, opts.held_bytes, gpu_ids, segments, gpm),
                 totals=True, cells=True)
            for by_unit, rows in raw_identities.items():
                rows += query.identity_raw(conn, a, b, opts.active_pm, opts.held_bytes, gpu_ids, by_unit,
                                           sm_since_ms, cpu_busy_pm, schema_version >= 2, gpm)
    for lo, hi in plan.clip_ranges:
        take(query.gpu_state_clipped(conn, lo, hi, opts.active_pm, opts.held_bytes, gpu_ids, segments, gpm),
             totals=True, cells=True)

    ticks = sum(t.ticks for t in per_gpu.values())
    if ticks == 0:
        tz = opts.tz
        raise ReportError(
            Exit.EMPTY_WINDOW,
            f"no samples between {fmt_local(since, tz)} and {fmt_local(until, tz)} ({opts.tz_name})"
            + (" for the selected GPUs" if gpu_ids is not None else ""),
        )

    # Events and per-GPU errors.
    errors = [ErrorSummary(*r) for r in query.error_events(conn, since, until)]
    last = query.last_status(conn, since, until)
    gpus: list[GpuReport] = []
    for r in gpu_rows:
        if r.gpu_id not in per_gpu:
            continue
        st = last.get(r.gpu_id)
        gpus.append(GpuReport(
            row=r,
            parent=by_id.get(r.parent_id) if r.parent_id is not None else None,
            totals=per_gpu[r.gpu_id],
            errors=[e for e in errors if e.gpu_id == r.gpu_id],
            last_status=STATUS_NAMES.get(st, str(st)) if st is not None else None,
        ))
    headline = StateTotals()
    for g in gpus:
        if not g.is_mig:
            headline.add(g.totals)
    # Both sums cover the same rows unless the heatmap was read from raw rows
    # for rolled-up hours whose raw rows retention removed.
    heat_unplaced = headline.known_ms - sum(v[1] for v in heat.values())

    users, units = _identities(conn, plan, opts, gpu_ids, all_gpus, sm_since_ms, schema_version >= 2,
                               cpu_busy_pm, raw_identities, gpm)
    first, last_ts = query.first_last_tick(conn, since, until)
    holes, holes_total = _holes(conn, plan, since, until, overlap.hours, cover)
    gap_rows = query.gap_events(conn, since, until, GAP_EVENTS_KEPT)
    runs = _runs(conn, since, until)
    warnings = _warnings(meta, plan, opts)
    try:
        created = int(meta["created_ms"])
    except (KeyError, ValueError):
        created = None
    return Report(
        options=opts, plan=plan, db_path=db_path, schema_version=schema_version,
        created_ms=created,
        hostnames=sorted({r.hostname for r in runs}),
        gpus=gpus, headline=headline, users=users, units=units,
        heat={k: (v[0], v[1]) for k, v in heat.items()},
        first_tick_ms=first, last_tick_ms=last_ts,
        holes=holes, holes_total=holes_total,
        gap_events=[GapEvent(*r) for r in gap_rows],
        gap_events_total=query.count_gap_events(conn, since, until) + (
            1 if gap_rows and gap_rows[0][0] < since else 0),
        runs=runs,
        host_errors=[e for e in errors if e.gpu_id is None],
        warnings=warnings,
        sm_since_ms=sm_since_ms,
        overlap=overlap,
        heat_unplaced_ms=heat_unplaced,
        heat_unplaced_before_ms=_meta_int(meta, "raw_pruned_before_ms") if heat_unplaced else None,
        heat_unplaced_offsets=tuple(sorted({s.offset_ms for s in segments if s.offset_ms % HOUR_MS}))
        if heat_unplaced else (),
        threshold_note=thresholds_note(meta, opts),
        cpu_busy_pm=cpu_busy_pm,
        gpm=gpm,
        gpm_since_ms=gpm.since_ms if gpm.raw else until,
        # The histograms do not record a holder's busy time on a starved GPU:
        # unknown when they were read and some GPU had GPM known (without GPM
        # anywhere, nobody was busy on a starved GPU on any path).
        identity_starved_known=not (plan.hist and plan.h1 > plan.h0
                                    and any(g.totals.gpm_known_ms for g in gpus)),
    )


def cpu_busy_rule(meta: dict[str, str]) -> int:
    """The waiting-on-CPU rule in permille of one core: the collector's, which its rollups split with.

    meta `rollup_cpu_busy_permille` (SCHEMA.md); CPU_BUSY_PERMILLE when it is
    absent (schema 1: no CPU recorded anyway) or no number.
    """
    value = _meta_int(meta, "rollup_cpu_busy_permille")
    return CPU_BUSY_PERMILLE if value is None or value < 0 else value


def sm_recorded_since(meta: dict[str, str], schema_version: int) -> int:
    """The instant (an hour boundary) from which the database records SM-unknown time.

    Schema 2 says so in meta (hours whose raw rows were pruned before the
    upgrade cannot know). Schema 1 has no column: its rolled-up hours do not
    record it, later hours are classified from raw rows. The raw path counts
    from the same instant, so both paths give the same numbers.
    """
    key = "sm_unknown_since_hour" if schema_version >= 2 else "rollup_next_hour"
    try:
        hour = int(meta.get(key, meta.get("rollup_next_hour", "0")))
    except ValueError:
        hour = 0
    return max(hour, 0) * HOUR_MS


def _identities(
    conn: sqlite3.Connection, plan: Plan, opts: Options, gpu_ids: list[int] | None, all_gpus: list[int],
    sm_since_ms: int, has_sm_unknown: bool, cpu_busy_pm: int, raw_rows: dict[bool, list[tuple]],
    gpm: query.Gpm | None = None,
) -> tuple[list[Identity], list[Identity]]:
    """Users and units; raw_rows: query.identity_raw's rows of plan.raw_ranges by by_unit, read already."""
    names = query.accounts(conn)
    wanted = {u.strip() for u in opts.users}

    def keep(account_id: int) -> bool:
        if not wanted:
            return True
        uid, name = names.get(account_id, (None, "?"))
        return name in wanted or (uid is not None and str(uid) in wanted)

    out: list[list[Identity]] = []
    for by_unit in (False, True):
        acc: dict[tuple[int, str], Identity] = {}
        parts = []
        if plan.h1 > plan.h0 and plan.hist:
            parts.append(query.identity_hist(conn, plan.h0, plan.h1, opts.active_pm, opts.held_bytes,
                                             all_gpus if gpu_ids is None else gpu_ids, sorted(names), by_unit,
                                             plan.skip_hours))
        elif plan.h1 > plan.h0:
            parts.append(query.identity_rollup(conn, plan.h0, plan.h1, gpu_ids, by_unit,
                                               sm_since_ms, has_sm_unknown, plan.skip_hours, gpm))
        parts.append(raw_rows[by_unit])
        for lo, hi in plan.clip_ranges:
            parts.append(query.identity_clipped(conn, lo, hi, opts.active_pm, opts.held_bytes, gpu_ids,
                                                by_unit, sm_since_ms, cpu_busy_pm, has_sm_unknown, gpm))
        for rows in parts:
            for gpu_id, account_id, unit, *values in rows:
                if not keep(account_id):
                    continue
                uid, name = names.get(account_id, (None, f"account:{account_id}"))
                ident = acc.get((account_id, unit))
                if ident is None:
                    ident = acc[(account_id, unit)] = Identity(user=name, uid=uid, unit=unit)
                ident.add_row(gpu_id, values)
        # Accounts that shared a username (uid changed) stay separate rows;
        # the order is by GPU time held, then name, so output is stable.
        rows_out = [i for i in acc.values() if i.held_ms > 0]
        rows_out.sort(key=lambda i: (-i.held_ms, i.user, i.unit, i.uid if i.uid is not None else -1))
        out.append(rows_out)
    return out[0], out[1]


def _holes(conn: sqlite3.Connection, plan: Plan, since: int, until: int,
           overlap_hours: Sequence[int] = (), hour_cover: dict[int, int] | None = None,
           ) -> tuple[list[Hole], int]:
    """Stretches of >= HOLE_MIN_MS inside the window with no tick covering them.

    Scanning every tick would cost seconds on a year; instead each hour's
    covered time (rollups, or raw sums for the rest) picks the few hours
    that are short of ticks, and only those are read tick by tick. Any hole
    of HOLE_MIN_MS leaves at least half of it in one hour, which then falls
    more than the slack short (a tick's duration may spill into the hour
    before, by at most one interval, which the slack absorbs). Hours with
    overlapping ticks are read too: the time counted twice there could hide
    a hole from the sums.
    """
    cover: dict[int, int] = {}
    if plan.h1 > plan.h0:
        if hour_cover is not None:
            # The rollups' sums, already read to look for overlap (hour_cover
            # reads hour_gpu for every hour a plan takes from the rollups).
            cover.update((h, ms) for h, ms in hour_cover.items() if plan.h0 <= h < plan.h1)
        else:
            cover.update(query.hour_cover_rollup(conn, plan.h0, plan.h1))
    for lo, hi in plan.raw_ranges:
        for h, ms in query.hour_cover_raw(conn, lo, hi):
            cover[h] = cover.get(h, 0) + (ms or 0)
    overlap_set = set(overlap_hours)
    suspects: list[list[int]] = []  # runs of consecutive hours [a, b]
    for h in range(since // HOUR_MS, (until - 1) // HOUR_MS + 1):
        expected = min(until, (h + 1) * HOUR_MS) - max(since, h * HOUR_MS)
        if cover.get(h, 0) < expected - _SUSPECT_SLACK_MS or h in overlap_set:
            if suspects and suspects[-1][1] == h - 1:
                suspects[-1][1] = h
            else:
                suspects.append([h, h])
    found: dict[tuple[int, int], Hole] = {}

    def hole(start: int, end: int, open_ended: bool = False) -> None:
        if end - start < HOLE_MIN_MS:
            return
        s, e = max(start, since), min(end, until)
        if e > s:
            found[(s, e)] = Hole(s, e, open_ended)

    for a, b in suspects:
        lo, hi = max(since, a * HOUR_MS), min(until, (b + 1) * HOUR_MS)
        prev = query.tick_before(conn, lo)
        for ts, d in query.ticks_between(conn, lo, hi):
            if prev is not None:
                hole(prev, ts - d)
            prev = ts
        nxt = query.tick_at_or_after(conn, hi)
        if prev is not None:
            if nxt is not None:
                hole(prev, nxt[0] - nxt[1])
            else:
                hole(prev, until, open_ended=True)
    holes = sorted(found.values(), key=lambda h: h.start_ms)
    return holes[:HOLES_KEPT], len(holes)


def _runs(conn: sqlite3.Connection, since: int, until: int) -> list[RunInfo]:
    out: list[RunInfo] = []
    for run_id, started, stopped, interval, backend, host, version, next_started in query.runs(conn):
        end = stopped if stopped is not None else next_started
        if started >= until or (end is not None and end < since):
            continue
        if stopped is not None:
            clean: bool | None = True
            last_tick = None
        elif next_started is not None:
            clean = False  # killed, crashed or host lost power: the next run started without a stop
            last_tick = query.tick_before(conn, next_started)
            if last_tick is not None and last_tick < started:
                last_tick = None
        else:
            clean, last_tick = None, None  # the current run
        out.append(RunInfo(run_id, started, stopped, interval, backend, host, version, clean, last_tick))
    return out


def _warnings(meta: dict[str, str], plan: Plan, opts: Options) -> list[str]:
    out: list[str] = []
    try:
        pruned = int(meta.get("raw_pruned_before_ms", "0"))
    except ValueError:
        pruned = 0
    if pruned and any(lo < pruned for lo, _ in plan.raw_ranges):
        out.append(
            f"raw samples before {fmt_local(pruned, opts.tz)} were pruned by retention and "
            f"this report could not use rollups for them ({plan.note or 'partial hours'})"
        )
    units = _meta_int(meta, "units_pruned_before_hour")
    if units and opts.since_ms < units * HOUR_MS:
        # Per-GPU and per-user rollups are kept for ever; those per unit for unit_retention.
        out.append(f"per-unit rollups before {fmt_local(units * HOUR_MS, opts.tz)} were pruned "
                   "(the collector's unit_retention): the units cover only the time after")
    return out
