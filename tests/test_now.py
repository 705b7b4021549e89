"""`gua-report now`: who holds which GPU now, idle since when, freshness, --check, json and csv.

Databases come through the collector's own write path (Store, and the
Sampler on the simulated backend), with times ending a few seconds before
the real clock, because `now` compares the newest tick with the time it
runs. Exact idle-since cases use hand-made Tick records, still written by
Store, so proc_gpu_state is what the collector keeps.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from gua_collector import schema
from gua_collector.clock import SimClock
from gua_collector.records import GpuInfo, GpuSample, ProcessInfo, ProcSample, Tick
from gua_collector.sampler import Sampler
from gua_collector.simulate import SimBackend
from gua_collector.store import Store
from report_helpers import HOUR, sim_ticks

pytestmark = pytest.mark.timeout(120)

MIN = 60_000
INTERVAL = 60_000  # the runs' interval: stale after 3 minutes, room for a slow test machine
GIB = 1024  # MiB
NOW_CMD = [sys.executable, "-m", "gua_report", "now"]
STATUS_LINE = re.compile(
    r"GUA (OK|WARNING|CRITICAL) - [^|\n]+ \| idle_held_procs=\d+;;; "
    r"longest_idle_s=\d+;[0-9.]*;[0-9.]*;0; freeable_bytes=\d+B;;;0;\n")


def now(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOW_CMD, *args], capture_output=True, text=True, timeout=60)


def now_json(db: str, *args: str) -> dict:
    r = now("--db", db, "--format", "json", "--tz", "UTC", *args)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return json.loads(r.stdout)


def wall_ms() -> int:
    return int(time.time() * 1000)


# --- hand-made ticks, written by the collector's Store ----------------------------------------
def gpu(n: int, name: str = "NVIDIA H100 80GB HBM3") -> GpuInfo:
    return GpuInfo(f"GPU-test-{n}", n, name, 80 * 1024**3)


def proc(pid: int, user: str = "bob", comm: str = "python3", unit: str = "", start_ms: int = 1_000,
         uid: int | None = 1002) -> ProcessInfo:
    return ProcessInfo(pid, start_ms, uid, user, comm, "/user.slice", unit)


def ps(p: ProcessInfo, sm: int | None = 0, mem: int | None = 8 * GIB, kind: int = 1) -> ProcSample:
    return ProcSample(p, kind, mem, sm)


def gs(info: GpuInfo, *procs: ProcSample, util: int | None = 0) -> GpuSample:
    return GpuSample(info, 0, util, 1000, sum(p.mem_mib or 0 for p in procs), None, None, tuple(procs))


class Writer:
    """A collector run writing ticks through Store, one transaction per tick."""

    def __init__(self, path: str, start_ms: int, interval_ms: int = INTERVAL) -> None:
        self.store = Store.open(path, now_ms=start_ms)
        self.interval = interval_ms
        self.last: int | None = None
        self.start_run(start_ms)

    def start_run(self, ts_ms: int) -> None:
        self.store.begin_run(ts_ms, self.interval, "simulate:test", "gpu01", "test")
        self.first = True

    def tick(self, ts_ms: int, *gpus: GpuSample) -> None:
        d = 0 if self.first or self.last is None else ts_ms - self.last
        self.store.write_ticks([Tick(ts_ms, d, tuple(gpus))])
        self.first, self.last = False, ts_ms

    def close(self, stop_ms: int | None = None) -> None:
        if stop_ms is not None:
            self.store.end_run(stop_ms)
        self.store.close()


def minutes(end_ms: int, first: int, last: int = 0) -> Iterable[tuple[int, int]]:
    """(minutes before end, ts) for first..last minutes before end_ms, oldest first."""
    for m in range(first, last - 1, -1):
        yield m, end_ms - m * MIN


# --- the exact case -----------------------------------------------------------------------------
G0, G1, G2, G3 = gpu(0), gpu(1), gpu(2), gpu(3)
A = proc(101, "alice", "train", start_ms=5_000)  # active until 60 min ago
B = proc(102, "bob", "jupyter")  # never active
C = proc(103, "carol", "sim", unit="slurm:job_77")  # SM unknown 30 min ago
D = proc(104, "dave", "loop")  # 9 % always, 10 % once: the threshold is inclusive
E = proc(105, "erin", "multi")  # idle on GPU 2, busy on GPU 3
F_OLD = proc(106, "frank", "old", start_ms=7_000)
F_NEW = proc(106, "frank", "new", start_ms=9_000)  # the same pid, reused
G = proc(107, "gina", "mig-ish")  # SM unknown now
H = proc(108, "hank", "nomem")  # memory NVML cannot report
I_ = proc(109, "ivy", "tiny")  # 50 MiB: below the held threshold
X = proc(1500, "root", "Xorg", unit="unit:display-manager.service", uid=0)
Y = proc(110, "yan", "quick")  # did work in the last tick and left


@pytest.fixture(scope="module")
def exact(tmp_path_factory) -> tuple[str, int]:
    path = str(tmp_path_factory.mktemp("exact") / "gua.db")
    end = wall_ms() - 5_000
    w = Writer(path, end - 121 * MIN)
    for m, ts in minutes(end, 120):
        g0 = [ps(A, sm=50 if m >= 60 else 0, mem=30 * GIB), ps(B)]
        g1 = [ps(C, sm=80 if m >= 90 else (None if m == 30 else 0)), ps(D, sm=10 if m == 45 else 9, mem=2 * GIB)]
        g2 = [ps(E, sm=20 if m == 100 else 0, mem=GIB)]
        g3 = [ps(E, sm=70, mem=GIB), ps(X, sm=0, mem=45, kind=2)]
        if m >= 50:
            g2.append(ps(F_OLD, mem=GIB))
        if m <= 20:
            g2.append(ps(F_NEW, mem=3 * GIB))
        g3 += [ps(G, sm=None, mem=4 * GIB), ps(H, mem=None), ps(I_, mem=50)]
        if m == 0:
            g3.append(ps(Y, sm=80, mem=0, kind=1 | schema.KIND_EXITED))
        w.tick(ts, gs(G0, *g0, util=500 if m >= 60 else 0), gs(G1, *g1), gs(G2, *g2), gs(G3, *g3, util=700))
    w.close()
    return path, end


def by_pid(rep: dict) -> dict[tuple[int, str], dict]:
    return {(p["pid"], p["gpu"]): p for p in rep["processes"]}


def test_idle_since_exact(exact: tuple[str, int]) -> None:
    path, end = exact
    rep = now_json(path)
    assert rep["as_of_ms"] == end and rep["idle_basis"] == "state" and rep["idle_basis_since_ms"] is None
    p = by_pid(rep)
    since = {k: v["idle_since_ms"] for k, v in p.items()}
    assert since[(101, "0")] == end - 60 * MIN  # its last active tick
    assert since[(102, "0")] == end - 120 * MIN  # never active: first seen
    assert since[(103, "1")] == end - 30 * MIN  # SM unknown then: not known idle before
    assert since[(104, "1")] == end - 45 * MIN  # 10 % reaches the threshold, 9 % does not
    assert since[(105, "2")] == end - 100 * MIN and p[(105, "3")]["state"] == "active"
    assert since[(105, "3")] is None
    assert since[(106, "2")] == end - 20 * MIN and p[(106, "2")]["command"] == "new"  # PID reuse: a new process
    assert since[(108, "3")] == end - 120 * MIN
    for k, v in p.items():
        if v["idle_since_ms"] is not None:
            assert v["idle_ms"] == end - v["idle_since_ms"] and v["idle_ms_lower_bound"] is False, k
    # states
    assert p[(107, "3")]["state"] == "sm_unknown" and p[(107, "3")]["idle_ms"] is None  # never "idle"
    assert p[(108, "3")]["state"] == "idle_held" and p[(108, "3")]["mem_mib"] is None
    assert p[(109, "3")]["state"] == "idle"  # holds too little to count
    assert p[(1500, "3")]["state"] == "graphics"  # a display server never holds a card
    assert (110, "3") not in p  # exited during the tick: holds nothing
    assert len(p) == 11


def test_idle_held_order_and_freeable(exact: tuple[str, int]) -> None:
    path, end = exact
    rep = now_json(path)
    held = [(x["pid"], x["gpu"]) for x in rep["processes"] if x["state"] == "idle_held"]
    # longest idle first; the rest after them
    assert held == [(102, "0"), (108, "3"), (105, "2"), (101, "0"), (104, "1"), (103, "1"), (106, "2")]
    assert [x["state"] for x in rep["processes"]][:len(held)] == ["idle_held"] * len(held)
    ih = rep["idle_held"]
    assert ih["processes"] == 7 and ih["memory_unknown"] == 1
    assert ih["freeable_mib"] == (8 + 30 + 1 + 8 + 2 + 3) * GIB  # B A E C D F
    assert ih["freeable_bytes"] == ih["freeable_mib"] * 1_048_576
    assert ih["longest_idle_ms"] == 120 * MIN
    gpus = {g["label"]: g for g in rep["gpus"]}
    assert [g["state"] for g in rep["gpus"]] == ["idle_held", "idle_held", "idle_held", "active"]
    assert gpus["3"]["processes"] == 5 and gpus["3"]["util_permille"] == 700


def test_text_lists_longest_idle_first_in_80_columns(exact: tuple[str, int]) -> None:
    path, _ = exact
    r = now("--db", path, "--tz", "UTC")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [x for x in lines if len(x) > 80]
    head = lines.index("IDLE-HELD PROCESSES, longest idle first")
    rows = lines[head + 2:head + 9]
    assert lines[head + 9] == "  7 idle-held processes could free 52.0 GiB + 1 of unknown size"
    assert [int(x.split()[1]) for x in rows] == [102, 108, 105, 101, 104, 103, 106]
    assert rows[0].split()[-2:] == ["2h00m", stime_utc(exact[1] - 120 * MIN, exact[1])]
    other = lines[lines.index("OTHER PROCESSES HOLDING GPU MEMORY") + 2:]
    states = {int(x.split()[1]): x for x in other if x.startswith("  ") and x.split()[1].isdigit()}
    assert states[107].endswith("SM unknown") and states[1500].endswith("display")
    assert states[105].endswith("active") and " idle " in states[109]
    assert "slurm:job_77" in r.stdout


def stime_utc(ts_ms: int, as_of_ms: int) -> str:
    """ps's STIME: HH:MM on the same day, else MonDD."""
    t, ref = time.gmtime(ts_ms / 1000), time.gmtime(as_of_ms / 1000)
    return time.strftime("%H:%M" if t[:3] == ref[:3] else "%b%d", t)


def test_csv_one_row_per_process(exact: tuple[str, int]) -> None:
    path, _ = exact
    r = now("--db", path, "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["as_of_ms", "gpu", "gpu_uuid", "gpu_name", "gpu_state", "pid", "start_ms", "user", "uid",
                       "unit", "command", "kind", "mem_mib", "sm_util", "state", "first_seen_ms",
                       "last_active_ms", "idle_since_ms", "idle_ms", "idle_ms_lower_bound"]
    body = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    rep = now_json(path)
    assert len(body) == len(rep["processes"]) == 11
    for row, p in zip(body, rep["processes"], strict=True):
        assert (int(row["pid"]), row["gpu"], row["state"]) == (p["pid"], p["gpu"], p["state"])
        assert row["idle_ms"] == ("" if p["idle_ms"] is None else str(p["idle_ms"]))
        assert row["mem_mib"] == ("" if p["mem_mib"] is None else str(p["mem_mib"]))


def test_json_shape(exact: tuple[str, int]) -> None:
    rep = now_json(exact[0])
    assert rep["format_version"] == 1 and rep["command"] == "now"
    assert set(rep) == {"format_version", "generator", "command", "database", "as_of_ms", "as_of", "age_ms",
                        "interval_ms", "run_id", "tz", "idle_basis", "idle_basis_since_ms", "rules", "gpus",
                        "processes", "idle_held", "warnings"}
    assert rep["rules"] == {"active_threshold_permille": 100, "held_threshold_bytes": 100_000_000}
    assert rep["interval_ms"] == INTERVAL and 0 <= rep["age_ms"] < 3 * INTERVAL
    assert set(rep["processes"][0]) == {
        "gpu", "gpu_uuid", "pid", "start_ms", "user", "uid", "unit", "command", "kind", "compute", "mem_mib",
        "sm_util", "state", "first_seen_ms", "last_active_ms", "idle_since_ms", "idle_ms",
        "idle_ms_lower_bound"}
    assert set(rep["gpus"][0]) == {"uuid", "index", "label", "name", "mig", "status", "state", "util_permille",
                                   "mem_used_mib", "memory_total_bytes", "processes"}


# --- --check -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("limits", "code", "status", "text"), [
    (("--warn", "2h", "--crit", "8h"), 0, "OK", "0 processes idle-held longer than 2h (7 idle-held, longest 2h00m)"),
    (("--warn", "90m", "--crit", "3h"), 1, "WARNING",
     "3 processes idle-held longer than 1h30m, longest 2h00m: bob pid 102 on GPU 0 (8.0 GiB)"),
    (("--warn", "50m", "--crit", "110m"), 2, "CRITICAL",
     "2 processes idle-held longer than 1h50m, longest 2h00m: bob pid 102 on GPU 0 (8.0 GiB); "
     "4 longer than 50m"),
    (("--crit", "110m"), 2, "CRITICAL",
     "2 processes idle-held longer than 1h50m, longest 2h00m: bob pid 102 on GPU 0 (8.0 GiB)"),
    (("--warn", "30m"), 1, "WARNING",
     "5 processes idle-held longer than 30m, longest 2h00m: bob pid 102 on GPU 0 (8.0 GiB)"),
])
def test_check_exit_codes_and_status_line(exact: tuple[str, int], limits: tuple[str, ...], code: int,
                                          status: str, text: str) -> None:
    r = now("--db", exact[0], "--check", *limits)
    assert (r.returncode, r.stderr) == (code, "")
    assert STATUS_LINE.fullmatch(r.stdout), r.stdout
    assert r.stdout.startswith(f"GUA {status} - {text} | ")
    perf = dict(x.split("=", 1) for x in r.stdout.split(" | ", 1)[1].split())
    warn = {"2h": "7200", "90m": "5400", "50m": "3000", "30m": "1800"}
    crit = {"8h": "28800", "3h": "10800", "110m": "6600"}
    lim = dict(zip(limits[::2], limits[1::2], strict=True))
    assert perf == {
        "idle_held_procs": "7;;;",
        "longest_idle_s": f"7200;{warn.get(lim.get('--warn', ''), '')};{crit.get(lim.get('--crit', ''), '')};0;",
        "freeable_bytes": f"{52 * GIB * 1_048_576}B;;;0;",
    }


@pytest.mark.parametrize("args", [
    ("--warn", "3h", "--crit", "2h"),  # warn above crit
    ("--warn", "soon"),
    (),  # no threshold
    ("--warn", "2h", "--format", "json"),
    ("--warn", "2h", "--bogus"),
])
def test_check_bad_arguments_are_unknown(exact: tuple[str, int], args: tuple[str, ...]) -> None:
    r = now("--db", exact[0], "--check", *args)
    assert r.returncode == 3 and r.stdout.startswith("GUA UNKNOWN - bad arguments: ") and r.stdout.count("\n") == 1


def test_without_check_thresholds_are_bad_arguments(exact: tuple[str, int]) -> None:
    r = now("--db", exact[0], "--warn", "2h")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "--check" in r.stderr


def test_check_unknown_when_database_missing_or_foreign(tmp_path: Path) -> None:
    missing = now("--db", str(tmp_path / "none.db"), "--check", "--warn", "2h")
    assert missing.returncode == 3 and missing.stdout.startswith("GUA UNKNOWN - database ")
    plain = now("--db", str(tmp_path / "none.db"))
    assert plain.returncode == 3 and plain.stdout == "" and "does not exist" in plain.stderr
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    r = now("--db", str(foreign), "--check", "--crit", "1h")
    assert r.returncode == 3 and "not a gua database" in r.stdout
    assert now("--db", str(foreign)).returncode == 5


# --- freshness ---------------------------------------------------------------------------------------
def idle_run(path: str, end_ms: int, ticks: int = 10, stop: bool = False) -> None:
    w = Writer(path, end_ms - ticks * INTERVAL)
    for _, ts in minutes(end_ms, ticks - 1):
        w.tick(ts, gs(G0, ps(B)))
    w.close(end_ms + 1_000 if stop else None)


def test_stale_database_is_not_now(tmp_path: Path) -> None:
    path = str(tmp_path / "gua.db")
    last = wall_ms() - 10 * MIN  # more than 3 intervals of 1 min
    idle_run(path, last)
    r = now("--db", path, "--tz", "UTC")
    assert r.returncode == 9 and r.stdout == ""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(last / 1000))
    assert r.stderr.startswith(f"gua-report now: error: gua-collector is not recording since {when} UTC (10m")
    assert r.stderr.count("\n") == 1
    j = now("--db", path, "--format", "json")
    doc = json.loads(j.stdout)
    assert j.returncode == 9 and doc["error"]["code"] == 9 and doc["error"]["last_tick_ms"] == last
    assert doc["error"]["interval_ms"] == INTERVAL and doc["command"] == "now"
    c = now("--db", path, "--check", "--warn", "1m", "--tz", "UTC")
    assert c.returncode == 3 and c.stdout.startswith(f"GUA UNKNOWN - gua-collector is not recording since {when}")
    assert c.stdout.count("\n") == 1 and "|" not in c.stdout


def test_fresh_within_three_intervals(tmp_path: Path) -> None:
    path = str(tmp_path / "gua.db")
    idle_run(path, wall_ms() - 2 * INTERVAL)
    assert now_json(path)["idle_held"]["processes"] == 1


def test_stopped_collector_is_not_recording(tmp_path: Path) -> None:
    """The real service loop on a simulated clock, stopped cleanly a moment ago."""
    from test_service import run_to_end

    clock = SimClock(wall_ms() - 5 * MIN)
    run_to_end(tmp_path, SimBackend("lab", clock), clock, ticks=20, interval_s=10)
    r = now("--db", str(tmp_path / "gua.db"))
    assert r.returncode == 9 and "it stopped at" in r.stderr
    assert now("--db", str(tmp_path / "gua.db"), "--check", "--warn", "1h").returncode == 3


def test_no_tick_yet(tmp_path: Path) -> None:
    path = str(tmp_path / "gua.db")
    Writer(path, wall_ms()).close()
    r = now("--db", path)
    assert r.returncode == 9 and "has not recorded any tick" in r.stderr


# --- restarts and gaps --------------------------------------------------------------------------------
def test_idle_since_across_restarts_and_gaps(tmp_path: Path) -> None:
    """A restart (2 min unobserved) keeps the idle clock; 10 min unobserved restarts it."""
    path = str(tmp_path / "gua.db")
    end = wall_ms() - 5_000
    p, q = proc(201, "pat"), proc(202, "quinn")
    w = Writer(path, end - 181 * MIN)
    for m, ts in minutes(end, 180, 111):  # run 1: q busy at -150
        w.tick(ts, gs(G0, ps(p), ps(q, sm=30 if m == 150 else 0)))
    # killed at -111, back at -100: 11 min without observation
    w.start_run(end - 100 * MIN)
    for m, ts in minutes(end, 100, 41):
        w.tick(ts, gs(G0, ps(p), ps(q, sm=30 if m == 41 else 0)))
    # restarted at -41, back at -39: bridged
    w.start_run(end - 39 * MIN)
    for _, ts in minutes(end, 39):
        w.tick(ts, gs(G0, ps(p), ps(q)))
    w.close()
    rep = by_pid(now_json(path))
    assert rep[(201, "0")]["idle_since_ms"] == end - 100 * MIN  # the long break restarts its clock
    assert rep[(201, "0")]["first_seen_ms"] == end - 180 * MIN
    assert rep[(202, "0")]["idle_since_ms"] == end - 41 * MIN  # active before the short restart
    assert rep[(202, "0")]["last_active_ms"] == end - 41 * MIN


# --- through the sampler on the simulated backend ----------------------------------------------------------
def fold(conn: sqlite3.Connection) -> dict[tuple[int, int], int]:
    """Idle since per (gpu_id, proc_id), from every raw row, by SCHEMA.md's rule (independent of both sides)."""
    first, known, active, seen = {}, {}, {}, {}
    for ts, d, g, p, sm in conn.execute(
        "SELECT t.ts_ms, t.duration_ms, ps.gpu_id, ps.proc_id, ps.sm_util "
        "FROM tick t JOIN proc_sample ps USING (tick_id) ORDER BY t.ts_ms"
    ):
        k = (g, p)
        if k not in first:
            first[k] = known[k] = ts
        elif sm is None or ts - d - seen[k] > 5 * MIN:
            known[k] = ts
        if sm is not None and sm >= 10:
            active[k] = ts
        seen[k] = ts
    return {k: max(known[k], active.get(k, known[k])) for k in first}


def test_sampler_lab_idle_since_matches_raw_history(tmp_path: Path) -> None:
    """The lab scenario through SimBackend, Sampler and Store, with a restart: state equals a full scan."""
    path = tmp_path / "gua.db"
    end = wall_ms() - 3_000
    interval = 30_000
    clock = SimClock(end - 6 * HOUR - 20 * MIN)
    backend = SimBackend("lab", clock)
    backend.init()
    store = Store.open(str(path), now_ms=clock.wall_ms())
    first_tick = clock.wall_ms()
    for run, ticks in ((0, 300), (1, 10_000)):
        store.begin_run(clock.wall_ms(), interval, backend.name, "gpu01", "test")
        sampler = Sampler(backend)
        n = 0
        while n < ticks and clock.wall_ms() + interval <= end:
            if n:
                clock.sleep(interval / 1000, None)  # type: ignore[arg-type]
            store.write_ticks([sampler.tick(clock.wall_ms(), 0 if n == 0 else interval)])
            n += 1
        if run == 0:
            clock.sleep(180, None)  # type: ignore[arg-type]  # a restart: 3 min
    store.close()
    rep = now_json(str(path))
    conn = sqlite3.connect(path)
    expected = fold(conn)
    ids = {(uuid, pid, start): (g, p) for uuid, pid, start, g, p in conn.execute(
        "SELECT g.uuid, p.pid, p.start_ms, g.gpu_id, p.proc_id FROM gpu g, process p")}
    conn.close()
    idle = [p for p in rep["processes"] if p["idle_since_ms"] is not None]
    for p in idle:
        assert p["idle_since_ms"] == expected[ids[(p["gpu_uuid"], p["pid"], p["start_ms"] or 0)]], p
    # bob's second notebook never works: idle since the first tick, the 3-minute restart bridged
    notebook = by_pid(rep)[(30002, "2")]
    assert notebook["state"] == "idle_held" and notebook["idle_since_ms"] == first_tick
    users = {p["user"]: p for p in rep["processes"] if p["state"] == "idle_held"}
    assert "bob" in users
    assert rep["idle_held"]["freeable_mib"] == sum(p["mem_mib"] or 0 for p in rep["processes"]
                                                   if p["state"] == "idle_held")
    assert not any(p["user"] == "root" and p["state"] == "idle_held" for p in rep["processes"])  # Xorg


# --- schema 1 -----------------------------------------------------------------------------------------
def test_schema_1_database_reads_last_day_of_raw_rows(tmp_path: Path) -> None:
    from test_migrate import make_v1

    native = str(tmp_path / "native.db")
    end = wall_ms() - 5_000
    store = Store.open(native, now_ms=end - 30 * HOUR)
    store.begin_run(end - 30 * HOUR, INTERVAL, "simulate:lab", "gpu01", "0.1.0")
    ticks = list(sim_ticks(end - 30 * HOUR, end + 1, INTERVAL, "lab", jitter=False))
    for n in range(0, len(ticks), 500):
        store.write_ticks(ticks[n:n + 500])
    store.close()
    old = str(tmp_path / "v1.db")
    make_v1(native, old)
    v2, v1 = now_json(native), now_json(old)
    assert v1["database"]["schema_version"] == 1 and v1["idle_basis"] == "raw_24h"
    assert any("the last 24 hours of raw samples" in w for w in v1["warnings"])
    newest = v1["as_of_ms"]
    assert v1["idle_basis_since_ms"] == min(t.ts_ms for t in ticks if t.ts_ms >= newest - 24 * HOUR)
    a, b = by_pid(v2), by_pid(v1)
    assert a.keys() == b.keys()
    bounded = 0
    for k, p in a.items():
        q = b[k]
        assert (p["state"], p["mem_mib"], p["sm_util"]) == (q["state"], q["mem_mib"], q["sm_util"])
        if p["idle_ms"] is None:
            assert q["idle_ms"] is None
        elif p["idle_ms"] < 23 * HOUR:
            assert q["idle_since_ms"] == p["idle_since_ms"] and not q["idle_ms_lower_bound"], k
        else:  # idle for longer than the day read: at least a day, and said so
            assert q["idle_ms_lower_bound"] and q["idle_ms"] <= p["idle_ms"] and q["idle_ms"] >= 23 * HOUR
            bounded += 1
    assert bounded >= 1  # bob's second notebook idles all the time
    text = now("--db", old, "--tz", "UTC").stdout
    assert "warning: schema 1 database" in text and re.search(r" >2[34]h[0-9]{2}m ", text), text


# --- escaping -------------------------------------------------------------------------------------------
def test_hostile_names_are_escaped_in_text_and_neutralised_in_csv(tmp_path: Path) -> None:
    path = str(tmp_path / "gua.db")
    end = wall_ms() - 5_000
    evil = proc(666, "=cmd|' /C calc'!A0", "\x1b[2J\u202eexe", unit="+unit:\x07x.service")
    w = Writer(path, end - 5 * MIN)
    odd_gpu = gpu(0, "NVIDIA \x1b]0;pwned\x07H100")
    for _, ts in minutes(end, 4):
        w.tick(ts, gs(odd_gpu, ps(evil)))
    w.close()
    text = now("--db", path)
    assert text.returncode == 0, text.stderr
    assert "\x1b" not in text.stdout and "\u202e" not in text.stdout and "\x07" not in text.stdout
    assert "\\x1b" in text.stdout and all(len(x) <= 80 for x in text.stdout.splitlines())
    rows = list(csv.reader(io.StringIO(now("--db", path, "--format", "csv").stdout)))
    row = dict(zip(rows[0], rows[1], strict=True))
    assert row["user"] == "'=cmd|' /C calc'!A0" and row["unit"].startswith("'+unit:")
    assert row["command"] == "\x1b[2J\u202eexe"  # exact, as in JSON: text cells are not terminal output
    rep = now_json(path)
    assert rep["processes"][0]["user"] == "=cmd|' /C calc'!A0"
    check = now("--db", path, "--check", "--warn", "1m")
    assert check.returncode == 1 and STATUS_LINE.fullmatch(check.stdout), check.stdout
    assert check.stdout.count("|") == 1  # a '|' in a name cannot start the perfdata early


# --- retention ------------------------------------------------------------------------------------------
def test_retention_prunes_process_state(tmp_path: Path) -> None:
    path = str(tmp_path / "gua.db")
    end = wall_ms() - 5_000
    gone, stays = proc(301, "old"), proc(302, "new")
    w = Writer(path, end - 3 * 24 * HOUR)
    w.tick(end - 3 * 24 * HOUR + MIN, gs(G0, ps(gone)))
    w.tick(end - 25 * HOUR, gs(G0, ps(stays)))
    w.tick(end, gs(G0, ps(stays)))
    assert w.store.prune(end - 90 * 24 * HOUR) == 0  # no raw row that old; the pass ends
    w.close()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT p.pid FROM proc_gpu_state s JOIN process p USING (proc_id)").fetchall()
    assert rows == [(302,)]  # not seen for a day before the newest tick: gone


def test_help_documents_check_exit_codes() -> None:
    r = now("--help")
    assert r.returncode == 0
    assert "These codes apply in --check mode only." in r.stdout
    for code in ("0  OK", "1  WARNING", "2  CRITICAL", "3  UNKNOWN", "9  "):
        assert f"  {code}" in r.stdout
    assert all(len(x) <= 80 for x in r.stdout.splitlines())


def test_mig_instances_are_sm_unknown_never_idle(tmp_path: Path) -> None:
    path = str(tmp_path / "gua.db")
    end = wall_ms() - 5_000
    store = Store.open(path, now_ms=end - HOUR)
    store.begin_run(end - HOUR, INTERVAL, "simulate:mig", "gpu01", "test")
    store.write_ticks(list(sim_ticks(end - HOUR, end + 1, INTERVAL, "mig", jitter=False)))
    store.close()
    rep = now_json(path)
    labels = [(g["label"], g["state"]) for g in rep["gpus"]]
    assert labels[:3] == [("0", "unknown"), ("0.0", "unknown"), ("0.1", "unknown")]  # MIG: util unknown
    assert rep["gpus"][1]["mig"] == {"parent_uuid": rep["gpus"][0]["uuid"], "slot": 0}
    on_mig = [p for p in rep["processes"] if p["gpu"].startswith("0.")]
    assert on_mig and all(p["state"] == "sm_unknown" and p["idle_ms"] is None for p in on_mig)
    assert all(p["gpu"] == "1" for p in rep["processes"] if p["state"] == "idle_held")
    check = now("--db", path, "--check", "--warn", "1m")
    assert check.returncode in (0, 1) and "bob" not in check.stdout  # bob idles on MIG: unknown, not accused


def test_man_page_documents_now_and_its_check_mode() -> None:
    from gua_report import now as now_module
    from test_deploy import MAN, documented_options, parser_options

    page = MAN / "gua-report.1"
    assert parser_options(now_module.make_parser()) <= documented_options(page)
    text = " ".join(page.read_text().replace("\\-", "-").split())
    for needle in ("gua-report now --check", "These exit statuses apply in .B --check mode only",
                   "idle_held_procs=0;;; longest_idle_s=0;7200;28800;0;", ".B 9 .B gua-report now only"):
        assert needle in text, needle
