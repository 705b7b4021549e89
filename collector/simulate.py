"""A deterministic simulated NVML: scenarios of users, workloads and faults.

It hands the sampler the same raw shapes as the real backend, so the demo,
the tests and the systemd system test run the collector's real code path.
Every value is a pure function of simulated wall time, except counters
(energy) that integrate it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from . import schema
from .backend import BackendInitError, Cursor, DeviceError, RawDevice, RawProcess
from .clock import Clock
from .procinfo import unit_from_cgroup
from .records import ProcessInfo, ProcUsage

MIB = 1024 * 1024
GIB_MIB = 1024
SAMPLE_PERIOD_MS = 2000  # the real driver samples every ~1/6 s; 2 s keeps fast-forward fast
BUFFER_MS = 14_000  # the driver keeps only ~14 s of samples
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
# 1970-01-01 was a Thursday: shift so that week offset 0 is a Monday 00:00 UTC.
MONDAY_SHIFT_MS = 3 * DAY_MS

# simulate:late: NVML fails to start until this long after the backend was
# made (past systemd's default 90 s start timeout), as at boot before the driver loads.
# 120 s is met by the collector's 123 s retry (1, 2, 4 ... s backoff), keeping the system test short.
LATE_S = 120

SIM_CORES = 32  # the simulated host's CPUs, for host CPU utilisation
USERS = {"alice": 1001, "bob": 1002, "carol": 1003, "root": 0}


@dataclass(frozen=True)
class SimProc:
    """A simulated process on a GPU at one instant."""

    pid: int
    start_ms: int
    user: str
    comm: str
    cgroup: str
    mem_mib: int | None
    sm: int
    kind: int = schema.KIND_COMPUTE
    cpu: int = 0  # host CPU in percent of one core (data loading, preprocessing)


# A GPU's workload: simulated wall time (ms) -> (device util %, processes).
Workload = Callable[[int], tuple[int, tuple[SimProc, ...]]]
# A GPM-capable card's activity: simulated wall time (ms) -> (SM active, tensor active), per mille.
GpmModel = Callable[[int], tuple[int, int]]


@dataclass(frozen=True)
class SimGpu:
    """One simulated card."""

    uuid: str
    name: str
    memory_mib: int
    workload: Workload
    mig: tuple[SimGpu, ...] = ()
    gpm: GpmModel | None = None  # None: no GPM (pre-Hopper), as every card of the older scenarios


def _week_ms(t_ms: int) -> int:
    return (t_ms + MONDAY_SHIFT_MS) % WEEK_MS


_SESSIONS = {user: f"/user.slice/user-{uid}.slice/session-{uid % 97}.scope" for user, uid in USERS.items()}


def _session_cgroup(user: str) -> str:
    return _SESSIONS[user]


def alice_training(offset_h: int = 0, pid_base: int = 20_000) -> Workload:
    """Weekdays: a 9 h training run from 08:00 UTC, then the finished job keeps its memory until 23:00."""

    def workload(t_ms: int) -> tuple[int, tuple[SimProc, ...]]:
        week = _week_ms(t_ms - offset_h * HOUR_MS)
        day, in_day = divmod(week, DAY_MS)
        if day >= 5 or not 8 * HOUR_MS <= in_day < 23 * HOUR_MS:
            return 0, ()
        run_start = t_ms - (in_day - 8 * HOUR_MS)
        pid = pid_base + (run_start // DAY_MS) % 9000
        proc = SimProc(pid, run_start, "alice", "python", _session_cgroup("alice"), 30 * GIB_MIB, 0)
        if in_day < 17 * HOUR_MS:
            util = 88 + (t_ms // 60_000) % 11  # 88..98 %, varying by minute
            return util, (replace(proc, sm=util, cpu=100),)
        return 0, (proc,)  # the finished job sits on its memory doing nothing: abandoned

    return workload


def bob_notebook(mem_gib: int = 8, pid: int = 30_001, bursts: bool = True, cpu: int = 0) -> Workload:
    """A Jupyter kernel that holds memory all week; 10 busy minutes every 2 hours if bursts.

    cpu: the kernel's host CPU while the GPU idles (preprocessing data: waiting on CPU).
    """
    start = 1_760_000_000_000  # started long before any simulated window

    def workload(t_ms: int) -> tuple[int, tuple[SimProc, ...]]:
        busy = bursts and (t_ms % (2 * HOUR_MS)) < 10 * 60_000
        util = 40 if busy else 0
        return util, (SimProc(pid, start, "bob", "python3", _session_cgroup("bob"), mem_gib * GIB_MIB, util,
                              cpu=30 if busy else cpu),)

    return workload


def carol_duty_cycle(job: int = 4242, pid: int = 40_001, extra: Workload | None = None) -> Workload:
    """A Slurm job busy 12 s of every 30 s between 00:00 and 18:00 UTC; extra adds co-tenants."""

    def workload(t_ms: int) -> tuple[int, tuple[SimProc, ...]]:
        procs: tuple[SimProc, ...] = ()
        util = 0
        if t_ms % DAY_MS < 18 * HOUR_MS:
            util = 95 if (t_ms // 1000) % 30 < 12 else 0
            cgroup = f"/system.slice/slurmstepd.scope/job_{job}/step_0/user/task_0"
            start = t_ms - t_ms % DAY_MS
            procs = (SimProc(pid, start, "carol", "train.py", cgroup, 12 * GIB_MIB, util, cpu=180 if util else 90),)
        if extra is not None:
            procs += extra(t_ms)[1]
        return util, procs

    return workload


def display_only(t_ms: int) -> tuple[int, tuple[SimProc, ...]]:
    """An otherwise idle card that runs only Xorg (graphics context)."""
    xorg = SimProc(1_500, 0, "root", "Xorg", "/system.slice/display-manager.service", 45, 0, schema.KIND_GRAPHICS)
    return 0, (xorg,)


def idle(t_ms: int) -> tuple[int, tuple[SimProc, ...]]:
    return 0, ()


def _card(n: int, workload: Workload, name: str = "NVIDIA H100 80GB HBM3", gpm: GpmModel | None = None) -> SimGpu:
    return SimGpu(f"GPU-5a1e0000-0000-4000-8000-{n:012d}", name, 81_559, workload, gpm=gpm)


def spin_kernel(pid: int = 45_001) -> Workload:
    """carol's one-block spin loop: a kernel always resident, so NVML reads 100 %, on one SM of 132."""
    start = 1_760_000_000_000

    def workload(t_ms: int) -> tuple[int, tuple[SimProc, ...]]:
        return 100, (SimProc(pid, start, "carol", "spin", _session_cgroup("carol"), 600, 100, cpu=100),)

    return workload


def spin_gpm(t_ms: int) -> tuple[int, int]:
    """One busy SM of 132: about 0.8 % SM active (as measured on an H100), no tensor work."""
    return 7 + (t_ms // 60_000) % 3, 0  # 0.7..0.9 %


def with_tenant(workload: Workload, tenant: Workload) -> Workload:
    """workload's card with tenant's processes beside it; the card's utilization stays workload's."""

    def both(t_ms: int) -> tuple[int, tuple[SimProc, ...]]:
        util, procs = workload(t_ms)
        return util, procs + tenant(t_ms)[1]

    return both


def gpm_following(workload: Workload) -> GpmModel:
    """GPM of real training work: SMs busy about 90 % of the time a kernel runs, tensor pipes half of it."""

    def model(t_ms: int) -> tuple[int, int]:
        util = workload(t_ms)[0]
        return util * 9, util * 5

    return model


def lab() -> tuple[SimGpu, ...]:
    """Four cards: alice trains, bob's notebook idles on 8 GB, carol's duty cycle hides bob's idle 2 GB, one idle."""
    return (
        _card(0, alice_training()),
        _card(1, bob_notebook()),
        _card(2, carol_duty_cycle(extra=bob_notebook(mem_gib=2, pid=30_002, bursts=False, cpu=250))),
        _card(3, display_only),
    )


def lab8() -> tuple[SimGpu, ...]:
    """Eight cards, for benchmarks: the lab twice over with shifted schedules and more tenants."""
    return lab() + (
        _card(4, alice_training(offset_h=4, pid_base=50_000)),
        _card(5, bob_notebook(mem_gib=16, pid=30_005)),
        _card(6, carol_duty_cycle(job=4343, pid=40_006, extra=alice_training(offset_h=2, pid_base=60_000))),
        _card(7, idle),
    )


def mig() -> tuple[SimGpu, ...]:
    """One MIG-enabled card with two instances, and one ordinary card."""
    parent = SimGpu(
        "GPU-5a1e0000-0000-4000-8000-00000000a100",
        "NVIDIA A100-SXM4-80GB",
        81_920,
        idle,
        mig=(
            SimGpu("MIG-5a1e0000-0000-4000-8000-000000000001", "NVIDIA A100 3g.40gb", 40_192, alice_training()),
            SimGpu("MIG-5a1e0000-0000-4000-8000-000000000002", "NVIDIA A100 3g.40gb", 40_192, bob_notebook(mem_gib=5)),
        ),
    )
    return (parent, _card(1, carol_duty_cycle()))


def gpm() -> tuple[SimGpu, ...]:
    """GPM on two Hopper cards: carol's spin kernel (100 % util, ~0.8 % SM active) and alice's training
    with bob's idle 4 GB beside it; bob's notebook and the display card are on Ampere cards without GPM
    (unknown, never 0)."""
    training = alice_training()
    return (
        _card(0, spin_kernel(), gpm=spin_gpm),
        _card(1, with_tenant(training, bob_notebook(mem_gib=4, pid=30_011, bursts=False)), gpm=gpm_following(training)),
        _card(2, bob_notebook(), name="NVIDIA A100-SXM4-80GB"),
        _card(3, display_only, name="NVIDIA A100-SXM4-80GB"),
    )


# simulate:churn8: back-to-back short Slurm jobs on every card, ~9,600 a day.
CHURN_JOB_MS = 72_000


def slurm_churn(card: int, cards: int = 8) -> Workload:
    """Back-to-back short Slurm jobs, each a new process and job id; every third idles on its memory
    for its second half (the job waits on something before it exits)."""
    users = ("alice", "bob", "carol")

    def workload(t_ms: int) -> tuple[int, tuple[SimProc, ...]]:
        slot, into = divmod(t_ms, CHURN_JOB_MS)
        job = slot * cards + card
        user = users[job % 3]
        idle_half = job % 3 == 0 and into >= CHURN_JOB_MS // 2
        util = 0 if idle_half else 60 + (t_ms // 10_000) % 40
        cgroup = f"/system.slice/slurmstepd.scope/job_{job % 10_000_000}/step_0/user/task_0"
        proc = SimProc(100_000 + job % 4_000_000, slot * CHURN_JOB_MS, user, "train.py", cgroup,
                       4 * GIB_MIB + (job % 7) * 512, util, cpu=5 if idle_half else 120)
        return util, (proc,)

    return workload


def churn8() -> tuple[SimGpu, ...]:
    """Eight cards of job churn; on the first four a notebook of bob's idles beside the jobs
    (1.5 processes per card on average), for the storage benchmark."""
    return tuple(
        _card(n, with_tenant(slurm_churn(n), bob_notebook(mem_gib=2, pid=30_100 + n, bursts=False))
              if n < 4 else slurm_churn(n))
        for n in range(8)
    )


SCENARIOS: dict[str, Callable[[], tuple[SimGpu, ...]]] = {
    "lab": lab,
    "lab8": lab8,
    "mig": mig,
    "faults": lab,
    "hang": lab,
    "late": lab,
    "gpm": gpm,
    "churn8": churn8,
}


class SimLookup:
    """The simulated /proc: knows the processes the scenario currently runs."""

    def __init__(self) -> None:
        self._live: dict[int, ProcessInfo] = {}
        # Cumulative CPU as /proc keeps it: pid -> (cpu_ms so far, rate in %, at ms).
        self._cpu: dict[int, tuple[float, int, int]] = {}
        self._host_ms = 0.0
        self._host_at: int | None = None
        self._host_rate = 0  # percent of one core, all processes together

    def publish(self, procs: tuple[SimProc, ...], now_ms: int) -> None:
        self._advance(now_ms)
        for proc in procs:
            used, _, at = self._cpu.get(proc.pid, (float(proc.cpu) * 10, proc.cpu, now_ms))
            self._cpu[proc.pid] = (used, proc.cpu, at)
            known = self._live.get(proc.pid)
            if known is None or known.start_ms != proc.start_ms:
                self._live[proc.pid] = ProcessInfo(
                    pid=proc.pid,
                    start_ms=proc.start_ms,
                    uid=USERS[proc.user],
                    username=proc.user,
                    comm=proc.comm,
                    cgroup=proc.cgroup,
                    unit=unit_from_cgroup(proc.cgroup),
                )

    def _advance(self, now_ms: int) -> None:
        """Integrate every process's (and the host's) CPU up to now at the rates last published."""
        for pid, (used, rate, at) in self._cpu.items():
            if now_ms > at:
                self._cpu[pid] = (used + rate * (now_ms - at) / 100, rate, now_ms)
        if self._host_at is not None and now_ms > self._host_at:
            self._host_ms += (self._host_rate + 50) * (now_ms - self._host_at) / 100  # + half a core of other work
        if self._host_at is None or now_ms > self._host_at:
            self._host_at = now_ms
            self._host_rate = sum(rate for _, rate, _ in self._cpu.values())

    def lookup(self, pid: int) -> ProcessInfo | None:
        return self._live.get(pid)

    def usage(self, process: ProcessInfo, skip: frozenset[int] = frozenset()) -> ProcUsage | None:
        # The simulator models each process's CPU with its workers' as one rate.
        known = self._live.get(process.pid)
        if known is None or known.start_ms != process.start_ms or process.pid not in self._cpu:
            return None
        return ProcUsage(round(self._cpu[process.pid][0]), 2 * 1024**3)

    def host_cpu(self) -> tuple[int, int] | None:
        if self._host_at is None:
            return None
        return round(self._host_ms), SIM_CORES * self._host_at

    def hidden(self) -> str:
        return ""

    def retain(self, live: set[tuple[int, int]]) -> None:
        for pid, info in list(self._live.items()):
            if (pid, info.start_ms) not in live:
                del self._live[pid]
                self._cpu.pop(pid, None)


class SimBackend:
    """Serves a scenario's GPUs in NVML's shapes, faults included."""

    def __init__(self, scenario: str, clock: Clock, hang_after: int = 3) -> None:
        check_scenario(scenario)
        self.name = f"simulate:{scenario}"
        self._scenario = scenario
        self._gpus = SCENARIOS[scenario]()
        self._clock = clock
        self._lookup = SimLookup()
        self._energy: dict[str, tuple[int, float]] = {}  # uuid -> (last integrated instant, mJ)
        self._recent: dict[str, dict[int, int]] = {}  # uuid -> instant -> util, reused by the energy counter
        self._gpm_at: dict[str, int] = {}  # uuid -> instant of the previous full read (the GPM baseline)
        self._t0_ms = 0
        self._full_reads = 0
        self._hang_after = hang_after
        self._made_s = clock.monotonic()

    def init(self) -> None:
        if self._scenario == "late" and self._clock.monotonic() - self._made_s < LATE_S:
            raise BackendInitError("simulated: NVIDIA driver not loaded yet")
        self._t0_ms = self._clock.wall_ms()

    def shutdown(self) -> None:
        pass

    def processes(self) -> SimLookup:
        return self._lookup

    def versions(self) -> dict[str, str]:
        return {"driver": "simulated", "NVML": "simulated"}

    def device_count(self) -> int:
        return len(self._gpus)

    def read_device(self, index: int, cursor: Cursor, *, full: bool) -> RawDevice:
        now = self._clock.wall_ms()
        if full and index == 0:
            self._full_reads += 1
        gpu = self._gpus[index]
        try:
            self._fault(index, now)
        except DeviceError:
            self._gpm_at.pop(gpu.uuid, None)  # as NVML's: the next GPM interval starts afresh
            raise
        return self._raw(gpu, index, now, cursor, full, None, None)

    def _fault(self, index: int, now: int) -> None:
        if self._scenario == "hang" and index == 0 and self._full_reads > self._hang_after:
            threading.Event().wait()  # a driver call stuck in D state: only the watchdog helps
        if self._scenario != "faults":
            return
        elapsed = now - self._t0_ms
        if index == 1 and elapsed >= 30 * 60_000:
            raise DeviceError("GPU is lost", lost=True)
        if index == 2 and (now // 10_000) % 13 == 0:
            raise DeviceError("Unknown Error")

    def _raw(
        self, gpu: SimGpu, index: int, now: int, cursor: Cursor, full: bool, parent: str | None, slot: int | None
    ) -> RawDevice:
        is_mig_parent = bool(gpu.mig)
        is_mig_child = parent is not None
        sampled = not (is_mig_parent or is_mig_child)
        util_now, procs = gpu.workload(now)
        if self._scenario == "faults" and index == 0:
            # Memory NVML cannot report (as under MIG or WDDM) for alice's job.
            procs = tuple(replace(p, mem_mib=None) for p in procs)
        util, proc_util = self._samples(gpu, now, cursor) if sampled else (None, None)
        if not full:
            return RawDevice(gpu.uuid, index, "", None, None, util, [], proc_util, None, None, is_mig_parent)
        self._lookup.publish(procs, now)
        gpm_supported, sm_active, tensor_active = self._gpm(gpu, now) if sampled else (False, None, None)
        used = sum(p.mem_mib or 0 for p in procs) + (0 if is_mig_child else 420)
        return RawDevice(
            uuid=gpu.uuid,
            index=index,
            name=gpu.name,
            memory_total=gpu.memory_mib * MIB,
            memory_used=used * MIB,
            util_samples=util,
            processes=[
                RawProcess(p.pid, None if p.mem_mib is None else p.mem_mib * MIB, p.kind)
                for p in procs
                if not is_mig_parent
            ],
            process_util=proc_util,
            energy_mj=self._energy_counter(gpu, now) if sampled else None,
            power_mw=(70_000 + 6_300 * util_now) if sampled else None,
            mig_enabled=is_mig_parent,
            mig_devices=[self._raw(m, index, now, Cursor(), True, gpu.uuid, s) for s, m in enumerate(gpu.mig)],
            parent_uuid=parent,
            mig_slot=slot,
            gpm_supported=gpm_supported,
            sm_active_permille=sm_active,
            tensor_active_permille=tensor_active,
        )

    def _gpm(self, gpu: SimGpu, now: int) -> tuple[bool, int | None, int | None]:
        """(supported, SM active, tensor active): the model's mean over the instants since the previous full read."""
        if gpu.gpm is None:
            return False, None, None
        since = self._gpm_at.get(gpu.uuid)
        self._gpm_at[gpu.uuid] = now
        if since is None:
            return True, None, None  # the first sample: no interval yet
        first = since + 1
        first += -first % SAMPLE_PERIOD_MS
        values = [gpu.gpm(t) for t in range(first, now + 1, SAMPLE_PERIOD_MS)] or [gpu.gpm(now)]
        return (True, round(sum(sm for sm, _ in values) / len(values)),
                round(sum(tensor for _, tensor in values) / len(values)))

    def _sample_times(self, now: int, since_us: int) -> range:
        """Sample instants (ms) still in the driver's buffer and newer than since_us."""
        first = max(since_us // 1000 + 1, now - BUFFER_MS + 1)
        first += -first % SAMPLE_PERIOD_MS
        return range(first, now + 1, SAMPLE_PERIOD_MS)

    def _samples(self, gpu: SimGpu, now: int, cursor: Cursor) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
        """Device samples still in the driver's buffer and newer than the cursor, and per-process use.

        Like NVML, the process list has one entry per process with non-zero
        SM since the cursor: its mean over that stretch.
        """
        util: list[tuple[int, int]] = []
        sm_sums: dict[int, int] = {}
        recent = self._recent.setdefault(gpu.uuid, {})
        for t in self._sample_times(now, min(cursor.util_us, cursor.process_us)):
            value, running = gpu.workload(t)
            util.append((t * 1000, value))
            recent[t] = value
            for p in running:
                sm_sums[p.pid] = sm_sums.get(p.pid, 0) + p.sm
        stamp = util[-1][0] if util else now * 1000
        procs = [(pid, stamp, round(total / len(util))) for pid, total in sm_sums.items() if total > 0]
        return util, procs

    def _energy_counter(self, gpu: SimGpu, now: int) -> int:
        """mJ since "driver load": board power integrated over every sample instant since the last read."""
        last_ms, total = self._energy.get(gpu.uuid, (now - now % SAMPLE_PERIOD_MS, 1.0e9))
        seen = self._recent.pop(gpu.uuid, {})
        for t in range(last_ms + SAMPLE_PERIOD_MS, now + 1, SAMPLE_PERIOD_MS):
            util = seen[t] if t in seen else gpu.workload(t)[0]
            total += (70 + 6.3 * util) * SAMPLE_PERIOD_MS  # W * ms = mJ
            last_ms = t
        self._energy[gpu.uuid] = (last_ms, total)
        return int(total)


def check_scenario(name: str) -> None:
    """Raise ValueError for an unknown scenario name."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r} (choose from {', '.join(sorted(SCENARIOS))})")

