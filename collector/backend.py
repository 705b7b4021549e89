"""What a telemetry backend (real NVML or the simulator) hands the sampler.

Backends return raw, NVML-shaped facts; merging, averaging and /proc
lookups happen once, in the sampler, for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .records import ProcessInfo, ProcUsage


class BackendInitError(Exception):
    """The backend could not start (driver missing, being upgraded...); retry later."""


class DeviceError(Exception):
    """An NVML call failed for one device; the other devices go on."""

    def __init__(self, message: str, *, lost: bool = False) -> None:
        super().__init__(message)
        self.lost = lost


@dataclass(frozen=True)
class RawProcess:
    """One entry of a running-process list."""

    pid: int
    used_bytes: int | None  # None: NVML cannot report it (MIG, WDDM)
    kind: int  # schema.KIND_COMPUTE or KIND_GRAPHICS


@dataclass(frozen=True)
class RawDevice:
    """One device's state at one poll; None marks an unsupported value."""

    uuid: str
    index: int
    name: str
    memory_total: int | None
    memory_used: int | None
    # (timestamp in epoch us, SM util percent) newer than the poll's cursor.
    util_samples: list[tuple[int, int]] | None
    processes: list[RawProcess]
    # (pid, timestamp in epoch us, SM util percent) newer than the cursor.
    process_util: list[tuple[int, int, int]] | None
    energy_mj: int | None  # counter since driver load
    power_mw: int | None
    mig_enabled: bool = False
    mig_devices: list[RawDevice] = field(default_factory=list)
    parent_uuid: str | None = None
    mig_slot: int | None = None
    # GPM (Hopper and newer), over the stretch since the previous full read, in
    # per mille: SM activity is DCGM's SM_ACTIVE (time an SM had a warp
    # resident, averaged over all SMs), tensor activity DCGM's
    # PIPE_TENSOR_ACTIVE. None: unsupported, MIG, or no earlier sample yet.
    sm_active_permille: int | None = None
    tensor_active_permille: int | None = None
    gpm_supported: bool = False  # the device offers GPM (values may still be None this read)
    gpm_error: str = ""  # why GPM gave nothing this read, when a call failed; the other values stand


@dataclass(frozen=True)
class Cursor:
    """The newest sample timestamps already consumed for one device."""

    util_us: int = 0
    process_us: int = 0


class ProcessLookup(Protocol):
    """Who a pid is; None when the pid is not a live process."""

    def lookup(self, pid: int) -> ProcessInfo | None: ...

    def retain(self, live: set[tuple[int, int]]) -> None:
        """Forget cached processes not in live, keyed (pid, start_ms)."""

    def hidden(self) -> str:
        """Why other users' processes may be invisible ('' when they are not)."""

    def usage(self, process: ProcessInfo, skip: frozenset[int] = frozenset()) -> ProcUsage | None:
        """CPU time (with its descendants but those in skip) and RSS of that very process now.

        None when gone, reused or unreadable.
        """

    def host_cpu(self) -> tuple[int, int] | None:
        """(busy ms, total ms) of all CPUs since boot; None when unreadable."""


class Backend(Protocol):
    """The NVML-shaped source of telemetry."""

    name: str

    def init(self) -> None:
        """Start the library; raises BackendInitError."""

    def shutdown(self) -> None:
        """Release the library."""

    def device_count(self) -> int:
        """Number of physical devices."""

    def read_device(self, index: int, cursor: Cursor, *, full: bool) -> RawDevice:
        """Read one device. With full=False only the sample buffers matter.

        Raises DeviceError.
        """

    def processes(self) -> ProcessLookup:
        """The /proc (or simulated) view of the processes this backend reports."""

    def versions(self) -> dict[str, str]:
        """Driver and library versions, for gua-collector --check (after init)."""
