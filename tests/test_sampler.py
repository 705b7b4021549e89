"""Sampling: interval averaging, coverage, process merging, identity, per-GPU faults."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gua_collector import schema
from gua_collector.backend import Cursor, DeviceError, RawDevice, RawProcess
from gua_collector.records import GpuSample, ProcessInfo, ProcSample, ProcUsage, Tick
from gua_collector.sampler import ProcUtilAccumulator, Sampler, UtilAccumulator, merge_processes
from gua_collector.states import holds

pytestmark = pytest.mark.timeout(30)
MIB = 1024 * 1024


def test_interval_mean_not_a_snapshot() -> None:
    # A 50 % duty cycle: a snapshot reads 96 or 0, the interval mean is ~48.
    acc = UtilAccumulator()
    acc.add([(i * 200_000, 96 if (i // 5) % 2 == 0 else 0) for i in range(50)])  # 10 s of 200 ms samples
    util, coverage = acc.take(10_000)
    assert util == 480
    assert coverage == 1000
    assert acc.take(10_000) == (None, 0), "accumulator resets after a tick"


def test_coverage_counts_missing_samples() -> None:
    acc = UtilAccumulator()
    acc.add([(i * 200_000, 50) for i in range(20)])  # 4 s of samples in a 10 s tick
    util, coverage = acc.take(10_000)
    assert (util, coverage) == (500, 400)


def test_out_of_range_samples_dropped() -> None:
    acc = UtilAccumulator()
    acc.add([(0, 40), (200_000, 4_000_000), (400_000, 60)])
    assert acc.take(600)[0] == 500


def test_process_util_zero_without_samples() -> None:
    acc = ProcUtilAccumulator()
    acc.add([(10, 1, 80), (10, 2, 60), (11, 1, 300)])  # 300 % is garbage
    assert acc.take() == {10: 70}, "pids without an entry (11's was garbage) had 0 %"


def test_process_util_averages_over_reads_it_is_missing_from() -> None:
    # Busy at 80 % in the first of four reads, then absent (NVML lists only non-zero).
    acc = ProcUtilAccumulator()
    acc.add([(10, 1, 80)])
    for _ in range(3):
        acc.add([])
    assert acc.take() == {10: 20}
    assert acc.take() == {}, "reset after a tick"


def test_process_util_reads_weighted_by_their_span() -> None:
    # A 10-sample read at 80 %, then a 30-sample read with no entry: 80 * 10 / 40.
    acc = ProcUtilAccumulator()
    acc.add([(10, 1, 80)], weight=10)
    acc.add([], weight=30)
    assert acc.take() == {10: 20}


def test_process_cursor_follows_the_device_samples() -> None:
    """A read with no process entries still moves the process cursor, so reads never overlap."""
    backend = FakeBackend({0: device(0, [], [(1_000_000, 50), (2_000_000, 50)], proc_util=[])}, FakeLookup({}))
    sampler = Sampler(backend)
    sampler.poll()
    sampler.poll()
    assert backend.cursors[-1] == Cursor(util_us=2_000_000, process_us=2_000_000)


def test_merge_counts_a_pid_once_and_drops_garbage() -> None:
    total = 80 * 1024 * MIB
    merged = merge_processes(
        [
            RawProcess(100, 2048 * MIB, schema.KIND_COMPUTE),
            RawProcess(100, 2048 * MIB, schema.KIND_GRAPHICS),
            RawProcess(200, None, schema.KIND_COMPUTE),
            RawProcess(300, total * 4, schema.KIND_COMPUTE),  # struct-stride garbage
            RawProcess(0, 10, schema.KIND_COMPUTE),
        ],
        total,
    )
    assert merged == {100: (3, 2048 * MIB), 200: (1, None)}


class FakeLookup:
    def __init__(self, people: dict[int, ProcessInfo]) -> None:
        self.people = people
        self.retained: set[tuple[int, int]] = set()

    def lookup(self, pid: int) -> ProcessInfo | None:
        return self.people.get(pid)

    def retain(self, live: set[tuple[int, int]]) -> None:
        self.retained = live

    def hidden(self) -> str:
        return self.why_hidden

    def usage(self, process: ProcessInfo, skip: frozenset[int] = frozenset()) -> ProcUsage | None:
        return self.cpu_ms.get(process.pid) if self.people.get(process.pid) == process else None

    def host_cpu(self) -> tuple[int, int] | None:
        return self.host

    why_hidden = ""
    cpu_ms: dict[int, ProcUsage] = {}  # replaced per test, never mutated in place
    host: tuple[int, int] | None = None


def person(pid: int, user: str, start: int = 1000) -> ProcessInfo:
    return ProcessInfo(pid, start, 1000 + pid, user, "python", "/user.slice", "")


class FakeBackend:
    """Devices from a script: index -> RawDevice or an exception."""

    name = "fake"

    def __init__(self, devices: dict[int, RawDevice | DeviceError], lookup: FakeLookup) -> None:
        self.devices = devices
        self.lookup = lookup
        self.cursors: list[Cursor] = []

    def init(self) -> None: ...

    def shutdown(self) -> None: ...

    def processes(self) -> FakeLookup:
        return self.lookup

    def device_count(self) -> int:
        return len(self.devices)

    def read_device(self, index: int, cursor: Cursor, *, full: bool) -> RawDevice:
        self.cursors.append(cursor)
        device = self.devices[index]
        if isinstance(device, DeviceError):
            raise device
        return device


def device(index: int, procs: list[RawProcess], util: list[tuple[int, int]] | None, energy: int | None = None,
           proc_util: list[tuple[int, int, int]] | None = None) -> RawDevice:
    return RawDevice(
        uuid=f"GPU-{index}", index=index, name="Test GPU", memory_total=80 * 1024 * MIB, memory_used=1024 * MIB,
        util_samples=util, processes=procs, process_util=[] if proc_util is None else proc_util,
        energy_mj=energy, power_mw=300_000,
    )


def test_one_failing_gpu_does_not_stop_the_others() -> None:
    lookup = FakeLookup({10: person(10, "alice")})
    backend = FakeBackend(
        {
            0: device(0, [RawProcess(10, 8192 * MIB, schema.KIND_COMPUTE)], [(1_000_000, 0)]),
            1: device(1, [], [(1_000_000, 50)]),
        },
        lookup,
    )
    sampler = Sampler(backend)
    first = sampler.tick(1_000, 0)
    assert [g.status for g in first.gpus] == [0, 0]
    backend.devices[1] = DeviceError("GPU is lost", lost=True)
    second = sampler.tick(11_000, 10_000)
    assert [g.status for g in second.gpus] == [schema.STATUS_OK, schema.STATUS_LOST]
    assert second.gpus[0].procs[0].process.username == "alice"
    assert second.gpus[0].procs[0].mem_mib == 8192
    assert [(e.kind, e.gpu_uuid) for e in second.events] == [("gpu_lost", "GPU-1")]
    third = sampler.tick(21_000, 10_000)
    assert third.events == (), "a lost GPU is reported once, not every tick"
    assert third.gpus[1].status == schema.STATUS_LOST
    backend.devices[1] = device(1, [], [(30_000_000, 20)])
    fourth = sampler.tick(31_000, 10_000)
    assert fourth.gpus[1].status == schema.STATUS_OK
    assert [e.kind for e in fourth.events] == ["nvml_recovered"]


def test_never_seen_gpu_error_is_an_event_only() -> None:
    backend = FakeBackend({0: DeviceError("Unknown Error")}, FakeLookup({}))
    tick = Sampler(backend).tick(5_000, 0)
    assert tick.gpus == ()
    assert tick.events[0].kind == "nvml_error" and "GPU index 0" in tick.events[0].detail


def test_cursor_advances_and_samples_are_not_counted_twice() -> None:
    backend = FakeBackend({0: device(0, [], [(1_000_000, 100), (2_000_000, 0)])}, FakeLookup({}))
    sampler = Sampler(backend)
    sampler.poll()
    assert backend.cursors[-1] == Cursor()
    # The next read hands back an overlapping buffer: only the new sample counts.
    backend.devices[0] = device(0, [], [(1_000_000, 100), (2_000_000, 0), (3_000_000, 0)])
    tick = sampler.tick(3_000, 3_000)
    assert backend.cursors[-1].util_us == 2_000_000
    assert tick.gpus[0].util_permille == 333


def test_dead_pid_dropped_and_idle_process_reads_zero() -> None:
    lookup = FakeLookup({10: person(10, "alice"), 11: person(11, "bob")})
    raw = device(
        0,
        [RawProcess(10, 100 * MIB, 1), RawProcess(11, 200 * MIB, 1), RawProcess(99, 300 * MIB, 1)],
        [(1, 90)],
        proc_util=[(10, 1, 90)],
    )
    tick = Sampler(FakeBackend({0: raw}, lookup)).tick(1, 10)
    got = {p.process.username: p.sm_util for p in tick.gpus[0].procs}
    assert got == {"alice": 90, "bob": 0}
    assert lookup.retained == {(10, 1000), (11, 1000)}


def test_pid_reuse_is_a_new_identity() -> None:
    lookup = FakeLookup({10: person(10, "alice", start=1000)})
    backend = FakeBackend({0: device(0, [RawProcess(10, 500 * MIB, 1)], [(1, 0)])}, lookup)
    sampler = Sampler(backend)
    a = sampler.tick(1_000, 0).gpus[0].procs[0].process
    lookup.people[10] = person(10, "bob", start=9000)
    b = sampler.tick(11_000, 10_000).gpus[0].procs[0].process
    assert (a.pid, a.username) == (10, "alice") and (b.pid, b.username) == (10, "bob")
    assert (a.pid, a.start_ms) != (b.pid, b.start_ms)


def test_energy_delta_and_counter_reset() -> None:
    backend = FakeBackend({0: device(0, [], [(1, 0)], energy=5_000)}, FakeLookup({}))
    sampler = Sampler(backend)
    assert sampler.tick(0, 0).gpus[0].energy_mj is None
    backend.devices[0] = device(0, [], [(2, 0)], energy=8_000)
    assert sampler.tick(10, 10).gpus[0].energy_mj == 3_000
    backend.devices[0] = device(0, [], [(3, 0)], energy=100)  # driver reloaded
    assert sampler.tick(20, 10).gpus[0].energy_mj is None


def test_unsupported_utilization_is_unknown_not_zero() -> None:
    lookup = FakeLookup({10: person(10, "alice")})
    raw = device(0, [RawProcess(10, None, 1)], None)
    raw = RawDevice(**{**raw.__dict__, "process_util": None})
    sample = Sampler(FakeBackend({0: raw}, lookup)).tick(10, 10).gpus[0]
    assert sample.util_permille is None and sample.coverage_permille is None
    assert sample.procs[0].mem_mib is None and sample.procs[0].sm_util is None


def test_mig_instances_are_sampled_with_their_parent() -> None:
    lookup = FakeLookup({10: person(10, "alice")})
    child = RawDevice(
        uuid="MIG-1", index=0, name="3g.40gb", memory_total=40 * 1024 * MIB, memory_used=5 * 1024 * MIB,
        util_samples=None, processes=[RawProcess(10, 5 * 1024 * MIB, 1)], process_util=None,
        energy_mj=None, power_mw=None, parent_uuid="GPU-0", mig_slot=0,
    )
    parent = RawDevice(
        uuid="GPU-0", index=0, name="A100", memory_total=80 * 1024 * MIB, memory_used=6 * 1024 * MIB,
        util_samples=None, processes=[], process_util=None, energy_mj=None, power_mw=None,
        mig_enabled=True, mig_devices=[child],
    )
    tick = Sampler(FakeBackend({0: parent}, lookup)).tick(10, 10)
    assert [g.gpu.uuid for g in tick.gpus] == ["GPU-0", "MIG-1"]
    assert tick.gpus[1].gpu.parent_uuid == "GPU-0"
    assert tick.gpus[1].procs[0].mem_mib == 5 * 1024 and tick.gpus[1].util_permille is None


def test_gpm_activity_passes_through_and_is_none_for_a_failed_gpu() -> None:
    raw = RawDevice(**{**device(0, [], [(1, 100)]).__dict__, "sm_active_permille": 8, "tensor_active_permille": 0,
                       "gpm_supported": True})
    backend = FakeBackend({0: raw, 1: device(1, [], [(1, 100)])}, FakeLookup({}))
    sampler = Sampler(backend)
    tick = sampler.tick(10_000, 10_000)
    assert [(g.util_permille, g.sm_active_permille, g.tensor_active_permille) for g in tick.gpus] == [
        (1000, 8, 0), (1000, None, None)], "a starved card: utilization 100 %, SM activity 0.8 %; no GPM: unknown"
    backend.devices[0] = DeviceError("Unknown Error")
    failed = sampler.tick(20_000, 10_000).gpus[0]
    assert failed.status == schema.STATUS_ERROR and failed.sm_active_permille is None


def test_gpm_error_is_one_event_and_the_sample_stands() -> None:
    broken = RawDevice(**{**device(0, [], [(1, 50)]).__dict__, "gpm_supported": True,
                          "gpm_error": "GPM read failed: Unknown Error"})
    backend = FakeBackend({0: broken}, FakeLookup({}))
    sampler = Sampler(backend)
    first = sampler.tick(10_000, 10_000)
    assert first.gpus[0].status == schema.STATUS_OK and first.gpus[0].util_permille == 500
    assert [(e.kind, e.detail, e.gpu_uuid) for e in first.events] == [("nvml_error", "GPM read failed: Unknown Error", "GPU-0")]
    assert sampler.tick(20_000, 10_000).events == (), "the same failure next tick is not a new event"
    backend.devices[0] = device(0, [], [(2, 50)])
    assert sampler.tick(30_000, 10_000).events == ()
    backend.devices[0] = broken
    assert [e.kind for e in sampler.tick(40_000, 10_000).events] == ["nvml_error"], "a new episode is told again"


def test_hidden_proc_is_reported_once() -> None:
    lookup = FakeLookup({})
    lookup.why_hidden = "/proc is mounted hidepid=2"
    sampler = Sampler(FakeBackend({0: device(0, [], [(1, 0)])}, lookup))
    assert [(e.kind, e.detail) for e in sampler.tick(0, 0).events] == [("proc_hidden", "/proc is mounted hidepid=2")]
    assert sampler.tick(10, 10).events == ()


# ---------------------------------------------------------------- job churn

T0_MS = 1_772_438_400_000  # a wall-clock origin; the timeline below is in ms after it
PERIOD_MS = 500  # the driver's sampling period in this script
BUFFER_MS = 14_000  # the driver keeps ~14 s of samples


@dataclass(frozen=True)
class Job:
    """A GPU process alive on [start_s, end_s): warm-up at low SM, then its steady SM."""

    pid: int
    user: str
    start_s: float
    end_s: float
    sm: int = 100
    warmup_s: float = 1.0
    warmup_sm: int = 5
    mem_mib: int = 8 * 1024

    def alive(self, t_ms: int) -> bool:
        return self.start_s * 1000 <= t_ms - T0_MS < self.end_s * 1000

    def sm_at(self, t_ms: int) -> int:
        if not self.alive(t_ms):
            return 0
        return self.warmup_sm if t_ms - T0_MS < (self.start_s + self.warmup_s) * 1000 else self.sm


class Timeline:
    """One GPU and /proc, scripted: NVML's answers at `now` are a function of the jobs.

    Like NVML, per-process utilization has one entry per process with
    non-zero SM since the cursor (its mean over the read's samples), and a
    pid is in /proc only while its job runs.
    """

    name = "timeline"

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.now_ms = T0_MS
        self.retained: set[tuple[int, int]] = set()

    def at(self, t_s: float) -> Timeline:
        self.now_ms = T0_MS + round(t_s * 1000)
        return self

    # ProcessLookup
    def lookup(self, pid: int) -> ProcessInfo | None:
        job = next((j for j in self.jobs if j.pid == pid and j.alive(self.now_ms)), None)
        return None if job is None else person(pid, job.user, start=T0_MS + round(job.start_s * 1000))

    def retain(self, live: set[tuple[int, int]]) -> None:
        self.retained = live

    def hidden(self) -> str:
        return ""

    def usage(self, process: ProcessInfo, skip: frozenset[int] = frozenset()) -> None:
        return None  # CPU is not what these tests are about

    def host_cpu(self) -> None:
        return None

    # Backend
    def init(self) -> None: ...

    def shutdown(self) -> None: ...

    def processes(self) -> Timeline:
        return self

    def device_count(self) -> int:
        return 1

    def read_device(self, index: int, cursor: Cursor, *, full: bool) -> RawDevice:
        first = max(min(cursor.util_us, cursor.process_us) // 1000 + 1, self.now_ms - BUFFER_MS + 1)
        instants = range(first + -first % PERIOD_MS, self.now_ms + 1, PERIOD_MS)
        util = [(t * 1000, min(100, sum(j.sm_at(t) for j in self.jobs))) for t in instants]
        proc_util = []
        for job in self.jobs:
            total = sum(job.sm_at(t) for t in instants)
            if total:
                proc_util.append((job.pid, instants[-1] * 1000, round(total / len(instants))))
        running = [RawProcess(j.pid, j.mem_mib * MIB, schema.KIND_COMPUTE) for j in self.jobs if j.alive(self.now_ms)]
        return device(0, running if full else [], util, proc_util=proc_util)


def idle_held(sample: GpuSample) -> set[str]:
    """Users idle-held on this GPU in this tick, by SCHEMA.md's per-account rule."""
    return {user for user, procs in _by_user(sample).items()
            if holds(procs) and all(p.sm_util is not None for p in procs)
            and sum(p.sm_util or 0 for p in procs) * 10 < schema.ROLLUP_ACTIVE_PERMILLE}


def holders(sample: GpuSample) -> set[str]:
    return {user for user, procs in _by_user(sample).items() if holds(procs)}


def _by_user(sample: GpuSample) -> dict[str, list[ProcSample]]:
    out: dict[str, list[ProcSample]] = {}
    for proc in sample.procs:
        if proc.kind & schema.KIND_COMPUTE:
            out.setdefault(proc.process.username, []).append(proc)
    return out


def run_ticks(timeline: Timeline, ticks_s: list[float], polls_s: tuple[float, ...] = ()) -> list[Tick]:
    """Tick (and poll) the sampler at the given seconds; the first tick has no duration."""
    sampler = Sampler(timeline)
    out = []
    previous = None
    for t in sorted([*ticks_s, *polls_s]):
        timeline.at(t)
        if t in polls_s:
            sampler.poll()
            continue
        duration = 0 if previous is None else round((t - previous) * 1000)
        out.append(sampler.tick(timeline.now_ms, duration))
        previous = t
    return out


@pytest.mark.parametrize("polls", [(), tuple(t + 5.0 for t in range(0, 90, 10))], ids=["ticks-only", "with-polls"])
def test_back_to_back_busy_jobs_are_never_idle_held(polls: tuple[float, ...]) -> None:
    # Four busy 25 s jobs, a new pid each; two hand-overs fall 0.5 s before a
    # tick, when the new job has done only 0.5 s of warm-up at 5 % SM.
    jobs = [Job(100 + k, "dave", -15.5 + 25 * k, 9.5 + 25 * k) for k in range(4)]
    ticks = run_ticks(Timeline(jobs), [float(t) for t in range(0, 100, 10)], polls)
    measured = [t for t in ticks if t.duration_ms > 0]
    assert [t.duration_ms for t in measured] == [10_000] * 9
    held = [t for t in measured if "dave" in holders(t.gpus[0])]
    assert len(held) == 8, "dave holds the card until his last job exits at 84.5 s"
    assert [t.ts_ms for t in measured if "dave" in idle_held(t.gpus[0])] == []
    tick_10 = measured[0].gpus[0]
    exited = [p for p in tick_10.procs if p.kind & schema.KIND_EXITED]
    assert [(p.process.pid, p.kind, p.mem_mib, p.sm_util) for p in exited] == [
        (100, schema.KIND_COMPUTE | schema.KIND_EXITED, 0, 90)  # busy 9 of the 10 s sampled
    ]


def test_a_job_that_exits_and_leaves_nothing_running_holds_nothing() -> None:
    ticks = run_ticks(Timeline([Job(100, "dave", 0, 14.5)]), [0.0, 10.0, 20.0, 30.0])
    last = ticks[2].gpus[0]
    assert [(p.process.username, p.kind, p.mem_mib, p.sm_util) for p in last.procs] == [
        ("dave", schema.KIND_COMPUTE | schema.KIND_EXITED, 0, 40)
    ]
    assert holders(last) == set() and idle_held(last) == set()
    assert ticks[3].gpus[0].procs == (), "an exit is reported in one tick only"


def test_a_genuinely_idle_holder_is_still_idle_held() -> None:
    # erin's notebook holds 8 GB at 0 % while dave's jobs churn busily beside it.
    jobs = [Job(200, "erin", -100, 1000, sm=0, warmup_sm=0)]
    jobs += [Job(100 + k, "dave", -15.5 + 25 * k, 9.5 + 25 * k) for k in range(4)]
    measured = run_ticks(Timeline(jobs), [float(t) for t in range(0, 100, 10)])[1:]
    assert all(idle_held(t.gpus[0]) == {"erin"} for t in measured)


def test_a_job_that_started_late_in_the_tick_counts_over_the_whole_tick() -> None:
    # dave's busy job exits at 9.5 s; his next one warms up at 5 % for the last
    # 0.5 s. Shares are over the whole tick, so the sum is 90 + 0, not 5.
    ticks = run_ticks(Timeline([Job(100, "dave", -20, 9.5), Job(101, "dave", 9.5, 60)]), [0.0, 10.0])
    sm = {p.process.pid: p.sm_util for p in ticks[1].gpus[0].procs}
    assert sm == {101: 0, 100: 90}
    assert "dave" in holders(ticks[1].gpus[0]) and idle_held(ticks[1].gpus[0]) == set()


def test_identity_is_taken_at_a_poll_while_the_process_lives() -> None:
    # Started after one tick, seen only by the poll in between, gone by the next tick.
    timeline = Timeline([Job(300, "frank", 11, 18, warmup_s=0)])
    ticks = run_ticks(timeline, [0.0, 10.0, 20.0], polls_s=(15.0,))
    assert [(p.process.username, p.kind, p.mem_mib, p.sm_util) for p in ticks[2].gpus[0].procs] == [
        ("frank", schema.KIND_COMPUTE | schema.KIND_EXITED, 0, 70)
    ]
    assert ticks[2].events == ()
    assert timeline.retained == set(), "an exited process is not kept in the /proc cache"


def test_a_process_never_identified_is_counted_not_invented() -> None:
    # Lived between two reads: nobody ever saw it in /proc.
    ticks = run_ticks(Timeline([Job(300, "frank", 11, 14, warmup_s=0)]), [0.0, 10.0, 20.0])
    assert ticks[2].gpus[0].procs == ()
    assert [(e.kind, e.gpu_uuid) for e in ticks[2].events] == [("proc_unattributed", "GPU-0")]
    assert "1 process" in ticks[2].events[0].detail
