"""Plain records that flow from the sampler to the store."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuInfo:
    """What identifies a GPU or MIG instance."""

    uuid: str
    index: int
    name: str
    memory_total: int | None  # bytes
    parent_uuid: str | None = None  # set for a MIG instance
    mig_slot: int | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """Who a process is, from /proc; (pid, start_ms) is unique across PID reuse."""

    pid: int
    start_ms: int
    uid: int | None
    username: str
    comm: str
    cgroup: str
    unit: str


@dataclass(frozen=True)
class ProcUsage:
    """A process's CPU time and resident memory, read from /proc at one instant."""

    # User + system time since the process started, with its child processes'
    # (DataLoader workers); None when the tree was too large to read in a tick.
    cpu_ms: int | None
    rss_bytes: int | None


@dataclass(frozen=True)
class ProcSample:
    """One process on one GPU during one tick."""

    process: ProcessInfo
    kind: int  # schema.KIND_* bit flags
    mem_mib: int | None
    sm_util: int | None  # percent over the interval
    cpu_permille: int | None = None  # CPU over the interval, 1000 = one core busy; None unknown
    rss_mib: int | None = None  # resident host memory at the tick


@dataclass(frozen=True)
class GpuSample:
    """One GPU during one tick; values are None when unknown."""

    gpu: GpuInfo
    status: int = 0  # schema.STATUS_*
    util_permille: int | None = None
    coverage_permille: int | None = None
    mem_used_mib: int | None = None
    power_mw: int | None = None
    energy_mj: int | None = None
    procs: tuple[ProcSample, ...] = ()
    error: str = ""  # what went wrong when status != OK
    # GPM over the tick, 0..1000; None where the GPU has no GPM (pre-Hopper,
    # MIG), at its first tick, or when the GPM call failed. SM activity low
    # while util_permille is high marks a starved card (a spinning kernel).
    sm_active_permille: int | None = None
    tensor_active_permille: int | None = None


@dataclass(frozen=True)
class Event:
    """Something worth showing in the report's data-quality section."""

    ts_ms: int
    kind: str
    detail: str = ""
    gpu_uuid: str | None = None
    end_ms: int | None = None


@dataclass(frozen=True)
class Tick:
    """Everything one loop iteration observed."""

    ts_ms: int
    duration_ms: int
    gpus: tuple[GpuSample, ...]
    events: tuple[Event, ...] = field(default_factory=tuple)
    host_cpu_permille: int | None = None  # all CPUs busy over the interval, 0..1000; None unknown
