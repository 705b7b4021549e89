"""`gua-report merge`: one fleet report from several hosts' `gua-report --format json` documents.

The documents come from other machines (files an admin copied, or the
output of `--ssh`, see ssh.py), so they are untrusted input: every field
this module uses is type- and range-checked on reading (`parse_document`),
and a document that fails is one line naming the file and the field, never
a traceback. Strings are kept exactly here and escaped by the renderers
(render_fleet.py).

Hosts are only added up when they answered the same question: the same
window (to within one collector tick), the same thresholds and the same
filters, in a window report format_version this reporter knows. A host
that differs is shown on its own line and left out of the fleet totals,
never mixed in silently (`merge`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import tzinfo
from typing import Any

from . import __version__
from .errors import Exit, escape
from .window import HOUR_MS, MAX_MS, MIN_MS, WindowError, fmt_duration, iso_utc, zone

# The fleet document's own contract version (JSON.md, "gua-report merge").
FLEET_FORMAT_VERSION = 1
# Window report versions this merge reads (JSON.md): 1 lacks sm_unknown_ms.
KNOWN_HOST_VERSIONS = (1, 2)

# Exit codes of `merge` and `--ssh` beyond the report's (errors.Exit, where all
# codes live so that `gua-report --help` lists them). Also in
# `gua-report merge --help`, JSON.md and the man page.
EXIT_BAD_DOCUMENT = int(Exit.BAD_DOCUMENT)
EXIT_NO_HOST = int(Exit.NO_HOST)

MAX_DOCUMENT_BYTES = 64 * 2**20  # a year of 1000 GPUs is a few MB; more is not a report
MAX_AMOUNT = 2**53  # ms, mJ, MiB x ms: beyond this a number is not a gua amount
DEFAULT_TICK_MS = 10_000  # the collector's default interval, when a document lists no run
TOP_GPUS_JSON = 100  # worst idle-held GPUs kept in the fleet document

# Host status: only "merged" hosts are in the fleet totals; every other
# status comes with a reason (JSON.md).
MERGED, MISMATCH, DUPLICATE, REFUSED, ERROR = "merged", "mismatch", "duplicate", "refused", "error"
UNREACHABLE, NO_GUA, FAILED = "unreachable", "no_gua", "failed"


class BadDocument(ValueError):
    """Not a gua-report JSON report; the message says where and what (no prefix)."""


# ---------------------------------------------------------------- the facts read from a document

@dataclass(frozen=True)
class States:
    """GPU time per state, as a host report's `headline` or one of its `gpus` has it."""

    ticks: int = 0
    total_ms: int = 0
    active_ms: int = 0
    idle_held_ms: int = 0
    idle_ms: int = 0
    unknown_ms: int = 0
    coverage: float | None = None  # share of known time covered by driver samples

    @property
    def known_ms(self) -> int:
        return self.active_ms + self.idle_held_ms + self.idle_ms

    def share(self, ms: int) -> float | None:
        return ms / self.known_ms if self.known_ms else None


@dataclass(frozen=True)
class GpuLine:
    uuid: str
    index: int
    name: str
    is_mig: bool
    states: States
    errors: int  # NVML errors and losses counted in the window


@dataclass(frozen=True)
class UserLine:
    """One element of a host report's identities.users."""

    user: str
    uid: int | None
    held_ms: int
    idle_held_ms: int
    sm_unknown_ms: int | None  # None: format_version 1 did not say
    mem_mib_ms: int
    unknown_mem_ms: int
    gpus: tuple[str, ...]  # UUIDs


@dataclass(frozen=True)
class Quality:
    """The part of a host's data_quality a fleet report shows."""

    coverage: float | None
    unknown_ms: int
    holes_total: int
    gap_events_total: int
    unclean_stops: int
    errors: int  # NVML/collector error events, GPUs and host together
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class HostReport:
    """What the fleet report uses of one host's window report."""

    format_version: int
    generator: str
    hostnames: tuple[str, ...]
    db_path: str
    created_ms: int | None
    since_ms: int
    until_ms: int
    tick_ms: int  # the longest collector interval in the window: the window tolerance
    active_pm: int
    held_bytes: int
    filter_gpus: tuple[str, ...]
    filter_users: tuple[str, ...]
    headline: States
    gpus: tuple[GpuLine, ...]
    users: tuple[UserLine, ...]
    quality: Quality

    @property
    def physical_gpus(self) -> int:
        return sum(1 for g in self.gpus if not g.is_mig)


@dataclass
class Host:
    """One line of the fleet report: a host and what became of its document."""

    label: str
    source: str  # the file ('-' for stdin), or 'ssh'
    status: str
    reason: str | None = None
    report: HostReport | None = None
    error_code: int | None = None  # the host's gua-report exit code, from its error document
    format_version: int | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading, strictly

def _what(v: Any) -> str:
    """How a wrong value is named in an error line (never the whole value: it may be huge)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v) if abs(v) < 10**18 else "a huge number"
    if isinstance(v, float):
        return f"{v:g}"
    names: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(v), type(v).__name__)


def _get(obj: dict[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        raise BadDocument(f"{path}{key}: missing")
    return obj[key]


def _int(obj: dict[str, Any], key: str, path: str, lo: int = 0, hi: int = MAX_AMOUNT) -> int:
    v = _get(obj, key, path)
    if type(v) is not int or not lo <= v <= hi:  # bool is an int to Python, not to JSON
        raise BadDocument(f"{path}{key}: expected an integer from {lo} to {hi}, got {_what(v)}")
    return v


def _opt_int(obj: dict[str, Any], key: str, path: str, lo: int = 0, hi: int = MAX_AMOUNT) -> int | None:
    return None if obj.get(key) is None else _int(obj, key, path, lo, hi)


def _share(obj: dict[str, Any], key: str, path: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if type(v) not in (int, float) or not 0 <= v <= 1:
        raise BadDocument(f"{path}{key}: expected a share from 0 to 1 or null, got {_what(v)}")
    return float(v)


def _str(obj: dict[str, Any], key: str, path: str) -> str:
    v = _get(obj, key, path)
    if not isinstance(v, str):
        raise BadDocument(f"{path}{key}: expected a string, got {_what(v)}")
    return v


def _obj(obj: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    v = _get(obj, key, path)
    if not isinstance(v, dict):
        raise BadDocument(f"{path}{key}: expected an object, got {_what(v)}")
    return v


def _list(obj: dict[str, Any], key: str, path: str) -> list[Any]:
    v = _get(obj, key, path)
    if not isinstance(v, list):
        raise BadDocument(f"{path}{key}: expected a list, got {_what(v)}")
    return v


def _objs(obj: dict[str, Any], key: str, path: str) -> list[tuple[dict[str, Any], str]]:
    """A list of objects, each with the path its errors name."""
    out = []
    for n, item in enumerate(_list(obj, key, path)):
        if not isinstance(item, dict):
            raise BadDocument(f"{path}{key}.{n}: expected an object, got {_what(item)}")
        out.append((item, f"{path}{key}.{n}."))
    return out


def _strs(obj: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    items = _list(obj, key, path)
    for n, v in enumerate(items):
        if not isinstance(v, str):
            raise BadDocument(f"{path}{key}.{n}: expected a string, got {_what(v)}")
    return tuple(items)


def _states(d: dict[str, Any], path: str) -> States:
    s = States(
        ticks=_int(d, "ticks", path),
        total_ms=_int(d, "total_ms", path),
        active_ms=_int(d, "active_ms", path),
        idle_held_ms=_int(d, "idle_held_ms", path),
        idle_ms=_int(d, "idle_ms", path),
        unknown_ms=_int(d, "unknown_ms", path),
        coverage=_share(d, "utilization_coverage", path),
    )
    # The one sum the contract promises; a document that breaks it would make
    # the fleet's shares add up to something else than 100 %.
    if s.total_ms != s.known_ms + s.unknown_ms:
        raise BadDocument(f"{path}total_ms: is not active_ms + idle_held_ms + idle_ms + unknown_ms")
    return s


def _gpu(d: dict[str, Any], path: str) -> GpuLine:
    mig = d.get("mig")
    if mig is not None and not isinstance(mig, dict):
        raise BadDocument(f"{path}mig: expected an object or null, got {_what(mig)}")
    # `errors` is read when present: it describes the GPU, the split does not need it.
    errors = sum(_int(e, "count", p) for e, p in _objs(d, "errors", path)) if "errors" in d else 0
    return GpuLine(_str(d, "uuid", path), _int(d, "index", path, 0, 2**31), _str(d, "name", path),
                   mig is not None, _states(d, path), errors)


def _user(d: dict[str, Any], path: str, version: int) -> UserLine:
    return UserLine(
        user=_str(d, "user", path),
        uid=_opt_int(d, "uid", path, 0, 2**32),
        held_ms=_int(d, "held_ms", path),
        idle_held_ms=_int(d, "idle_held_ms", path),
        sm_unknown_ms=_int(d, "sm_unknown_ms", path) if version >= 2 else None,
        mem_mib_ms=_int(d, "mem_mib_ms", path),
        unknown_mem_ms=_int(d, "unknown_mem_ms", path),
        gpus=_strs(d, "gpus", path),
    )


def _quality(dq: dict[str, Any], path: str) -> Quality:
    errors = sum(_int(e, "count", p) for e, p in _objs(dq, "host_errors", path))
    return Quality(
        coverage=_share(dq, "utilization_coverage", path),
        unknown_ms=_int(dq, "unknown_ms", path),
        holes_total=_int(dq, "holes_total", path),
        gap_events_total=_int(dq, "gap_events_total", path),
        unclean_stops=_int(dq, "unclean_stops", path),
        errors=errors,
        warnings=_strs(dq, "warnings", path),
    )


def parse_report(doc: dict[str, Any], version: int) -> HostReport:
    """A window report (JSON.md, format_version 1 or 2) -> HostReport; BadDocument if it is not one."""
    db, win = _obj(doc, "database", ""), _obj(doc, "window", "")
    rules, filters = _obj(doc, "rules", ""), _obj(doc, "filters", "")
    dq = _obj(doc, "data_quality", "")
    since, until = _int(win, "since_ms", "window.", MIN_MS, MAX_MS), _int(win, "until_ms", "window.", MIN_MS, MAX_MS)
    if since >= until:
        raise BadDocument("window: since_ms is not before until_ms")
    intervals = [_opt_int(r, "interval_ms", p) or 0 for r, p in _objs(dq, "runs", "data_quality.")]
    gpus = tuple(_gpu(g, p) for g, p in _objs(doc, "gpus", ""))
    quality = _quality(dq, "data_quality.")
    # One count of NVML/collector errors per host: its own and its GPUs'.
    quality = replace(quality, errors=quality.errors + sum(g.errors for g in gpus))
    return HostReport(
        format_version=version,
        generator=doc["generator"] if isinstance(doc.get("generator"), str) else "",
        hostnames=_strs(db, "hostnames", "database."),
        db_path=_str(db, "path", "database."),
        created_ms=_opt_int(db, "created_ms", "database.", MIN_MS, MAX_MS),
        since_ms=since,
        until_ms=until,
        tick_ms=max(intervals, default=0) or DEFAULT_TICK_MS,
        active_pm=_int(rules, "active_threshold_permille", "rules.", 0, 1000),
        held_bytes=_int(rules, "held_threshold_bytes", "rules."),
        filter_gpus=_strs(filters, "gpus", "filters."),
        filter_users=_strs(filters, "users", "filters."),
        headline=_states(_obj(doc, "headline", ""), "headline."),
        gpus=gpus,
        users=tuple(_user(u, p, version) for u, p in _objs(_obj(doc, "identities", ""), "users", "identities.")),
        quality=quality,
    )


def host_from_document(doc: Any, label: str, source: str) -> Host:
    """One decoded document -> a Host line (not yet compared with the others).

    Raises BadDocument when it is not a gua-report window report, nor its
    JSON error document. A report in a format_version this reporter does
    not know is refused (a line), not guessed at.
    """
    if not isinstance(doc, dict):
        raise BadDocument(f"expected a JSON object, got {_what(doc)}")
    if doc.get("command") == "now":
        raise BadDocument("is a `gua-report now` document, not a window report")
    if doc.get("command") == "merge":
        raise BadDocument("is a fleet document (gua-report merge); merge the hosts' own documents")
    version = _int(doc, "format_version", "", 1, 2**31)
    if "error" in doc:
        # The host's gua-report ran and said why it has no report (JSON.md).
        err = _obj(doc, "error", "")
        code = _int(err, "code", "error.", 0, 255)
        return Host(label, source, ERROR, f"error {code}: {_str(err, 'message', 'error.')}",
                    error_code=code, format_version=version)
    if version not in KNOWN_HOST_VERSIONS:
        return Host(label, source, REFUSED,
                    f"format_version {version} is not one this gua-report {__version__} reads "
                    f"({', '.join(map(str, KNOWN_HOST_VERSIONS))}): upgrade gua-report here",
                    format_version=version)
    rep = parse_report(doc, version)
    return Host(label, source, MERGED, report=rep, format_version=version)


def _reject_constant(name: str) -> Any:
    raise BadDocument(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise BadDocument(f"number {text[:20]} is out of range")
    return v


def decode_documents(data: bytes) -> list[Any]:
    """One or more JSON documents, one after another (`for h in ...; do ssh $h ...; done`)."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise BadDocument(f"larger than {MAX_DOCUMENT_BYTES // 2**20} MiB: not a gua-report document")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadDocument(f"not UTF-8 text (byte {exc.start})") from None
    dec = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)
    docs, pos = [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            break
        try:
            doc, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise BadDocument(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except RecursionError:
            raise BadDocument("not a gua-report document: nested too deeply") from None
        except ValueError as exc:  # an integer of more than 4300 digits
            raise BadDocument(f"not a gua-report document: {exc}") from None
        docs.append(doc)
    if not docs:
        raise BadDocument("empty: no JSON document")
    return docs


def hosts_from_bytes(data: bytes, name: str, source: str, label: str | None = None) -> list[Host]:
    """Every document in `data` as a Host; BadDocument names `name` and the document."""
    try:
        docs = decode_documents(data)
    except BadDocument as exc:
        raise BadDocument(f"{name}: {exc}") from None
    out = []
    for n, doc in enumerate(docs, 1):
        where = f"{name}: document {n}: " if len(docs) > 1 else f"{name}: "
        try:
            host = host_from_document(doc, label or "", source)
        except BadDocument as exc:
            raise BadDocument(f"{where}{exc}") from None
        if not host.label:
            names = host.report.hostnames if host.report else ()
            base = ",".join(names) or os.path.basename(name) or name
            host.label = f"{base}#{n}" if len(docs) > 1 and not names else base
        out.append(host)
    return out


def read_file(path: str) -> bytes:
    """A FILE argument, or '-' for stdin; at most MAX_DOCUMENT_BYTES + 1 bytes are read."""
    try:
        if path == "-":
            return sys.stdin.buffer.read(MAX_DOCUMENT_BYTES + 1)
        with open(path, "rb") as f:
            return f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise BadDocument(f"{path}: cannot read ({exc.strerror or exc})") from None


# ---------------------------------------------------------------- merging

@dataclass
class FleetUser:
    """One user over every merged host (a name is one person across hosts)."""

    user: str
    uids: set[int] = field(default_factory=set)
    held_ms: int = 0
    idle_held_ms: int = 0
    sm_unknown_ms: int = 0
    sm_unknown_complete: bool = True  # False: some host's format_version 1 did not say
    mem_mib_ms: int = 0
    unknown_mem_ms: int = 0
    hosts: list[tuple[str, UserLine]] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return sum(len(u.gpus) for _, u in self.hosts)


@dataclass(frozen=True)
class WorstGpu:
    host: str
    gpu: GpuLine
    holders: tuple[str, ...]  # users who held it in the window, largest first


@dataclass
class Fleet:
    hosts: list[Host]
    since_ms: int | None = None  # the fleet's window: that of its reference host
    until_ms: int | None = None
    active_pm: int | None = None
    held_bytes: int | None = None
    filter_gpus: tuple[str, ...] = ()
    filter_users: tuple[str, ...] = ()
    totals: States = field(default_factory=States)
    gpus: int = 0  # physical GPUs of the merged hosts
    users: list[FleetUser] = field(default_factory=list)
    worst: list[WorstGpu] = field(default_factory=list)

    @property
    def merged(self) -> list[Host]:
        return [h for h in self.hosts if h.status == MERGED]

    @property
    def window_ms(self) -> int:
        return (self.until_ms - self.since_ms) if self.since_ms is not None and self.until_ms is not None else 0


def _differences(a: HostReport, ref: HostReport) -> list[str]:
    """Why `a` did not answer the question `ref` did; empty when it did.

    Windows may differ by one tick (the longest collector interval of the
    two): documents fetched a few seconds apart with `--since 7d` describe
    the same week. More than that is another window.
    """
    out = []
    tol = max(a.tick_ms, ref.tick_ms)
    off = max(abs(a.since_ms - ref.since_ms), abs(a.until_ms - ref.until_ms))
    if off > tol:
        out.append(f"its window ({iso_utc(a.since_ms)}, {(a.until_ms - a.since_ms) / HOUR_MS:.1f} h) differs "
                   f"from the fleet's by {fmt_duration(off)} (more than one tick, {fmt_duration(tol)})")
    if (a.active_pm, a.held_bytes) != (ref.active_pm, ref.held_bytes):
        out.append(f"thresholds differ (active {a.active_pm / 10:g} %, held {a.held_bytes} B; "
                   f"fleet: {ref.active_pm / 10:g} %, {ref.held_bytes} B)")
    if (a.filter_gpus, a.filter_users) != (ref.filter_gpus, ref.filter_users):
        out.append("filters (--gpu, --user) differ from the fleet's")
    return out


def _db_key(r: HostReport) -> tuple[object, ...]:
    """The same database read twice (a file given twice, two names for one host)."""
    return (r.db_path, r.created_ms, r.hostnames, r.since_ms, r.until_ms)


def _reference(reports: list[HostReport]) -> HostReport:
    """The report most others agree with (ties: the first): the fleet's question."""
    best, best_n = reports[0], -1
    for r in reports:
        n = sum(1 for o in reports if not _differences(o, r))
        if n > best_n:
            best, best_n = r, n
    return best


def _notes(r: HostReport) -> list[str]:
    notes = []
    if r.format_version < 2:
        notes.append(f"format_version {r.format_version} ({r.generator or 'an older gua-report'}): "
                     "held time with per-process SM unknown counts as busy there")
    if r.filter_gpus:
        notes.append("--gpu " + ",".join(r.filter_gpus))
    if r.filter_users:
        notes.append("--user " + ",".join(r.filter_users))
    return notes


def merge(hosts: list[Host]) -> Fleet:
    """Compare the hosts' documents, mark those that differ, add up the rest."""
    fleet = Fleet(hosts)
    seen: dict[tuple[object, ...], str] = {}
    for h in hosts:
        if h.status != MERGED or h.report is None:
            continue
        h.notes = _notes(h.report)
        key = _db_key(h.report)
        if key in seen:
            h.status, h.reason = DUPLICATE, f"the same database and window as {seen[key]}: counted once"
        else:
            seen[key] = h.label
    reports = [h.report for h in hosts if h.status == MERGED and h.report is not None]
    if not reports:
        return fleet
    ref = _reference(reports)
    fleet.since_ms, fleet.until_ms = ref.since_ms, ref.until_ms
    fleet.active_pm, fleet.held_bytes = ref.active_pm, ref.held_bytes
    fleet.filter_gpus, fleet.filter_users = ref.filter_gpus, ref.filter_users
    for h in hosts:
        if h.status == MERGED and h.report is not None and (diff := _differences(h.report, ref)):
            h.status, h.reason = MISMATCH, "; ".join(diff) + ": not in the fleet totals"
    _add_up(fleet)
    return fleet


def _add_up(fleet: Fleet) -> None:
    t = {"ticks": 0, "total_ms": 0, "active_ms": 0, "idle_held_ms": 0, "idle_ms": 0, "unknown_ms": 0}
    covered = 0.0  # known ms x coverage, so the fleet coverage weighs hosts by their known time
    users: dict[str, FleetUser] = {}
    gpus: list[WorstGpu] = []
    for h in fleet.merged:
        r = h.report
        assert r is not None
        for k in t:
            t[k] += getattr(r.headline, k)
        covered += (r.headline.coverage or 0.0) * r.headline.known_ms
        fleet.gpus += r.physical_gpus
        for u in r.users:
            # A name is one person on every host; an account without a name
            # (`uid:N`) is only known on its own host.
            key = u.user if not u.user.startswith("uid:") else f"{u.user}@{h.label}"
            fu = users.setdefault(key, FleetUser(key))
            if u.uid is not None:
                fu.uids.add(u.uid)
            fu.held_ms += u.held_ms
            fu.idle_held_ms += u.idle_held_ms
            fu.mem_mib_ms += u.mem_mib_ms
            fu.unknown_mem_ms += u.unknown_mem_ms
            if u.sm_unknown_ms is None:
                fu.sm_unknown_complete = False
            else:
                fu.sm_unknown_ms += u.sm_unknown_ms
            fu.hosts.append((h.label, u))
        for g in r.gpus:
            if g.states.idle_held_ms > 0:
                holders = tuple(u.user for u in r.users if g.uuid in u.gpus)
                gpus.append(WorstGpu(h.label, g, holders))
    known = t["active_ms"] + t["idle_held_ms"] + t["idle_ms"]
    fleet.totals = States(**t, coverage=covered / known if known else None)
    fleet.users = sorted(users.values(), key=lambda u: (-u.held_ms, u.user))
    for fu in fleet.users:
        fu.hosts.sort(key=lambda hu: (-hu[1].held_ms, hu[0]))
    fleet.worst = sorted(gpus, key=lambda w: (-w.gpu.states.idle_held_ms, w.host, w.gpu.index))


# ---------------------------------------------------------------- output and the command line

def render(fleet: Fleet, fmt: str, tz: tzinfo, tz_name: str) -> str:
    from . import render_fleet

    if fmt == "json":
        return render_fleet.render_json(fleet, tz_name)
    if fmt == "csv":
        return render_fleet.render_csv(fleet, tz_name)
    return render_fleet.render_text(fleet, tz, tz_name)


def write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `gua-report merge ... | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def fail(code: int, message: str, fmt: str, prog: str = "gua-report merge") -> int:
    """One line on stderr; with --format json also an error document on stdout (JSON.md)."""
    sys.stderr.write(f"{prog}: error: {escape(message, ascii_only=False)}\n")
    if fmt == "json":
        write(json.dumps({"format_version": FLEET_FORMAT_VERSION, "generator": f"gua-report {__version__}",
                          "command": "merge", "error": {"code": code, "message": message}}, indent=2) + "\n")
    return code


def exit_code(fleet: Fleet) -> int:
    return int(Exit.OK) if fleet.merged else EXIT_NO_HOST


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(Exit.BAD_ARGS, f"{self.prog}: error: {escape(message, ascii_only=False)}\n")


EPILOG = """\
Each FILE holds one or more `gua-report --format json` documents (one per
host, one after another); '-' reads standard input. A host whose
gua-report printed an error document (no samples, permission denied) is a
line saying so. Hosts are added up only when they answered the same
question: windows within one collector tick of each other, the same
thresholds and filters, a format_version this gua-report reads (1, 2). A
host that differs is shown, marked and left out of the totals. The fleet's
question is the one most hosts answered. A user name is one person on
every host; uid:N accounts stay per host.

To fetch and merge in one step, see --ssh in gua-report --help.

exit codes:
  0  fleet report written
  2  bad arguments
  10 a FILE is unreadable or not a gua-report JSON document (bad JSON, a
     field missing, of the wrong type or out of range): one line names the
     file and the field
  11 report written, but no host could be added to the fleet (each host's
     line says why)

--format json is a versioned contract of its own ("command": "merge"),
csv the same as section,subject,metric,value rows; see JSON.md beside the
gua_report package sources. Strings from the documents are printed with
control and bidi characters escaped; csv cells that begin like a formula
(= + - @) get a leading '."""


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gua-report merge",
                description="One fleet report from several hosts' gua-report --format json documents.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help="a host's JSON document(s); - for stdin")
    p.add_argument("--format", choices=("text", "json", "csv"), default="text",
                   help="text (80 columns, default), json (a versioned contract) or csv")
    p.add_argument("--tz", default=None, metavar="ZONE",
                   help="IANA time zone for the times shown (default: this host's zone)")
    p.add_argument("--version", action="version", version=f"gua-report {__version__}")
    return p


def run(argv: Sequence[str]) -> int:
    args = make_parser().parse_args(list(argv))
    fmt = args.format
    try:
        tz, tz_name = zone(args.tz)
    except WindowError as exc:
        return fail(Exit.BAD_ARGS, f"argument --tz: {exc}", fmt)
    if args.files.count("-") > 1:
        return fail(Exit.BAD_ARGS, "'-' (standard input) may be given once", fmt)
    hosts: list[Host] = []
    try:
        for path in args.files:
            hosts += hosts_from_bytes(read_file(path), path, path)
    except BadDocument as exc:
        return fail(EXIT_BAD_DOCUMENT, str(exc), fmt)
    _unique_labels(hosts)
    fleet = merge(hosts)
    write(render(fleet, fmt, tz, tz_name))
    return exit_code(fleet)


def _unique_labels(hosts: list[Host]) -> None:
    """Two documents naming the same host get #2, #3: each line must be told apart."""
    seen: dict[str, int] = {}
    for h in hosts:
        n = seen.get(h.label, 0) + 1
        seen[h.label] = n
        if n > 1:
            h.label = f"{h.label}#{n}"
