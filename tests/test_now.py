"""`gua-report now`: who holds which GPU now, idle since when, freshness, --check, json and csv.

Databases come through the collector's own write path (Store, and the
Sampler on the simulated backend), with times ending a few seconds before
the real clock, because `now` compares the newest tick with the time it
runs. Exact idle-since and CPU-rule cases use hand-made Tick records, still
written by Store, so proc_gpu_state is what the collector keeps. The lab
scenario's Monday evening (a finished job abandoned beside a notebook that
preprocesses on the CPU) is simulated time: `now` runs in this process
there, with its clock set a few seconds after the newest tick.
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
import types
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
    r"GUA (OK|WARNING|CRITICAL) - [^|\n]+ \| idle_held_procs=\d+;;; abandoned_procs=\d+;;; "
    r"waiting_cpu_procs=\d+;;; cpu_unknown_procs=\d+;;; "
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


def ps(p: ProcessInfo, sm: int | None = 0, mem: int | None = 8 * GIB, kind: int = 1, cpu: int | None = None,
       rss: int | None = None) -> ProcSample:
    return ProcSample(p, kind, mem, sm, cpu, rss)


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

    def tick(self, ts_ms: int, *gpus: GpuSample, host: int | None = None) -> None:
        d = 0 if self.first or self.last is None else ts_ms - self.last
        self.store.write_ticks([Tick(ts_ms, d, tuple(gpus), host_cpu_permille=host)])
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
A = proc(101, "alice", "train", start_ms=5_000)  # active until 60 min ago; no CPU since: abandoned
B = proc(102, "bob", "jupyter")  # never active, no CPU: abandoned
C = proc(103, "carol", "sim", unit="slurm:job_77")  # SM unknown 30 min ago; 150 % CPU 2 min ago: waiting
D = proc(104, "dave", "loop")  # 9 % always, 10 % once: the threshold is inclusive; CPU never measured
E = proc(105, "erin", "multi")  # idle on GPU 2, busy on GPU 3 (80 % CPU): waiting on CPU on GPU 2
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
        first = m == 120  # the collector measures CPU from the second tick of a process on
        cpu = None if first else 0
        g0 = [ps(A, sm=50 if m >= 60 else 0, mem=30 * GIB, cpu=None if first else 1000 if m >= 60 else 0, rss=12_000),
              ps(B, cpu=cpu, rss=900)]
        g1 = [ps(C, sm=80 if m >= 90 else (None if m == 30 else 0), cpu=1500 if m == 2 else cpu, rss=3000),
              ps(D, sm=10 if m == 45 else 9, mem=2 * GIB)]
        g2 = [ps(E, sm=20 if m == 100 else 0, mem=GIB, cpu=None if first else 800)]
        g3 = [ps(E, sm=70, mem=GIB, cpu=None if first else 800), ps(X, sm=0, mem=45, kind=2, cpu=cpu)]
        if m >= 50:
            g2.append(ps(F_OLD, mem=GIB, cpu=cpu))
        if m <= 20:
            g2.append(ps(F_NEW, mem=3 * GIB, cpu=None if m == 20 else 0))
        g3 += [ps(G, sm=None, mem=4 * GIB, cpu=cpu), ps(H, mem=None, cpu=cpu), ps(I_, mem=50, cpu=cpu)]
        if m == 0:
            g3.append(ps(Y, sm=80, mem=0, kind=1 | schema.KIND_EXITED))
        w.tick(ts, gs(G0, *g0, util=500 if m >= 60 else 0), gs(G1, *g1), gs(G2, *g2), gs(G3, *g3, util=700),
               host=None if first else 420)
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
    # CPU now and RSS, as the newest tick has them; the CPU state of idle-held processes only
    assert (p[(101, "0")]["cpu_permille"], p[(101, "0")]["rss_mib"]) == (0, 12_000)
    assert p[(104, "1")]["cpu_permille"] is None and p[(104, "1")]["rss_mib"] is None
    assert {k: v["cpu_state"] for k, v in p.items() if v["state"] == "idle_held"} == {
        (101, "0"): "abandoned", (102, "0"): "abandoned", (108, "3"): "abandoned", (106, "2"): "abandoned",
        (103, "1"): "waiting_on_cpu",  # 150 % two minutes ago, 0 now
        (105, "2"): "waiting_on_cpu",  # idle here, busy on GPU 3: its CPU is the same process's
        (104, "1"): "cpu_unknown",  # never measured: never called abandoned
    }
    assert all(v["cpu_state"] is None and v["cpu_max_permille"] is None
               for v in p.values() if v["state"] != "idle_held")
    assert (p[(103, "1")]["cpu_permille"], p[(103, "1")]["cpu_max_permille"]) == (0, 1500)
    assert rep["host_cpu_permille"] == 420


def test_idle_held_order_and_freeable(exact: tuple[str, int]) -> None:
    path, end = exact
    rep = now_json(path)
    held = [(x["pid"], x["gpu"]) for x in rep["processes"] if x["state"] == "idle_held"]
    # abandoned longest idle first, then waiting on CPU, then CPU unknown; the rest after them
    assert held == [(102, "0"), (108, "3"), (101, "0"), (106, "2"), (105, "2"), (103, "1"), (104, "1")]
    assert [x["state"] for x in rep["processes"]][:len(held)] == ["idle_held"] * len(held)
    ih = rep["idle_held"]
    assert ih["processes"] == 7 and ih["memory_unknown"] == 1  # H, abandoned, its memory unknown
    assert ih["freeable_mib"] == (8 + 30 + 3) * GIB  # the abandoned: B A F (+ H unknown)
    assert ih["freeable_bytes"] == ih["freeable_mib"] * 1_048_576
    assert ih["longest_idle_ms"] == 120 * MIN
    assert ih["abandoned"] == {"processes": 4, "mem_mib": 41 * GIB, "memory_unknown": 1,
                               "longest_idle_ms": 120 * MIN}
    assert ih["waiting_on_cpu"] == {"processes": 2, "mem_mib": (1 + 8) * GIB, "memory_unknown": 0,
                                    "longest_idle_ms": 100 * MIN}
    assert ih["cpu_unknown"] == {"processes": 1, "mem_mib": 2 * GIB, "memory_unknown": 0,
                                 "longest_idle_ms": 45 * MIN}
    gpus = {g["label"]: g for g in rep["gpus"]}
    assert [g["state"] for g in rep["gpus"]] == ["idle_held", "idle_held", "idle_held", "active"]
    assert gpus["3"]["processes"] == 5 and gpus["3"]["util_permille"] == 700


def test_text_lists_longest_idle_first_in_80_columns(exact: tuple[str, int]) -> None:
    path, _ = exact
    r = now("--db", path, "--tz", "UTC")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [x for x in lines if len(x) > 80]
    assert lines[2] == "host CPU: 42% busy over the newest tick (all cores together)"
    head = lines.index("ABANDONED: idle-held, CPU below 10% of a core, longest idle first")
    assert lines[head + 1] == ("   GPU     PID USER     UNIT           COMMAND    VRAM   CPU   RSS    IDLE "
                               "SINCE")
    rows = lines[head + 2:head + 6]
    assert lines[head + 6] == "  4 abandoned processes could free 41.0 GiB + 1 of unknown size"
    assert [int(x.split()[1]) for x in rows] == [102, 108, 101, 106]
    assert rows[0].split()[-5:] == ["8.0G", "0%", "900M", "2h00m", stime_utc(exact[1] - 120 * MIN, exact[1])]
    assert rows[1].split()[-5:-2] == ["?", "0%", "?"]  # hank: memory NVML cannot report, RSS not recorded
    assert rows[2].split()[-5:-2] == ["30.0G", "0%", "11.7G"]
    waiting = lines.index("WAITING ON CPU: idle-held, CPU >= 10% of a core in the last 5m")
    assert [int(x.split()[1]) for x in lines[waiting + 2:waiting + 4]] == [105, 103]
    assert lines[waiting + 2].split()[-4] == "80%"  # CPU now
    assert lines[waiting + 3].split()[-4] == "0%"  # now; 150 % two minutes ago
    assert lines[waiting + 4] == "  2 processes waiting on CPU hold 9.0 GiB: working, not counted as freeable"
    assert lines[waiting + 5] == "  CPU is the newest tick's: one below 10% now reached it earlier in the last 5m"
    unknown = lines.index("CPU UNKNOWN: idle-held, CPU not measured")
    assert lines[unknown + 2].split()[1] == "104" and lines[unknown + 2].split()[-4] == "?"
    assert lines[unknown + 3] == "  1 process with CPU unknown holds 2.0 GiB"
    other = lines[lines.index("OTHER PROCESSES HOLDING GPU MEMORY") + 2:]
    states = {int(x.split()[1]): x for x in other if x.startswith("  ") and x.split()[1].isdigit()}
    assert states[107].endswith("SM unknown") and states[1500].endswith("display")
    assert states[105].endswith(" 80%     ? active 70%") and states[109].endswith(" idle 2h00m")
    assert lines[lines.index("OTHER PROCESSES HOLDING GPU MEMORY") + 1].split() == [
        "GPU", "PID", "USER", "UNIT", "COMMAND", "VRAM", "CPU", "RSS", "STATE"]
    assert "slurm:job_77" in r.stdout
    rules = " ".join(" ".join(lines[lines.index("") + 1:]).split())
    assert ("An idle-held process is waiting on CPU when, in a tick of the last 5m in which it idled on that "
            "GPU, its CPU reached 10% of a core (meta rollup_cpu_busy_permille)") in rules


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
                       "last_active_ms", "idle_since_ms", "idle_ms", "idle_ms_lower_bound",
                       "cpu_state", "cpu_permille", "cpu_max_permille", "rss_mib", "host_cpu_permille"]
    body = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    rep = now_json(path)
    assert len(body) == len(rep["processes"]) == 11
    for row, p in zip(body, rep["processes"], strict=True):
        assert (int(row["pid"]), row["gpu"], row["state"]) == (p["pid"], p["gpu"], p["state"])
        assert row["idle_ms"] == ("" if p["idle_ms"] is None else str(p["idle_ms"]))
        assert row["mem_mib"] == ("" if p["mem_mib"] is None else str(p["mem_mib"]))
        for key in ("cpu_state", "cpu_permille", "cpu_max_permille", "rss_mib"):
            assert row[key] == ("" if p[key] is None else str(p[key])), key
        assert row["host_cpu_permille"] == "420"


def test_json_shape(exact: tuple[str, int]) -> None:
    rep = now_json(exact[0])
    assert rep["format_version"] == 2 and rep["command"] == "now"
    assert set(rep) == {"format_version", "generator", "command", "database", "as_of_ms", "as_of", "age_ms",
                        "interval_ms", "run_id", "tz", "idle_basis", "idle_basis_since_ms", "host_cpu_permille",
                        "rules", "gpus", "processes", "idle_held", "warnings"}
    assert rep["rules"] == {"active_threshold_permille": 100, "held_threshold_bytes": 100_000_000,
                            "cpu_busy_permille": 100, "cpu_busy_source": "meta", "cpu_window_ms": 300_000}
    assert set(rep["idle_held"]) == {"processes", "freeable_mib", "freeable_bytes", "memory_unknown",
                                     "longest_idle_ms", "abandoned", "waiting_on_cpu", "cpu_unknown"}
    assert rep["interval_ms"] == INTERVAL and 0 <= rep["age_ms"] < 3 * INTERVAL
    assert set(rep["processes"][0]) == {
        "gpu", "gpu_uuid", "pid", "start_ms", "user", "uid", "unit", "command", "kind", "compute", "mem_mib",
        "sm_util", "state", "first_seen_ms", "last_active_ms", "idle_since_ms", "idle_ms",
        "idle_ms_lower_bound", "cpu_permille", "cpu_max_permille", "cpu_state", "rss_mib"}
    assert set(rep["gpus"][0]) == {"uuid", "index", "label", "name", "mig", "status", "state", "util_permille",
                                   "mem_used_mib", "memory_total_bytes", "processes"}


# --- CPU: the rule, its window, unknown CPU -------------------------------------------------------
# (comm, CPU permille at m minutes before the newest tick, SM % at m): one process each, 8 GiB, on GPU 0.
CPU_CASES: dict[int, tuple[str, object, object]] = {
    401: ("at_rule", lambda m: 100 if m == 0 else 0, lambda m: 0),  # >= the rule: waiting
    402: ("below", lambda m: 99, lambda m: 0),  # just below, all along: abandoned
    403: ("burst_4m", lambda m: 2500 if m == 4 else 0, lambda m: 0),  # inside the 5-minute window
    404: ("burst_5m", lambda m: 2500 if m == 5 else 0, lambda m: 0),  # exactly 5 minutes ago: outside
    405: ("busy_sm", lambda m: 2500 if m == 2 else 0, lambda m: 50 if m == 2 else 0),  # CPU while SM-active
    406: ("null_now", lambda m: None if m == 0 else 0, lambda m: 0),  # 0 before, unknown now
    407: ("null_early", lambda m: None if m >= 3 else 0, lambda m: 0),  # unknown earlier, 0 since
    408: ("null_busy", lambda m: None if m == 0 else 2500 if m == 1 else 0, lambda m: 0),  # unknown now, busy 1m ago
    409: ("never", lambda m: None, lambda m: 0),  # never measured
}
DEFAULT_RULE = {401: "waiting_on_cpu", 402: "abandoned", 403: "waiting_on_cpu", 404: "abandoned",
                405: "abandoned", 406: "cpu_unknown", 407: "abandoned", 408: "waiting_on_cpu", 409: "cpu_unknown"}


@pytest.fixture(scope="module")
def cpu_rules(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("cpu") / "gua.db")
    end = wall_ms() - 5_000
    w = Writer(path, end - 21 * MIN)
    procs = {pid: proc(pid, "rita", comm) for pid, (comm, _, _) in CPU_CASES.items()}
    for m, ts in minutes(end, 20):
        samples = [ps(procs[pid], sm=sm(m), mem=GIB, cpu=cpu(m))  # type: ignore[operator]
                   for pid, (_, cpu, sm) in CPU_CASES.items()]
        w.tick(ts, gs(G0, *samples), host=None if m == 20 else 37)
    w.close()
    return path


def copy_db(src: str, dst: Path, meta: str | None | bool = False) -> str:
    """A copy of src (through SQLite's backup), with meta rollup_cpu_busy_permille set (None: removed)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
        if meta is None:
            b.execute("DELETE FROM meta WHERE key = 'rollup_cpu_busy_permille'")
        elif meta is not False:
            b.execute("UPDATE meta SET value = ? WHERE key = 'rollup_cpu_busy_permille'", (meta,))
    return str(dst)


def cpu_states(rep: dict) -> dict[int, str]:
    return {p["pid"]: p["cpu_state"] for p in rep["processes"]}


def test_cpu_rule_window_and_unknown_cpu(cpu_rules: str) -> None:
    rep = now_json(cpu_rules)
    assert cpu_states(rep) == DEFAULT_RULE
    p = {x["pid"]: x for x in rep["processes"]}
    # the window looks only at ticks in which it idled: 405's 250 % came with SM work
    assert (p[403]["cpu_permille"], p[403]["cpu_max_permille"]) == (0, 2500)
    assert (p[404]["cpu_max_permille"], p[405]["cpu_max_permille"]) == (0, 0)
    assert p[405]["idle_ms"] == 2 * MIN
    assert (p[406]["cpu_permille"], p[406]["cpu_max_permille"]) == (None, 0)
    assert (p[408]["cpu_permille"], p[408]["cpu_max_permille"]) == (None, 2500)
    assert (p[409]["cpu_permille"], p[409]["cpu_max_permille"]) == (None, None)
    assert rep["rules"]["cpu_window_ms"] == 5 * MIN and rep["host_cpu_permille"] == 37
    # listed abandoned, waiting on CPU, CPU unknown; each longest idle first, then by pid
    order = [x["pid"] for x in rep["processes"]]
    assert order == [402, 404, 407, 405, 401, 403, 408, 406, 409]
    ih = rep["idle_held"]
    assert (ih["abandoned"]["processes"], ih["waiting_on_cpu"]["processes"], ih["cpu_unknown"]["processes"]) == (
        4, 3, 2)
    assert ih["freeable_mib"] == 4 * GIB
    # --check: 7 processes not waiting on CPU, idle-held 20 minutes, the abandoned 402 named first
    r = now("--db", cpu_rules, "--check", "--warn", "10m", "--crit", "1h")
    assert r.returncode == 1 and STATUS_LINE.fullmatch(r.stdout), r.stdout
    assert r.stdout.startswith("GUA WARNING - 5 processes idle-held longer than 10m (3 abandoned, 2 CPU unknown): "
                               "rita pid 402 on GPU 0, abandoned 20m (1.0 GiB); 3 waiting on CPU, not counted | ")
    assert " abandoned_procs=4;;; waiting_cpu_procs=3;;; cpu_unknown_procs=2;;; " in r.stdout


@pytest.mark.parametrize(("meta", "rule", "source", "changed"), [
    ("300", 300, "meta", {401: "abandoned"}),  # 10 % is below a 30 % rule; 250 % still above
    (None, 100, "default", {}),  # no key (a database that predates it): the collector's default
    ("lots", 100, "default", {}),  # not a number: the default, and a warning says so
])
def test_cpu_rule_comes_from_meta(cpu_rules: str, tmp_path: Path, meta: str | None, rule: int, source: str,
                                  changed: dict[int, str]) -> None:
    path = copy_db(cpu_rules, tmp_path / "gua.db", meta)
    rep = now_json(path)
    assert (rep["rules"]["cpu_busy_permille"], rep["rules"]["cpu_busy_source"]) == (rule, source)
    assert cpu_states(rep) == {**DEFAULT_RULE, **changed}
    assert any("rollup_cpu_busy_permille is 'lots'" in w for w in rep["warnings"]) == (meta == "lots")
    text = now("--db", path, "--tz", "UTC").stdout
    flat = " ".join(text.split())
    assert f"CPU below {rule / 10:g}% of a core" in flat
    assert ("(meta rollup_cpu_busy_permille)" if source == "meta"
            else "(the collector's default; meta does not set rollup_cpu_busy_permille)") in flat


def test_cpu_window_spans_three_ticks_of_a_long_interval(tmp_path: Path) -> None:
    """At 10-minute ticks the window is 30 minutes: a 5-minute window would hold the newest tick alone."""
    path = str(tmp_path / "gua.db")
    end = wall_ms() - 5_000
    w = Writer(path, end - 60 * MIN, interval_ms=10 * MIN)
    loader = proc(501, "sam", "loader")
    for m in (50, 40, 30, 20, 10, 0):
        w.tick(end - m * MIN, gs(G0, ps(loader, cpu=None if m == 50 else 1200 if m == 20 else 0)))
    w.close()
    rep = now_json(path)
    assert rep["rules"]["cpu_window_ms"] == 30 * MIN
    assert rep["processes"][0]["cpu_state"] == "waiting_on_cpu"


# --- the lab on a Monday evening, through the Sampler -------------------------------------------------
LAB_MONDAY = 1_772_438_400_000  # a Monday 08:00 UTC (test_cpu.START); alice's job runs 08:00-17:00
LAB_INTERVAL = 30_000


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> tuple[str, int]:
    """The lab scenario from Monday 16:00 to 18:30 UTC, by SimBackend, Sampler and Store, still running.

    At 18:30 alice's job, finished at 17:00, still holds 30 GiB and does
    nothing on the CPU: abandoned. bob's notebook on GPU 1 (8 GiB) worked
    18:00-18:10, idle since with no CPU: abandoned. His 2 GiB notebook on
    GPU 2 never used the GPU and preprocesses at 250 % CPU: waiting on CPU.
    """
    path = str(tmp_path_factory.mktemp("lab") / "gua.db")
    clock = SimClock(LAB_MONDAY + 8 * HOUR)
    backend = SimBackend("lab", clock)
    backend.init()
    store = Store.open(path, now_ms=clock.wall_ms())
    store.begin_run(clock.wall_ms(), LAB_INTERVAL, backend.name, "gpu01", "test")
    sampler = Sampler(backend)
    end = LAB_MONDAY + 10 * HOUR + 30 * MIN
    store.write_ticks([sampler.tick(clock.wall_ms(), 0)])
    while clock.wall_ms() < end:
        clock.sleep(LAB_INTERVAL / 1000, None)  # type: ignore[arg-type]
        store.write_ticks([sampler.tick(clock.wall_ms(), LAB_INTERVAL)])
    store.close()  # no end_run: the collector is still running
    return path, end


def now_at(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], at_ms: int,
           *args: str) -> tuple[int, str, str]:
    """gua-report now in this process, its clock at at_ms: (exit code, stdout, stderr)."""
    from gua_report import now as now_module

    monkeypatch.setattr(now_module, "time", types.SimpleNamespace(time=lambda: at_ms / 1000))
    code = now_module.run(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def lab_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], path: str, end: int) -> dict:
    code, out, err = now_at(monkeypatch, capsys, end + 5_000, "--db", path, "--format", "json")
    assert (code, err) == (0, "")
    return json.loads(out)


def test_lab_evening_abandoned_and_waiting_on_cpu(lab: tuple[str, int], monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path, end = lab
    rep = lab_json(monkeypatch, capsys, path, end)
    assert rep["as_of_ms"] == end and rep["age_ms"] == 5_000
    assert 0 < rep["host_cpu_permille"] < 1000  # the simulated host: 2.5 cores of bob's and half a core else
    held = [(p["user"], p["gpu"], p["cpu_state"], p["cpu_permille"], p["mem_mib"], p["idle_ms"])
            for p in rep["processes"] if p["state"] == "idle_held"]
    assert held == [
        ("alice", "0", "abandoned", 0, 30 * GIB, 90 * MIN),  # finished at 17:00, memory still held
        ("bob", "1", "abandoned", 0, 8 * GIB, 20 * MIN),  # its burst ended at 18:10
        ("bob", "2", "waiting_on_cpu", 2500, 2 * GIB, 150 * MIN),  # never used the GPU; 2.5 cores busy
    ]
    assert all(p["rss_mib"] == 2048 for p in rep["processes"])  # the simulated /proc's 2 GiB
    assert not any(p["user"] == "carol" for p in rep["processes"])  # her job ended at 18:00
    ih = rep["idle_held"]
    assert (ih["freeable_mib"], ih["memory_unknown"]) == (38 * GIB, 0)  # alice's and bob's abandoned 30 + 8
    assert ih["waiting_on_cpu"] == {"processes": 1, "mem_mib": 2 * GIB, "memory_unknown": 0,
                                    "longest_idle_ms": 150 * MIN}


def test_lab_evening_text_in_80_columns(lab: tuple[str, int], monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path, end = lab
    code, out, err = now_at(monkeypatch, capsys, end + 5_000, "--db", path, "--tz", "UTC")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert all(len(x) <= 80 for x in lines), [x for x in lines if len(x) > 80]
    host = lab_json(monkeypatch, capsys, path, end)["host_cpu_permille"]
    assert lines[1] == "as of 2026-03-02 18:30:00 UTC (newest tick, 5s ago; ticks every 30s)"
    assert lines[2] == f"host CPU: {host // 10}% busy over the newest tick (all cores together)"
    head = lines.index("ABANDONED: idle-held, CPU below 10% of a core, longest idle first")
    alice, bob = lines[head + 2].split(), lines[head + 3].split()
    assert (alice[0], alice[2], alice[-5:]) == ("0", "alice", ["30.0G", "0%", "2.0G", "1h30m", "17:00"])
    assert (bob[0], bob[1], bob[2], bob[-5:]) == ("1", "30001", "bob", ["8.0G", "0%", "2.0G", "20m", "18:10"])
    assert lines[head + 4] == "  2 abandoned processes could free 38.0 GiB"
    waiting = lines.index("WAITING ON CPU: idle-held, CPU >= 10% of a core in the last 5m")
    row = lines[waiting + 2].split()
    assert (row[0], row[1], row[2], row[-5:]) == ("2", "30002", "bob", ["2.0G", "250%", "2.0G", "2h30m", "16:00"])
    assert lines[waiting + 3] == "  1 process waiting on CPU holds 2.0 GiB: working, not counted as freeable"
    assert "CPU UNKNOWN" not in out and "CPU is the newest tick's" not in out
    other = lines[lines.index("OTHER PROCESSES HOLDING GPU MEMORY") + 2].split()
    assert other[1:3] == ["1500", "root"] and other[-4:] == ["45M", "0%", "2.0G", "display"]


def test_lab_evening_csv(lab: tuple[str, int], monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    path, end = lab
    code, out, _ = now_at(monkeypatch, capsys, end + 5_000, "--db", path, "--format", "csv")
    assert code == 0
    header, *body = csv.reader(io.StringIO(out))
    rows = [dict(zip(header, r, strict=True)) for r in body]
    got = [(r["user"], r["gpu"], r["cpu_state"], r["cpu_permille"], r["cpu_max_permille"], r["rss_mib"])
           for r in rows]
    assert got == [("alice", "0", "abandoned", "0", "0", "2048"), ("bob", "1", "abandoned", "0", "0", "2048"),
                   ("bob", "2", "waiting_on_cpu", "2500", "2500", "2048"), ("root", "3", "", "0", "", "2048")]
    assert len({r["host_cpu_permille"] for r in rows}) == 1 and rows[0]["host_cpu_permille"].isdigit()


@pytest.mark.parametrize(("limits", "code", "text"), [
    # bob's waiting notebook (2h30m) never raises the status, alice's abandoned job (1h30m) does
    (("--warn", "1h"), 1, "WARNING - 1 process idle-held longer than 1h (1 abandoned): alice pid {alice} on GPU 0, "
                          "abandoned 1h30m (30.0 GiB); 1 waiting on CPU, not counted"),
    (("--warn", "10m", "--crit", "1h"), 2,
     "CRITICAL - 1 process idle-held longer than 1h (1 abandoned): alice pid {alice} on GPU 0, abandoned 1h30m "
     "(30.0 GiB); 2 longer than 10m; 1 waiting on CPU, not counted"),
    (("--crit", "2h"), 0, "OK - 0 processes idle-held longer than 2h (2 abandoned, longest 1h30m); "
                          "1 waiting on CPU, not counted"),
])
def test_lab_evening_check(lab: tuple[str, int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                           limits: tuple[str, ...], code: int, text: str) -> None:
    path, end = lab
    alice = next(p["pid"] for p in lab_json(monkeypatch, capsys, path, end)["processes"] if p["user"] == "alice")
    got, out, err = now_at(monkeypatch, capsys, end + 5_000, "--db", path, "--check", *limits)
    assert (got, err) == (code, "")
    assert STATUS_LINE.fullmatch(out), out
    assert out.startswith("GUA " + text.format(alice=alice) + " | "), out
    given = dict(zip(limits[::2], limits[1::2], strict=True))
    seconds = {"10m": "600", "1h": "3600", "2h": "7200"}
    warn, crit = seconds.get(given.get("--warn", ""), ""), seconds.get(given.get("--crit", ""), "")
    assert out.split(" | ")[1] == (
        "idle_held_procs=3;;; abandoned_procs=2;;; waiting_cpu_procs=1;;; cpu_unknown_procs=0;;; "
        f"longest_idle_s=5400;{warn};{crit};0; freeable_bytes={38 * GIB * 1_048_576}B;;;0;\n")


def test_lab_evening_schema_1_copy_is_cpu_unknown_never_abandoned(
        lab: tuple[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The same rows in a gua 0.1.0 database: no CPU columns, so no process is called abandoned."""
    from test_migrate import make_v1

    path, end = lab
    old = str(tmp_path / "v1.db")
    make_v1(path, old)
    rep = lab_json(monkeypatch, capsys, old, end)
    assert rep["database"]["schema_version"] == 1 and rep["host_cpu_permille"] is None
    assert rep["rules"]["cpu_busy_source"] == "default"
    held = [(p["user"], p["gpu"], p["cpu_state"]) for p in rep["processes"] if p["state"] == "idle_held"]
    assert held == [("bob", "2", "cpu_unknown"), ("alice", "0", "cpu_unknown"), ("bob", "1", "cpu_unknown")]
    assert all(p["cpu_permille"] is None and p["rss_mib"] is None and p["cpu_max_permille"] is None
               for p in rep["processes"])
    assert rep["idle_held"]["freeable_mib"] == 0 and rep["idle_held"]["cpu_unknown"]["mem_mib"] == 40 * GIB
    code, out, _ = now_at(monkeypatch, capsys, end + 5_000, "--db", old, "--tz", "UTC")
    assert code == 0 and "host CPU: not recorded (schema 1 database)" in out
    assert "ABANDONED: none known" in out and "CPU UNKNOWN: idle-held, CPU not measured" in out
    assert all(len(x) <= 80 for x in out.splitlines())
    # not measuring must not silence the check: CPU unknown counts, named when no abandoned one is over
    code, out, _ = now_at(monkeypatch, capsys, end + 5_000, "--db", old, "--check", "--warn", "1h")
    assert code == 1 and STATUS_LINE.fullmatch(out), out
    assert out.startswith("GUA WARNING - 2 processes idle-held longer than 1h (2 CPU unknown): bob pid 30002 on "
                          "GPU 2, CPU unknown 2h30m (2.0 GiB) | "), out


def test_json_md_documents_every_field(exact: tuple[str, int]) -> None:
    """Each key of the document, its processes, gpus, rules and idle_held appears in JSON.md's `now` section."""
    md = (Path(__file__).parent.parent / "reporter" / "JSON.md").read_text()
    section = md[md.index("## `gua-report now`"):md.index("## `gua-report merge`")]
    assert "## `gua-report now` (its own `format_version`, now 2)" in section
    rep = now_json(exact[0])
    keys = set(rep) | set(rep["processes"][0]) | set(rep["gpus"][0]) | set(rep["rules"]) | set(rep["idle_held"])
    keys |= set(rep["idle_held"]["abandoned"])
    assert sorted(k for k in keys if f"`{k}`" not in section) == []
    header = now("--db", exact[0], "--format", "csv").stdout.splitlines()[0]
    assert f"`{header}`" in section


# --- --check -------------------------------------------------------------------------------------
# Counted against the limits: abandoned B (2h), H (2h), A (1h), F (20m) and CPU-unknown D (45m);
# never E (1h40m) nor C (30m), waiting on CPU.
@pytest.mark.parametrize(("limits", "code", "status", "text"), [
    (("--warn", "2h", "--crit", "8h"), 0, "OK",
     "0 processes idle-held longer than 2h (4 abandoned, 1 CPU unknown, longest 2h00m); "
     "2 waiting on CPU, not counted"),
    (("--warn", "90m", "--crit", "3h"), 1, "WARNING",
     "2 processes idle-held longer than 1h30m (2 abandoned): bob pid 102 on GPU 0, abandoned 2h00m (8.0 GiB); "
     "2 waiting on CPU, not counted"),
    (("--warn", "50m", "--crit", "110m"), 2, "CRITICAL",
     "2 processes idle-held longer than 1h50m (2 abandoned): bob pid 102 on GPU 0, abandoned 2h00m (8.0 GiB); "
     "3 longer than 50m; 2 waiting on CPU, not counted"),
    (("--crit", "110m"), 2, "CRITICAL",
     "2 processes idle-held longer than 1h50m (2 abandoned): bob pid 102 on GPU 0, abandoned 2h00m (8.0 GiB); "
     "2 waiting on CPU, not counted"),
    (("--warn", "30m"), 1, "WARNING",
     "4 processes idle-held longer than 30m (3 abandoned, 1 CPU unknown): bob pid 102 on GPU 0, abandoned "
     "2h00m (8.0 GiB); 2 waiting on CPU, not counted"),
])
def test_check_exit_codes_and_status_line(exact: tuple[str, int], limits: tuple[str, ...], code: int,
                                          status: str, text: str) -> None:
    r = now("--db", exact[0], "--check", *limits)
    assert (r.returncode, r.stderr) == (code, "")
    assert STATUS_LINE.fullmatch(r.stdout), r.stdout
    assert r.stdout.startswith(f"GUA {status} - {text} | "), r.stdout
    perf = dict(x.split("=", 1) for x in r.stdout.split(" | ", 1)[1].split())
    warn = {"2h": "7200", "90m": "5400", "50m": "3000", "30m": "1800"}
    crit = {"8h": "28800", "3h": "10800", "110m": "6600"}
    lim = dict(zip(limits[::2], limits[1::2], strict=True))
    assert perf == {
        "idle_held_procs": "7;;;",
        "abandoned_procs": "4;;;",
        "waiting_cpu_procs": "2;;;",
        "cpu_unknown_procs": "1;;;",
        "longest_idle_s": f"7200;{warn.get(lim.get('--warn', ''), '')};{crit.get(lim.get('--crit', ''), '')};0;",
        "freeable_bytes": f"{41 * GIB * 1_048_576}B;;;0;",
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
    assert notebook["cpu_state"] == "waiting_on_cpu" and notebook["cpu_permille"] == 2500  # it preprocesses
    users = {p["user"]: p for p in rep["processes"] if p["state"] == "idle_held"}
    assert "bob" in users
    assert rep["idle_held"]["freeable_mib"] == sum(p["mem_mib"] or 0 for p in rep["processes"]
                                                   if p["cpu_state"] == "abandoned")
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
                   "idle_held_procs=0;;; abandoned_procs=0;;; waiting_cpu_procs=0;;; cpu_unknown_procs=0;;; "
                   "longest_idle_s=0;7200;28800;0;", ".B 9 .B gua-report now only",
                   "rollup_cpu_busy_permille", "waiting on CPU", "abandoned"):
        assert needle in text, needle
