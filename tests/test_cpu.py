"""Host and per-process CPU beside the GPU: /proc parsing, rates between ticks, the simulated host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gua_collector import schema
from gua_collector.clock import SimClock
from gua_collector.cpu import CpuMeter
from gua_collector.procinfo import ProcReader, parse_host_cpu, parse_stat_usage
from gua_collector.records import GpuInfo, GpuSample, ProcessInfo, ProcSample, ProcUsage
from gua_collector.sampler import Sampler
from gua_collector.simulate import SimBackend
from report_helpers import expand_chunks

HZ = os.sysconf("SC_CLK_TCK")
START = 1_772_438_400_000


def stat_line(pid: int, comm: str, utime: int, stime: int, start: int, rss: int) -> str:
    # Fields 3..24 after "pid (comm) ": state, then 4..13, utime 14, stime 15, ..., starttime 22, vsize 23, rss 24.
    fields = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 6 + [str(start), "0", str(rss)]
    return f"{pid} ({comm}) " + " ".join(fields)


def test_parse_stat_usage_survives_hostile_comm() -> None:
    text = stat_line(7, "a) (b c) 9", utime=150, stime=50, start=1234, rss=2560)
    assert parse_stat_usage(text) == (200, 2560, 1234)


def test_parse_host_cpu_counts_idle_and_iowait_as_not_busy() -> None:
    text = "cpu  100 5 45 800 50 0 0 0 30 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
    assert parse_host_cpu(text) == (150, 1000)
    assert parse_host_cpu("intr 1 2 3\n") is None


def test_reader_usage_refuses_a_reused_pid(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu  10 0 10 80 0 0 0 0 0 0\nbtime 1700000000\n")
    proc = tmp_path / "500"
    proc.mkdir()
    (proc / "stat").write_text(stat_line(500, "python", utime=3 * HZ, stime=HZ, start=10 * HZ, rss=1000))
    reader = ProcReader(str(tmp_path))
    me = ProcessInfo(500, 1_700_000_010_000, 1001, "alice", "python", "", "")
    used = reader.usage(me)
    assert used is not None and used.cpu_ms == 4000 and used.rss_bytes == 1000 * os.sysconf("SC_PAGE_SIZE")
    (proc / "stat").write_text(stat_line(500, "bash", utime=0, stime=0, start=99 * HZ, rss=10))
    assert reader.usage(me) is None, "the pid belongs to another process now"
    assert reader.usage(ProcessInfo(500, 0, None, "unknown", "?", "", "")) is None
    assert reader.host_cpu() == (20 * 1000 // HZ, 100 * 1000 // HZ)


def tree_stat(pid: int, utime: int, stime: int = 0, cutime: int = 0, cstime: int = 0, start: int = 10,
              ppid: int = 1, comm: str = "worker") -> str:
    """A /proc/PID/stat line with its parent, the four CPU fields 14-17 (clock ticks) and a start time."""
    fields = (["S", str(ppid)] + ["0"] * 9 + [str(utime), str(stime), str(cutime), str(cstime)] + ["0"] * 4
              + [str(start * HZ), "0", "100"])
    return f"{pid} ({comm}) " + " ".join(fields)


def fake_tree(root: Path, stats: dict[int, str], threads: dict[int, dict[int, list[int]]]) -> None:
    """/proc with a stat per pid and, per pid, its threads' children files (CONFIG_PROC_CHILDREN)."""
    (root / "stat").write_text("cpu  10 0 10 80 0 0 0 0 0 0\nbtime 1700000000\n")
    for pid, text in stats.items():
        (root / str(pid)).mkdir(exist_ok=True)
        (root / str(pid) / "stat").write_text(text)
    for pid, tasks in threads.items():
        for tid, children in tasks.items():
            task = root / str(pid) / "task" / str(tid)
            task.mkdir(parents=True, exist_ok=True)
            (task / "children").write_text("".join(f"{c} " for c in children))


TRAINER = ProcessInfo(500, 1_700_000_010_000, 1001, "alice", "python", "", "")


def test_a_process_s_cpu_includes_its_workers_but_not_a_child_on_a_gpu(tmp_path: Path) -> None:
    """DataLoader workers (children of any thread, and theirs) count for the GPU process that started them;
    a child that is itself a GPU process (in skip) is measured on its own, with its subtree."""
    stats = {500: tree_stat(500, HZ, cutime=2 * HZ), 600: tree_stat(600, 10 * HZ, HZ, ppid=500),
             601: tree_stat(601, 5 * HZ, ppid=500), 700: tree_stat(700, 3 * HZ, cstime=HZ, ppid=600),
             602: tree_stat(602, 50 * HZ, ppid=500), 800: tree_stat(800, 40 * HZ, ppid=602)}
    fake_tree(tmp_path, stats, {500: {500: [600, 601], 501: [602]}, 600: {600: [700]}, 602: {602: [800]}})
    reader = ProcReader(str(tmp_path))
    used = reader.usage(TRAINER, frozenset({602}))
    # own 1 + reaped 2, workers 600 (11) and 601 (5), 600's child 700 (3 + reaped 1); not 602 nor 800
    assert used is not None and used.cpu_ms == (1 + 2 + 11 + 5 + 4) * 1000
    assert reader.usage(TRAINER).cpu_ms == (23 + 50 + 40) * 1000  # type: ignore[union-attr]
    # Worker 601 exits and is reaped: its time moves to the trainer's cutime, the sum stays.
    (tmp_path / "500" / "stat").write_text(tree_stat(500, HZ, cutime=2 * HZ + 5 * HZ))
    (tmp_path / "500" / "task" / "500" / "children").write_text("600 ")
    assert reader.usage(TRAINER, frozenset({602})).cpu_ms == 23_000  # type: ignore[union-attr]
    # Worker 600 exits and its pid is reused by an unrelated process between the two reads: not counted.
    (tmp_path / "600" / "stat").write_text(tree_stat(600, 900 * HZ, ppid=1))
    assert reader.usage(TRAINER, frozenset({602})).cpu_ms == 8_000  # type: ignore[union-attr]


def test_a_worker_s_chosen_name_and_a_garbled_children_list_change_nothing(tmp_path: Path) -> None:
    """comm is the process's own choice: ') 1 999 999 (' must not shift the fields read after it; a children
    list that is not numbers (never from the kernel) is skipped, not fatal."""
    hostile = ") 1 999 999 999 999 ("
    assert parse_stat_usage(tree_stat(7, 3, 1, 2, 4, ppid=5, comm=hostile))[0] == 10
    fake_tree(tmp_path, {500: tree_stat(500, HZ, comm=hostile), 600: tree_stat(600, 2 * HZ, ppid=500, comm=hostile)},
              {500: {500: [600], 501: []}})
    (tmp_path / "500" / "task" / "501" / "children").write_text("12 x\n")
    assert ProcReader(str(tmp_path)).usage(TRAINER).cpu_ms == 3_000  # type: ignore[union-attr]


def test_without_children_files_a_process_is_measured_alone(tmp_path: Path) -> None:
    fake_tree(tmp_path, {500: tree_stat(500, 4 * HZ, cstime=HZ)}, {})
    assert ProcReader(str(tmp_path)).usage(TRAINER).cpu_ms == 5_000  # type: ignore[union-attr]


def test_a_process_tree_too_large_to_read_in_a_tick_has_its_cpu_unknown(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from gua_collector import procinfo

    monkeypatch.setattr(procinfo, "MAX_TREE_READS", 6)
    kids = list(range(600, 610))
    fake_tree(tmp_path, {500: tree_stat(500, HZ), **{k: tree_stat(k, HZ, ppid=500) for k in kids}},
              {500: {500: kids}})
    used = ProcReader(str(tmp_path)).usage(TRAINER)
    assert used is not None and used.cpu_ms is None and used.rss_bytes is not None
    many_threads = tmp_path / "threads"
    many_threads.mkdir()
    fake_tree(many_threads, {500: tree_stat(500, HZ)}, {500: {tid: [] for tid in range(500, 510)}})
    assert ProcReader(str(many_threads)).usage(TRAINER).cpu_ms is None  # type: ignore[union-attr]
    counters = Counters()
    meter = CpuMeter(counters)  # type: ignore[arg-type]
    counters.usage = lambda process, skip=frozenset(): used  # type: ignore[method-assign]
    for duration in (0, 10_000):
        assert meter.annotate([sample(ProcSample(who(500), 1, 100, 0))], duration)[0].procs[0].cpu_permille is None


def test_a_trainer_waiting_on_its_dataloader_is_waiting_on_cpu_not_abandoned(tmp_path: Path) -> None:
    """The meter over the real /proc reader: the trainer itself sleeps, its four workers load data."""
    kids = [600, 601, 602, 603]
    tree = {500: tree_stat(500, 0), **{k: tree_stat(k, 0, ppid=500) for k in kids}}
    fake_tree(tmp_path, tree, {500: {500: kids}})
    meter = CpuMeter(ProcReader(str(tmp_path)))
    held = ProcSample(TRAINER, schema.KIND_COMPUTE, 20_000, 0)
    meter.annotate([sample(held)], 0)
    for k in kids:  # each worker one core for the 10 s tick
        (tmp_path / str(k) / "stat").write_text(tree_stat(k, 10 * HZ, ppid=500))
    (tmp_path / "500" / "stat").write_text(tree_stat(500, HZ // 10 or 1))
    cpu = meter.annotate([sample(held)], 10_000)[0].procs[0].cpu_permille
    assert cpu is not None and cpu >= 4000 >= schema.ROLLUP_CPU_BUSY_PERMILLE


class Counters:
    """A ProcessLookup whose counters the test moves by hand."""

    def __init__(self) -> None:
        self.cpu: dict[int, int] = {}
        self.host: tuple[int, int] | None = None

    def usage(self, process: ProcessInfo, skip: frozenset[int] = frozenset()) -> ProcUsage | None:
        return ProcUsage(self.cpu[process.pid], 3 * 1024 * 1024) if process.pid in self.cpu else None

    def host_cpu(self) -> tuple[int, int] | None:
        return self.host

    def lookup(self, pid: int) -> None:
        return None

    def retain(self, live: set[tuple[int, int]]) -> None:
        pass

    def hidden(self) -> str:
        return ""


def sample(*procs: ProcSample) -> GpuSample:
    return GpuSample(GpuInfo("GPU-0", 0, "Test", None), procs=procs)


def who(pid: int) -> ProcessInfo:
    return ProcessInfo(pid, 1000 + pid, 1000, "alice", "python", "", "")


def test_meter_turns_counters_into_rates_between_ticks() -> None:
    counters = Counters()
    meter = CpuMeter(counters)  # type: ignore[arg-type]
    busy, idle = ProcSample(who(1), 1, 100, 0), ProcSample(who(2), 1, 100, 0)
    gone = ProcSample(who(3), schema.KIND_COMPUTE | schema.KIND_EXITED, 0, 50)
    counters.cpu = {1: 1_000, 2: 500, 3: 0}
    counters.host = (1_000, 10_000)
    first = meter.annotate([sample(busy, idle)], 0)
    assert [p.cpu_permille for p in first[0].procs] == [None, None], "no interval yet"
    assert first[0].procs[0].rss_mib == 3
    assert meter.host() is None
    counters.cpu = {1: 21_000, 2: 600, 3: 9_999}
    counters.host = (6_000, 20_000)
    second = meter.annotate([sample(busy, idle, gone), sample(busy)], 10_000)
    assert [p.cpu_permille for p in second[0].procs] == [2000, 10, None], "two cores, ~idle, exited: unknown"
    assert second[1].procs[0].cpu_permille == 2000, "a process on two GPUs is measured once"
    assert meter.host() == 500
    counters.cpu = {2: 700}
    third = meter.annotate([sample(busy, idle)], 10_000)
    assert [p.cpu_permille for p in third[0].procs] == [None, 10], "a process /proc lost is unknown, not 0"


def test_simulated_lab_tells_a_preprocessing_notebook_from_an_abandoned_job() -> None:
    clock = SimClock(START + 10 * 3_600_000)  # a Monday 18:00 UTC: alice's job has finished, memory still held
    backend = SimBackend("lab", clock)
    backend.init()
    sampler = Sampler(backend)
    sampler.tick(clock.wall_ms(), 0)
    for _ in range(3):
        clock.sleep(10, None)  # type: ignore[arg-type]
        tick = sampler.tick(clock.wall_ms(), 10_000)
    cpu = {(g.gpu.index, p.process.username): p.cpu_permille for g in tick.gpus for p in g.procs}
    assert cpu[(0, "alice")] == 0, "the finished job does nothing on the CPU either"
    assert cpu[(2, "bob")] == 2500, "bob's notebook preprocesses on 2.5 cores while its GPU idles"
    assert tick.host_cpu_permille is not None and 0 < tick.host_cpu_permille < 1000


def test_rollups_split_idle_held_by_cpu_as_the_raw_rows_say(tmp_path: Path) -> None:
    """Waiting on CPU, CPU unknown and abandoned in hour_account equal a by-hand fold of the raw rows."""
    import io
    import sqlite3
    import threading
    from collections import defaultdict

    from gua_collector.service import Log, Service, Settings
    from gua_collector.store import Store

    class Quiet:
        def send(self, message: str) -> None:
            pass

    clock = SimClock(START + 8 * 3_600_000)  # Monday 16:00: alice's job finishes at 17:00
    store = Store.open(str(tmp_path / "gua.db"), now_ms=clock.wall_ms())
    service = Service(Settings(interval_s=30, retention_ms=7 * 86_400_000, ticks=4 * 120 + 1), store,
                      SimBackend("lab", clock), clock, Quiet(), Log(io.StringIO(), journal=False),
                      threading.Event(), None)
    assert service.run() == 0
    store.close()
    expand_chunks(str(tmp_path / "gua.db"))  # every hour's rows, compacted or not, as rows
    conn = sqlite3.connect(tmp_path / "gua.db")
    per: dict[tuple[int, int, int], list[tuple[int, int, int | None, int | None, int]]] = defaultdict(list)
    hours = {}
    for tick_id, ts, d, gpu, account, kind, mem, sm, cpu in conn.execute(
        "SELECT t.tick_id, t.ts_ms, t.duration_ms, ps.gpu_id, p.account_id, ps.kind, ps.mem_mib, ps.sm_util,"
        " ps.cpu_permille FROM tick t JOIN proc_sample ps USING (tick_id) JOIN process p USING (proc_id)"):
        if kind & schema.KIND_COMPUTE:
            per[(tick_id, gpu, account)].append((kind, mem, sm, cpu, d))
            hours[tick_id] = ts // 3_600_000
    want: dict[tuple[int, int, int], list[int]] = defaultdict(lambda: [0, 0, 0])
    for (tick_id, gpu, account), rows in per.items():
        held = sum(r[1] for r in rows) * 1_048_576 > schema.ROLLUP_HELD_BYTES
        idle = all(r[2] is not None for r in rows) and sum(r[2] for r in rows) * 10 < schema.ROLLUP_ACTIVE_PERMILLE
        if not (held and idle):
            continue
        running = [r for r in rows if not r[0] & schema.KIND_EXITED]
        d = rows[0][4]
        key = (hours[tick_id], gpu, account)
        want[key][0] += d
        if any(r[3] is None for r in running):
            want[key][2] += d
        elif sum(r[3] for r in running) >= schema.ROLLUP_CPU_BUSY_PERMILLE:
            want[key][1] += d
    got = {(h, g, a): [i, b, u] for h, g, a, i, b, u in conn.execute(
        "SELECT hour, gpu_id, account_id, idle_held_ms, idle_cpu_busy_ms, idle_cpu_unknown_ms FROM hour_account"
        " WHERE idle_held_ms > 0")}
    rolled_hours = {h for h, _, _ in got}
    assert got == {k: v for k, v in want.items() if k[0] in rolled_hours and v[0]}
    users = dict(conn.execute("SELECT account_id, username FROM account").fetchall())
    busy = {users[a]: b for (h, g, a), (i, b, u) in got.items() if b}
    abandoned = {users[a] for (h, g, a), (i, b, u) in got.items() if i - b - u > 0}
    assert "bob" in busy and "alice" in abandoned and "alice" not in busy
