#!/usr/bin/env python3
"""gua on a real NVIDIA GPU: run by hand on a Hopper host with torch; never in CI.

Starts real torch workloads (tests/gpu/gpu_worker.py) as two local users,
one phase after another on one GPU, while this repository's collector
records them (`python -m gua_collector --backend nvml --interval 10s`).
Then it checks `gua-report --format json` (and the database, by SQL, where
the report has no field) against what it knows it ran:

  busy          a matmul loop                     card active
  idle-held     a process holding 8 GiB, no work  card idle-held
  duty-50       1.5 s of matmuls, 1.5 s asleep    card active, interval mean util ~50 %
  shared        busy (user A) + 8 GiB holder (B)  card active; B idle-held within 10 % of the truth
  back-to-back  short jobs of user A in a row     card active; no idle-held charged to A
  spin          a one-thread spin kernel          util ~100 %, GPM SM activity < 5 %

A card state is right when >= 95 % of the phase's ticks (those wholly
inside it) have it. Prints a per-phase table; exit 0 when every check
passed, 1 when one failed, 2 on a setup error, 3 when nothing failed but
some checks could not run (listed). With no NVIDIA GPU, no NVML or no
torch it prints why and exits 0: there is nothing to check.

As root it creates throwaway users (guachk-a, guachk-b for the workloads,
guachk-c for the collector, so GPM is tried unprivileged as under
User=gua) and deletes them afterwards. As another user everything runs as
that user, and the checks that need two users are skipped. See README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORKER = HERE / "gpu_worker.py"
THROWAWAY = {"a": "guachk-a", "b": "guachk-b", "collector": "guachk-c"}

# Pass marks, from the issue (gua #11).
STATE_SHARE = 0.95  # of a phase's ticks in the expected card state
HOLDER_TOLERANCE = 0.10  # the hidden holder's idle-held time vs the truth
SPIN_SM_MAX = 50  # per mille: GPM SM activity of the spin kernel stays under 5 %
SPIN_UTIL_MIN = 900  # while NVML's utilization reads ~100 %
DUTY_UTIL = (350, 650)  # a 50 % duty cycle: the interval mean, not a 96-or-0 snapshot
GPM_CPU_MAX_US = 1000  # GPM's collector CPU per GPU per tick
STARTUP_S = 10  # a torch worker's start (import, CUDA context), for the time estimate


@dataclass(frozen=True)
class Worker:
    role: str  # "a" or "b": which throwaway user runs it
    mode: str  # gpu_worker.py mode
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    workers: tuple[Worker, ...]
    expect: str  # card state: "active" or "idle_held"
    checks: tuple[str, ...] = ()  # extra checks by name (see Evaluator)
    back_to_back: bool = False  # workers[0] run as short jobs one after another
    summary: str = ""


@dataclass
class PhaseRecord:
    """What really happened in a phase (the truth the report is checked against)."""

    name: str
    start_ms: int
    end_ms: int
    expect: str
    checks: list[str]
    gpu_uuid: str | None = None  # None: the run's GPU
    users: dict[str, str] = field(default_factory=dict)  # role -> account name
    jobs: int = 0
    gpm_side: list[int] = field(default_factory=list)  # SM activity per mille, this script's own GPM reads


def plan(args: argparse.Namespace) -> list[Phase]:
    s, gib, job = args.phase_seconds, f"{args.hold_gib:g}", args.job_seconds
    return [
        Phase("busy", s, (Worker("a", "busy"),), "active", summary="matmul loop"),
        Phase("idle-held", s, (Worker("a", "hold", ("--gib", gib)),), "idle_held", summary=f"{gib} GiB held, no work"),
        Phase("duty-50", s, (Worker("a", "duty"),), "active", ("duty_mean",), summary="1.5 s on / 1.5 s off"),
        Phase("shared", args.shared_seconds, (Worker("a", "busy"), Worker("b", "hold", ("--gib", gib))), "active",
              ("holder_idle_held", "busy_user_not_held"), summary=f"A busy + B holding {gib} GiB"),
        Phase("back-to-back", s, (Worker("a", "job", ("--seconds", f"{job:g}")),), "active", ("jobs_not_held",),
              back_to_back=True, summary=f"A's {job:g} s jobs in a row"),
        Phase("spin", s, (Worker("a", "spin"),), "active", ("spin_gpm",), summary="one-thread spin kernel"),
    ]


def estimate_s(phases: list[Phase], args: argparse.Namespace) -> float:
    """GPU time the run takes: phases, worker starts, gaps, collector start and last tick."""
    starts = STARTUP_S * len(phases)  # the back-to-back jobs after the first are set up while one runs
    return sum(p.seconds for p in phases) + starts + len(phases) * args.gap_seconds + 2 * args.interval_s + 10


def print_plan(phases: list[Phase], args: argparse.Namespace) -> None:
    print(f"gua GPU check plan: GPU {args.gpu}, collector every {args.interval_s:g} s, "
          f"gap {args.gap_seconds:g} s between phases")
    print(f"{'phase':<13} {'seconds':>7}  {'workers':<34} {'expect':<10} checks")
    for p in phases:
        who = ", ".join(f"{w.role}:{w.mode}" for w in p.workers) + (" (jobs)" if p.back_to_back else "")
        print(f"{p.name:<13} {p.seconds:>7g}  {who:<34} {p.expect:<10} {', '.join(p.checks) or '-'}")
        print(f"{'':<13} {'':>7}  {p.summary}")
    total = estimate_s(phases, args)
    print(f"estimated GPU time: {total / 60:.1f} min (limit 8 min){'  OVER' if total > 480 else ''}")
    print("each phase is judged on the ticks wholly inside it: "
          f"card state >= {STATE_SHARE:.0%} right; holder within {HOLDER_TOLERANCE:.0%}; "
          f"spin SM activity < {SPIN_SM_MAX / 10:g} %; GPM CPU < {GPM_CPU_MAX_US} us per read")


# ---------------------------------------------------------------- preflight

def why_not_here(args: argparse.Namespace) -> str:
    """'' when an NVIDIA GPU, NVML and torch with CUDA are here; else why the check cannot run."""
    try:
        import pynvml
    except ImportError:
        return "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as error:
        return f"no NVIDIA driver / NVML: {error}"
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    if count == 0:
        return "NVML sees no GPU"
    if args.gpu >= count:
        return f"GPU index {args.gpu} does not exist (NVML sees {count})"
    probe = subprocess.run([args.torch_python, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode == 3:
        return f"torch ({args.torch_python}) sees no CUDA device"
    if probe.returncode:
        return f"no torch in {args.torch_python}: {probe.stderr.strip().splitlines()[-1:] or probe.returncode}"
    return ""


@dataclass(frozen=True)
class GpuFacts:
    uuid: str
    name: str
    gpm: bool
    busy_pids: tuple[int, ...]


def gpu_facts(index: int) -> GpuFacts:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        uuid, name = pynvml.nvmlDeviceGetUUID(handle), pynvml.nvmlDeviceGetName(handle)
        try:
            gpm = bool(pynvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
        except (pynvml.NVMLError, AttributeError):
            gpm = False
        pids = tuple(p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
    finally:
        pynvml.nvmlShutdown()
    return GpuFacts(_text(uuid), _text(name), gpm, pids)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------- accounts

class Accounts:
    """Who runs what: throwaway users as root (made here, deleted after), else this user for everything."""

    def __init__(self, keep: bool) -> None:
        self.root = os.geteuid() == 0
        self.keep = keep
        self.created: list[str] = []
        me = pwd.getpwuid(os.getuid()).pw_name
        self.names = dict(THROWAWAY) if self.root else {role: me for role in THROWAWAY}

    @property
    def two_users(self) -> bool:
        return self.names["a"] != self.names["b"]

    def ensure(self, collector_as_root: bool) -> None:
        if not self.root:
            return
        if collector_as_root:
            self.names["collector"] = "root"
        for role, name in self.names.items():
            if name == "root":
                continue
            try:
                pwd.getpwnam(name)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                                "--shell", "/usr/sbin/nologin", "--comment", f"gua GPU check ({role})", name], check=True)
                self.created.append(name)

    def popen_kwargs(self, role: str, home: Path) -> dict[str, Any]:
        """subprocess arguments that run a child as the role's user, in its own session."""
        entry = pwd.getpwnam(self.names[role])
        env = dict(os.environ, HOME=str(home), USER=entry.pw_name, LOGNAME=entry.pw_name,
                   XDG_CACHE_HOME=str(home / ".cache"), PYTHONUNBUFFERED="1")
        kwargs: dict[str, Any] = {"env": env, "start_new_session": True}
        if self.root and entry.pw_uid != 0:
            kwargs.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        return kwargs

    def chown(self, path: Path, role: str) -> None:
        if self.root:
            entry = pwd.getpwnam(self.names[role])
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def remove(self) -> None:
        if self.keep:
            return
        for name in self.created:
            subprocess.run(["userdel", name], check=False)


# ---------------------------------------------------------------- processes

class Children:
    """Every process this script started, so each is stopped by its own pid whatever happens."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen[str]] = []

    def start(self, cmd: list[str], log: Path, *, stdin: bool = False, **kwargs: Any) -> subprocess.Popen[str]:
        """Start cmd; stdout is a pipe (for 'ready'), stderr goes to log: a full pipe would stall the child."""
        with open(log, "a") as err:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=err, text=True, **kwargs)
            except OSError as error:  # e.g. an interpreter under /root that a throwaway user cannot run
                who = f"uid {kwargs['user']}" if "user" in kwargs else "this user"
                raise SetupError(f"cannot start {cmd[0]} as {who}: {error.strerror} "
                                 "(see README.md: --torch-python, --collector-as-root)") from None
        self.live.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str], grace: float = 15) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.live:
            self.live.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.live):
            self.stop(proc, grace=5)


def wait_ready(proc: subprocess.Popen[str], what: str, log: Path, timeout: float = 180) -> None:
    """Block until the worker prints 'ready'; a worker that dies first is a setup error."""
    import selectors

    assert proc.stdout is not None
    fd = proc.stdout.fileno()  # read raw: a buffered reader could hold the line select() no longer sees
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=1.0):
            chunk = os.read(fd, 4096)
            seen += chunk
            if b"ready" in seen.splitlines():
                return
            if not chunk:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
                break
    raise SetupError(f"{what} never became ready (exit {proc.poll()}); its log {log}: {_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace").strip()[-600:]
    except OSError:
        return "(none)"


class SetupError(Exception):
    pass


# ---------------------------------------------------------------- GPM, measured beside the collector

class SideGpm:
    """This repository's Gpm reader, run in this script: figures per phase and what a read costs."""

    def __init__(self, index: int) -> None:
        import pynvml

        from gua_collector.nvml_backend import Gpm  # this interpreter must have the repo installed (its .venv)

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._gpm = Gpm(pynvml)
        self.cpu_us: list[float] = []
        self.wall_us: list[float] = []
        self.errors: list[str] = []

    def read(self) -> int | None:
        cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
        reading = self._gpm.read(0, self._handle)
        self.cpu_us.append((time.thread_time_ns() - cpu) / 1000)
        self.wall_us.append((time.perf_counter_ns() - wall) / 1000)
        if reading.error:
            self.errors.append(reading.error)
        return reading.sm_active

    def restart(self) -> None:
        self._gpm.forget(0)

    def close(self) -> None:
        self._gpm.close()
        self._nvml.nvmlShutdown()

    def costs(self) -> dict[str, float]:
        if not self.cpu_us:
            return {}
        return {"reads": len(self.cpu_us), "cpu_us_median": statistics.median(self.cpu_us),
                "cpu_us_max": max(self.cpu_us), "wall_us_median": statistics.median(self.wall_us),
                "wall_us_max": max(self.wall_us)}


def idle_until(deadline: float, each_second: Callable[[], None] | None) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        if each_second is not None:
            each_second()


# ---------------------------------------------------------------- the run

def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Run:
    def __init__(self, args: argparse.Namespace, facts: GpuFacts, accounts: Accounts, work: Path) -> None:
        self.args, self.facts, self.accounts, self.work = args, facts, accounts, work
        self.children = Children()
        self.db = work / "db" / "gua.db"
        self.records: list[PhaseRecord] = []
        self.side: SideGpm | None = None
        self.collector: subprocess.Popen[str] | None = None
        self.collector_cpu: tuple[float, float] | None = None

    def worker_cmd(self, w: Worker) -> list[str]:
        return [self.args.torch_python, str(self.work / "gpu_worker.py"), w.mode, *w.args]

    def start_worker(self, w: Worker, phase: str, *, wait_go: bool = False) -> tuple[subprocess.Popen[str], Path]:
        kwargs = self.accounts.popen_kwargs(w.role, self.work / f"home-{w.role}")
        kwargs["env"]["CUDA_VISIBLE_DEVICES"] = self.facts.uuid
        log = self.work / f"{phase}-{w.role}-{w.mode}.log"
        cmd = self.worker_cmd(w) + (["--wait-go"] if wait_go else [])
        proc = self.children.start(cmd, log, stdin=wait_go, cwd=self.work, **kwargs)
        return proc, log

    def collector_cmd(self) -> list[str]:
        (self.work / "empty.conf").write_text("")  # a host's /etc/gua/collector.conf must not steer this run
        return [self.args.collector_python, "-m", "gua_collector", "--config", str(self.work / "empty.conf"),
                "--backend", "nvml", "--interval", f"{self.args.interval_s:g}s", "--db", str(self.db)]

    def start_collector(self) -> None:
        cmd = self.collector_cmd()
        kwargs = self.accounts.popen_kwargs("collector", self.work / "db")
        log = self.work / "collector.log"
        self.collector = self.children.start(cmd, log, cwd=self.work, **kwargs)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.collector.poll() is not None:
                raise SetupError(f"the collector exited ({self.collector.returncode}); {log}: {_tail(log)}")
            if self.db.exists() and _ticks(self.db) >= 1:
                self.collector_cpu = (_cpu_s(self.collector.pid), _ticks(self.db))
                return
            time.sleep(0.5)
        raise SetupError("the collector wrote no tick within 90 s")

    def side_read(self, record: PhaseRecord) -> Callable[[], None] | None:
        side = self.side
        if side is None or ("spin_gpm" not in record.checks and record.name != "busy"):
            return None
        side.restart()  # figures from this phase only

        def each_second() -> None:
            value = side.read()
            if value is not None:
                record.gpm_side.append(value)

        return each_second

    def phase(self, p: Phase) -> PhaseRecord:
        names = {w.role: self.accounts.names[w.role] for w in p.workers}
        print(f"phase {p.name}: {p.summary} ({', '.join(f'{r}={n}' for r, n in names.items())})", flush=True)
        if p.back_to_back:
            return self.back_to_back(p, names)
        started = [(w, *self.start_worker(w, p.name)) for w in p.workers]
        for w, proc, log in started:
            wait_ready(proc, f"{p.name} worker {w.role}:{w.mode}", log)
        record = PhaseRecord(p.name, now_ms(), 0, p.expect, list(p.checks), users=names)
        idle_until(time.monotonic() + p.seconds, self.side_read(record))
        record.end_ms = now_ms()
        for _, proc, _ in started:
            self.children.stop(proc)
        return record

    def back_to_back(self, p: Phase, names: dict[str, str]) -> PhaseRecord:
        """Jobs of one user in a row: each next job is set up (CUDA context, memory) while the one before runs,
        and starts the moment it exits, so the card never idles; the waiting job holds memory doing nothing."""
        record = PhaseRecord(p.name, 0, 0, p.expect, list(p.checks), users=names)
        job = p.workers[0]
        current, log = self.start_worker(job, f"{p.name}-1", wait_go=True)
        wait_ready(current, f"{p.name} job 1", log)
        _go(current)
        record.start_ms, record.jobs = now_ms(), 1
        deadline = time.monotonic() + p.seconds
        while True:
            following = None
            if time.monotonic() + 2 * self.args.job_seconds <= deadline:  # room for one more after this one
                following, log = self.start_worker(job, f"{p.name}-{record.jobs + 1}", wait_go=True)
                wait_ready(following, f"{p.name} job {record.jobs + 1}", log)
            current.wait(self.args.job_seconds + 60)
            self.children.stop(current)
            if following is None:
                break
            _go(following)
            current, record.jobs = following, record.jobs + 1
        record.end_ms = now_ms()
        return record

    def execute(self, phases: list[Phase]) -> None:
        self.start_collector()
        if self.facts.gpm:
            try:
                self.side = SideGpm(self.args.gpu)
            except ImportError as error:
                print(f"note: no side GPM reads ({error}); run this script with the repository's .venv python")
        try:
            for p in phases:
                self.records.append(self.phase(p))
                idle_until(time.monotonic() + self.args.gap_seconds, None)
            # One more tick, so the last phase's end is recorded.
            idle_until(time.monotonic() + self.args.interval_s + 3, None)
            assert self.collector is not None
            if self.collector_cpu is not None:
                cpu0, ticks0 = self.collector_cpu
                ticks = _ticks(self.db) - ticks0
                self.collector_cpu = ((_cpu_s(self.collector.pid) - cpu0) * 1000 / max(1, ticks), ticks)
            self.children.stop(self.collector, grace=30)
        finally:
            if self.side is not None:
                self.side.close()

    def timeline(self) -> dict[str, Any]:
        return {
            "db": str(self.db),
            "gpu_uuid": self.facts.uuid,
            "gpu_name": self.facts.name,
            "gpm_supported": self.facts.gpm,
            "interval_ms": int(self.args.interval_s * 1000),
            "two_users": self.accounts.two_users,
            "collector_user": self.accounts.names["collector"],
            "collector_cpu_ms_per_tick": None if self.collector_cpu is None else round(self.collector_cpu[0], 2),
            "gpm_side_costs": self.side.costs() if self.side else {},
            "gpm_side_errors": sorted(set(self.side.errors)) if self.side else [],
            "phases": [asdict(r) for r in self.records],
        }


def _go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _ticks(db: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            return int(conn.execute("SELECT count(*) FROM tick").fetchone()[0])
    except sqlite3.Error:
        return 0


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- evaluation

@dataclass
class Check:
    phase: str
    name: str
    verdict: str  # PASS, FAIL, SKIP
    detail: str


class Evaluator:
    """Judges a finished run (timeline.json + its database) with gua-report and SQL."""

    def __init__(self, timeline: dict[str, Any], report_python: str) -> None:
        self.t = timeline
        self.db = timeline["db"]
        self.python = report_python
        self.checks: list[Check] = []
        self.rows: list[list[str]] = []
        self.interval_ms = int(timeline["interval_ms"])
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as conn:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(gpu_sample)")}
        self.sm_column = "sm_active_permille" in columns

    def add(self, phase: str, name: str, ok: bool | None, detail: str) -> None:
        verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.checks.append(Check(phase, name, verdict, detail))

    def window(self, rec: dict[str, Any]) -> tuple[int, int]:
        """Ticks wholly inside the phase: ts - duration >= start (durations run a little over the interval)."""
        return rec["start_ms"] + self.interval_ms + 500, rec["end_ms"] + 1

    def report(self, since: int, until: int, uuid: str) -> dict[str, Any] | str:
        cmd = [self.python, "-m", "gua_report", "--db", self.db, "--format", "json", "--tz", "UTC",
               "--since", f"@{since / 1000:.3f}", "--until", f"@{until / 1000:.3f}", "--gpu", uuid]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        if out.returncode:
            return f"gua-report exit {out.returncode}: {out.stderr.strip()}"
        return json.loads(out.stdout)

    def ticks(self, since: int, until: int, uuid: str) -> list[sqlite3.Row]:
        sm = ", s.sm_active_permille AS sm" if self.sm_column else ", NULL AS sm"
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as conn:
            conn.row_factory = sqlite3.Row
            return conn.execute(
                f"""SELECT t.ts_ms, t.duration_ms, s.status, s.util_permille AS util, s.coverage_permille AS cov{sm}
                    FROM tick AS t JOIN gpu_sample AS s USING (tick_id) JOIN gpu AS g USING (gpu_id)
                    WHERE g.uuid = ? AND t.ts_ms >= ? AND t.ts_ms < ? ORDER BY t.ts_ms""",
                (uuid, since, until)).fetchall()

    def run(self) -> int:
        for rec in self.t["phases"]:
            self.phase(rec)
        self.run_wide()
        return self.print()

    def phase(self, rec: dict[str, Any]) -> None:
        name, uuid = rec["name"], rec.get("gpu_uuid") or self.t["gpu_uuid"]
        since, until = self.window(rec)
        rep = self.report(since, until, uuid)
        rows = self.ticks(since, until, uuid)
        if isinstance(rep, str) or not rep["gpus"]:
            self.add(name, "card state", False, rep if isinstance(rep, str) else "no samples of the GPU in the phase")
            self.rows.append([name, str(len(rows)), rec["expect"], "-", "-", "-", "-", "-", "FAIL"])
            return
        g = next(x for x in rep["gpus"] if x["uuid"] == uuid)
        known = g["known_ms"] or 1
        share = g[f"{rec['expect']}_ms"] / known
        enough = g["ticks"] >= 2
        self.add(name, f"card {rec['expect']}", share >= STATE_SHARE and enough,
                 f"{share:.1%} of {g['ticks']} ticks ({known / 1000:.0f} s known)" + ("" if enough else "; too few ticks"))
        util = _mean([r["util"] for r in rows])
        sm = _mean([r["sm"] for r in rows])
        sm_text = "-" if sm is None else f"{sm / 10:.1f}"
        if sm is None and rec.get("gpm_side"):
            sm_text = f"{statistics.mean(rec['gpm_side']) / 10:.1f}*"
        self.rows.append([name, str(g["ticks"]), rec["expect"], f"{g['active_ms'] / known:.0%}",
                          f"{g['idle_held_ms'] / known:.0%}", f"{g['idle_ms'] / known:.0%}",
                          "-" if util is None else f"{util / 10:.0f}", sm_text,
                          "PASS" if share >= STATE_SHARE and enough else "FAIL"])
        users = {u["user"]: u for u in rep["identities"]["users"]}
        observed_ms = sum(r["duration_ms"] for r in rows)
        for check in rec["checks"]:
            getattr(self, "check_" + check)(name, rec, users, rows, observed_ms)

    def check_duty_mean(self, name: str, rec: dict, users: dict, rows: list, observed_ms: int) -> None:
        util, cov = _mean([r["util"] for r in rows]), _mean([r["cov"] for r in rows])
        lo, hi = DUTY_UTIL
        ok = util is not None and lo <= util <= hi and (cov or 0) >= 950
        self.add(name, "util is the interval mean", ok,
                 f"mean util {_pct(util)}, coverage {_pct(cov)} (want {lo / 10:g}-{hi / 10:g} %, coverage >= 95 %)")

    def _two_users(self, name: str, what: str) -> bool:
        if not self.t.get("two_users", False):
            self.add(name, what, None, "needs two users: run as root (throwaway users)")
            return False
        return True

    def check_holder_idle_held(self, name: str, rec: dict, users: dict, rows: list, observed_ms: int) -> None:
        if not self._two_users(name, "holder idle-held"):
            return
        holder = users.get(rec["users"]["b"])
        got = 0 if holder is None else holder["idle_held_ms"]
        error = abs(got - observed_ms) / observed_ms if observed_ms else 1.0
        self.add(name, "holder idle-held", error <= HOLDER_TOLERANCE,
                 f"{rec['users']['b']} idle-held {got / 1000:.0f} s of {observed_ms / 1000:.0f} s held (error {error:.1%})")

    def check_busy_user_not_held(self, name: str, rec: dict, users: dict, rows: list, observed_ms: int) -> None:
        if not self._two_users(name, "busy user not idle-held"):
            return
        busy = users.get(rec["users"]["a"])
        got = None if busy is None else busy["idle_held_ms"]
        self.add(name, "busy user not idle-held", got is not None and got <= HOLDER_TOLERANCE * observed_ms,
                 f"{rec['users']['a']} idle-held {'?' if got is None else f'{got / 1000:.0f}'} s")

    def check_jobs_not_held(self, name: str, rec: dict, users: dict, rows: list, observed_ms: int) -> None:
        user = users.get(rec["users"]["a"])
        got = None if user is None else user["idle_held_ms"]
        self.add(name, "back-to-back user not idle-held", got == 0,
                 f"{rec['users']['a']} ({rec.get('jobs', '?')} jobs) idle-held "
                 f"{'not in the report' if got is None else f'{got / 1000:.1f} s'}")

    def check_spin_gpm(self, name: str, rec: dict, users: dict, rows: list, observed_ms: int) -> None:
        util = _mean([r["util"] for r in rows])
        self.add(name, "spin util ~100 %", util is not None and util >= SPIN_UTIL_MIN, f"mean util {_pct(util)}")
        stored = [r["sm"] for r in rows if r["sm"] is not None]
        if stored:
            sm = statistics.mean(stored)
            self.add(name, "spin SM activity (stored)", sm < SPIN_SM_MAX,
                     f"GPM SM activity {sm / 10:.2f} % over {len(stored)} ticks (util {_pct(util)})")
        elif self.sm_column:
            self.add(name, "spin SM activity (stored)", False, "the database has the column but no value: GPM not recorded")
        else:
            self.add(name, "spin SM activity (stored)", None, "this database has no sm_active_permille column yet")
        side = rec.get("gpm_side") or []
        if side:
            sm = statistics.mean(side)
            self.add(name, "spin SM activity (Gpm.read)", sm < SPIN_SM_MAX,
                     f"{sm / 10:.2f} % over {len(side)} one-second reads of this repo's Gpm")
        elif not stored:
            self.add(name, "spin SM activity (Gpm.read)", None,
                     "no GPM reads (GPU without GPM, or a simulated run)" if not self.t.get("gpm_supported") else
                     "GPM said supported but no read gave a value: " + "; ".join(self.t.get("gpm_side_errors", [])))

    def run_wide(self) -> None:
        costs = self.t.get("gpm_side_costs") or {}
        if costs:
            self.add("run", "GPM cost per read", costs["cpu_us_median"] < GPM_CPU_MAX_US,
                     f"CPU median {costs['cpu_us_median']:.0f} us (max {costs['cpu_us_max']:.0f}), wall median "
                     f"{costs['wall_us_median']:.0f} us (max {costs['wall_us_max']:.0f}) over {costs['reads']} reads")
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as conn:
            events = conn.execute("SELECT kind, count(*), max(detail) FROM event WHERE kind IN "
                                  "('nvml_error', 'gpu_lost', 'init_failed', 'db_error') GROUP BY kind").fetchall()
        gpm_refused = [d for k, _, d in events if k == "nvml_error" and d and d.startswith("GPM unavailable")]
        if gpm_refused:
            self.add("run", "collector GPM as " + str(self.t.get("collector_user")), False, gpm_refused[0])
        self.add("run", "no NVML errors", not events,
                 "none" if not events else "; ".join(f"{k} x{n}: {d}" for k, n, d in events))

    def print(self) -> int:
        head = ["phase", "ticks", "expect", "active", "held", "idle", "util%", "SM act%", "state"]
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(len(head))]
        print()
        for row in [head, *self.rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if any(r[7].endswith("*") for r in self.rows):
            print("(* SM activity from this script's own Gpm reads: the database does not store it yet)")
        extra = self.t.get("collector_cpu_ms_per_tick")
        if extra is not None:
            print(f"collector CPU: {extra} ms per tick (all GPUs, whole loop)")
        print()
        for c in self.checks:
            print(f"{c.verdict:<4}  {c.phase:<13} {c.name:<32} {c.detail}")
        failed = [c for c in self.checks if c.verdict == "FAIL"]
        skipped = [c for c in self.checks if c.verdict == "SKIP"]
        print(f"\n{len(self.checks) - len(failed) - len(skipped)} passed, {len(failed)} failed, {len(skipped)} skipped")
        return 1 if failed else 3 if skipped else 0


def _mean(values: list[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def _pct(permille: float | None) -> str:
    return "?" if permille is None else f"{permille / 10:.1f} %"


# ---------------------------------------------------------------- no-GPU self-test of the judging

SIM_START = "2026-03-02T09:00:00+00:00"  # a Monday: the simulated training runs 08:00-17:00 UTC
SIM_T0 = 1_772_442_000_000  # that instant in ms
SIM_UUID = "GPU-5a1e0000-0000-4000-8000-{:012d}"


def selftest_sim(args: argparse.Namespace) -> int:
    """Judge the simulator's 'gpm' scenario with the same code: proves the report and SQL plumbing, no GPU."""
    work = Path(tempfile.mkdtemp(prefix="gua-gpu-selftest-"))
    db = work / "gua.db"
    ticks = 6 * 45  # 45 simulated minutes of 10 s ticks
    made = subprocess.run([args.collector_python, "-m", "gua_collector", "--db", str(db), "--config", os.devnull,
                           "--backend", "simulate:gpm", "--interval", "10s", "--ticks", str(ticks), "--start", SIM_START],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    if made.returncode:
        print(made.stderr, file=sys.stderr)
        return 2
    minute = 60_000

    def rec(name: str, card: int, start_min: int, expect: str, checks: list[str], users: dict[str, str]) -> dict[str, Any]:
        return asdict(PhaseRecord(name, SIM_T0 + start_min * minute, SIM_T0 + (start_min + 5) * minute, expect, checks,
                                  SIM_UUID.format(card), users))

    timeline = {
        "db": str(db), "gpu_uuid": SIM_UUID.format(1), "gpu_name": "simulated", "gpm_supported": False,
        "interval_ms": 10_000, "two_users": True, "collector_user": "simulated",
        "collector_cpu_ms_per_tick": None, "gpm_side_costs": {}, "gpm_side_errors": [],
        "phases": [
            rec("busy", 1, 5, "active", [], {"a": "alice"}),
            rec("shared", 1, 12, "active", ["holder_idle_held", "busy_user_not_held"], {"a": "alice", "b": "bob"}),
            rec("idle-held", 2, 20, "idle_held", [], {"a": "bob"}),
            rec("spin", 0, 30, "active", ["spin_gpm"], {"a": "carol"}),
        ],
    }
    (work / "timeline.json").write_text(json.dumps(timeline, indent=1))
    print(f"simulated run in {work} (scenario gpm; duty-50 and back-to-back have no simulated counterpart)")
    code = Evaluator(timeline, args.collector_python).run()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return code


# ---------------------------------------------------------------- main

def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", type=int, default=0, metavar="INDEX", help="NVML index of the GPU to use (default 0)")
    p.add_argument("--interval", dest="interval_s", type=float, default=10.0, metavar="SECONDS",
                   help="collector tick interval (default 10)")
    p.add_argument("--phase-seconds", type=float, default=45.0, metavar="S", help="length of most phases (default 45)")
    p.add_argument("--shared-seconds", type=float, default=70.0, metavar="S", help="length of the shared phase (default 70)")
    p.add_argument("--gap-seconds", type=float, default=10.0, metavar="S", help="idle time after each phase (default 10)")
    p.add_argument("--job-seconds", type=float, default=8.0, metavar="S",
                   help="busy time of each back-to-back job; the next one is set up meanwhile (default 8)")
    p.add_argument("--hold-gib", type=float, default=8.0, metavar="GIB", help="memory the idle holders keep (default 8)")
    p.add_argument("--torch-python", default=sys.executable, metavar="PATH",
                   help="interpreter with torch for the workloads; the throwaway users must be able to run it "
                   "(default: this one)")
    p.add_argument("--collector-python", default=sys.executable, metavar="PATH",
                   help="interpreter that imports gua_collector and gua_report from this repository (default: this one)")
    p.add_argument("--collector-as-root", action="store_true",
                   help="as root, run the collector as root instead of the unprivileged throwaway user")
    p.add_argument("--force", action="store_true", help="run even if other processes use the GPU (their work spoils the checks)")
    p.add_argument("--keep", action="store_true", help="keep the throwaway users and, for --selftest-sim, the work directory")
    p.add_argument("--workdir", metavar="DIR", help="where to put the database and timeline (default: a new /tmp directory)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and the checks, touch nothing")
    mode.add_argument("--evaluate", metavar="DIR", help="judge an earlier run again from DIR/timeline.json and its database")
    mode.add_argument("--selftest-sim", action="store_true",
                      help="judge the simulator's 'gpm' scenario with the same checks (no GPU needed)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    phases = plan(args)
    if args.dry_run:
        print_plan(phases, args)
        return 0
    if args.evaluate:
        timeline = json.loads((Path(args.evaluate) / "timeline.json").read_text())
        return Evaluator(timeline, args.collector_python).run()
    if args.selftest_sim:
        return selftest_sim(args)
    reason = why_not_here(args)
    if reason:
        print(f"SKIP: {reason}; nothing to check on this host")
        return 0
    facts = gpu_facts(args.gpu)
    if facts.busy_pids and not args.force:
        print(f"GPU {args.gpu} ({facts.name}) runs other processes {list(facts.busy_pids)}: "
              "their work would spoil the checks (use another --gpu, or --force)", file=sys.stderr)
        return 2
    print(f"GPU {args.gpu}: {facts.name} {facts.uuid}; GPM {'yes' if facts.gpm else 'no (GPM checks will be skipped)'}")
    print_plan(phases, args)
    accounts = Accounts(args.keep)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gua-gpu-check-"))
    run: Run | None = None
    try:
        prepare(work, accounts, args)
        run = Run(args, facts, accounts, work)
        run.execute(phases)
        timeline = run.timeline()
        (work / "timeline.json").write_text(json.dumps(timeline, indent=1))
        print(f"\nrun recorded in {work} (judge it again with --evaluate {work})")
        return Evaluator(timeline, args.collector_python).run()
    except SetupError as error:
        print(f"setup error: {error}", file=sys.stderr)
        return 2
    finally:
        if run is not None:
            run.children.stop_all()
        accounts.remove()


def prepare(work: Path, accounts: Accounts, args: argparse.Namespace) -> None:
    """The work directory: world-traversable, the worker script readable, homes and the DB directory owned by their users."""
    accounts.ensure(args.collector_as_root)
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    shutil.copyfile(WORKER, work / "gpu_worker.py")
    (work / "gpu_worker.py").chmod(0o644)
    for role in ("a", "b", "collector"):
        home = work / ("db" if role == "collector" else f"home-{role}")
        home.mkdir(exist_ok=True)
        home.chmod(0o755)
        accounts.chown(home, role)


@contextlib.contextmanager
def _no_sigint_traceback() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted: workers and collector stopped", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    with _no_sigint_traceback():
        sys.exit(main(sys.argv[1:]))
