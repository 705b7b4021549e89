"""Turn raw backend reads into one Tick: interval averages, merged process lists, identities."""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median

from . import schema
from .backend import Backend, BackendInitError, Cursor, DeviceError, RawDevice, RawProcess
from .cpu import CpuMeter
from .records import Event, GpuInfo, GpuSample, ProcessInfo, ProcSample, Tick

MIB = 1024 * 1024
# Until a device shows its own cadence, assume the driver's usual 1/6 s.
DEFAULT_SAMPLE_PERIOD_US = 166_667


@dataclass
class UtilAccumulator:
    """Device SM-utilization samples gathered since the last tick."""

    total: int = 0
    count: int = 0
    period_us: int = DEFAULT_SAMPLE_PERIOD_US

    def add(self, samples: list[tuple[int, int]]) -> None:
        """Add (timestamp_us, percent) samples; learn the sampling period from their spacing."""
        values = [(ts, v) for ts, v in samples if 0 <= v <= 100]
        if len(values) >= 2:
            stamps = sorted(ts for ts, _ in values)
            gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b > a]
            if gaps:
                self.period_us = int(median(gaps))
        self.total += sum(v for _, v in values)
        self.count += len(values)

    def take(self, duration_ms: int) -> tuple[int | None, int | None]:
        """(mean util in permille, coverage in permille) over the interval; then reset."""
        util = round(self.total * 10 / self.count) if self.count else None
        if duration_ms <= 0:
            coverage = None
        else:
            covered_ms = self.count * self.period_us / 1000
            coverage = min(1000, round(covered_ms * 1000 / duration_ms))
        self.total = 0
        self.count = 0
        return util, coverage


@dataclass
class ProcUtilAccumulator:
    """Per-process SM use over the reads since the last tick.

    NVML lists only processes with non-zero SM since the cursor, one entry
    each (some drivers give several): a read without a pid means 0 % for it
    over that read's stretch. Reads are weighted by the stretch they cover,
    so every share is over the whole tick, also for a process that started
    or exited inside it.
    """

    sums: dict[int, float] = field(default_factory=dict)
    weight: float = 0.0

    def add(self, samples: list[tuple[int, int, int]], weight: float = 1.0) -> None:
        """Fold in one read's entries, covering `weight` units of time."""
        per_pid: dict[int, list[int]] = {}
        for pid, _ts, sm in samples:
            if 0 <= sm <= 100:
                per_pid.setdefault(pid, []).append(sm)
        for pid, values in per_pid.items():
            if any(values):  # a zero entry says no more than no entry
                self.sums[pid] = self.sums.get(pid, 0.0) + weight * sum(values) / len(values)
        self.weight += weight

    def take(self) -> dict[int, int]:
        """Mean SM percent over the tick of every pid that did SM work in it; then reset.

        A pid that is not in the result had 0 % all tick.
        """
        out = {pid: round(total / self.weight) if self.weight else 0 for pid, total in self.sums.items()}
        self.sums.clear()
        self.weight = 0.0
        return out


@dataclass(frozen=True)
class Seen:
    """Who a pid on a device was, looked up while it was alive, so its work counts after it exits."""

    who: ProcessInfo
    kind: int = 0  # its running-list bits when last listed; 0: only seen in utilization samples


@dataclass
class DeviceState:
    """What the sampler remembers about one device between polls."""

    info: GpuInfo | None = None
    cursor: Cursor = field(default_factory=Cursor)
    util: UtilAccumulator = field(default_factory=UtilAccumulator)
    proc_util: ProcUtilAccumulator = field(default_factory=ProcUtilAccumulator)
    util_supported: bool = True
    proc_util_supported: bool = True
    energy_mj: int | None = None
    failing: str = ""  # last error text, to log a failure once, not every tick
    gpm_failing: str = ""  # likewise for GPM, whose failure leaves the device's other reads standing
    # pid -> identity for the pids this tick may report: those running at the
    # last tick and those seen doing SM work since. Rebuilt every tick.
    seen: dict[int, Seen] = field(default_factory=dict)

    def absorb(self, raw: RawDevice) -> None:
        """Fold a read's sample buffers in and move the cursors past them."""
        util_us, proc_us = self.cursor.util_us, self.cursor.process_us
        self.util_supported = raw.util_samples is not None
        fresh = 0
        if raw.util_samples:
            new = [(ts, v) for ts, v in raw.util_samples if ts > util_us]
            fresh = len(new)
            self.util.add(new)
            util_us = max(util_us, max(ts for ts, _ in raw.util_samples))
        self.proc_util_supported = raw.process_util is not None
        if raw.process_util is not None:
            # Weight each read by how many device samples it spans: reads differ in length.
            weight = fresh if self.util_supported else 1
            self.proc_util.add([s for s in raw.process_util if s[1] > proc_us], weight)
            stamps = [s[1] for s in raw.process_util]
            # Both cursors are host clock us: start the next read where this one ended.
            proc_us = max([proc_us, util_us, *stamps])
        self.cursor = Cursor(util_us, proc_us)

    def energy_delta(self, counter: int | None) -> int | None:
        """Energy since the previous tick; None at the first read or after a counter reset."""
        previous, self.energy_mj = self.energy_mj, counter
        if counter is None or previous is None or counter < previous:
            return None
        return counter - previous


def merge_processes(procs: list[RawProcess], memory_total: int | None) -> dict[int, tuple[int, int | None]]:
    """pid -> (kind bits, used bytes), one entry per pid across compute and graphics lists.

    Entries whose memory exceeds the card (a driver struct mismatch gives
    garbage) are dropped; a pid in both lists keeps the larger known value.
    """
    merged: dict[int, tuple[int, int | None]] = {}
    for proc in procs:
        if proc.pid <= 0:
            continue
        if proc.used_bytes is not None and memory_total and proc.used_bytes > memory_total:
            continue
        kind, used = merged.get(proc.pid, (0, None))
        if proc.used_bytes is not None:
            used = proc.used_bytes if used is None else max(used, proc.used_bytes)
        merged[proc.pid] = (kind | proc.kind, used)
    return merged


class Sampler:
    """Reads every device through a backend and builds Tick records."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._lookup = backend.processes()
        self._cpu = CpuMeter(self._lookup)
        self._devices: dict[str, DeviceState] = {}  # by "index" or "uuid" key
        self._checked_proc = False

    def poll(self) -> None:
        """Drain the driver's short sample buffers between ticks so coverage stays whole."""
        for index in range(self._device_count()):
            state = self._state(f"#{index}")
            try:
                raw = self._backend.read_device(index, state.cursor, full=False)
            except DeviceError:
                continue  # the tick records it
            state.absorb(raw)
            self._identify(state, raw)
            for mig in raw.mig_devices:
                mig_state = self._state(mig.uuid)
                mig_state.absorb(mig)
                self._identify(mig_state, mig)

    def tick(self, ts_ms: int, duration_ms: int) -> Tick:
        """Read every device fully and return what this interval observed."""
        samples: list[GpuSample] = []
        events: list[Event] = []
        live: set[tuple[int, int]] = set()
        if not self._checked_proc:
            self._checked_proc = True
            hidden = self._lookup.hidden()
            if hidden:
                events.append(Event(ts_ms, "proc_hidden", hidden))
        for index in range(self._device_count()):
            state = self._state(f"#{index}")
            try:
                raw = self._backend.read_device(index, state.cursor, full=True)
            except DeviceError as error:
                failed = self._failed(state, error, ts_ms, events, index)
                if failed is not None:
                    samples.append(failed)
                continue
            if state.failing:
                events.append(Event(ts_ms, "nvml_recovered", state.failing, raw.uuid))
                state.failing = ""
            state.absorb(raw)
            samples.append(self._sample(raw, state, duration_ms, live, events, ts_ms))
            for mig in raw.mig_devices:
                mig_state = self._state(mig.uuid)
                mig_state.absorb(mig)
                samples.append(self._sample(mig, mig_state, duration_ms, live, events, ts_ms))
        samples = self._cpu.annotate(samples, duration_ms)
        host_cpu = self._cpu.host()
        # Exited processes are not kept live: their identities live in DeviceState.seen.
        self._lookup.retain(live)
        return Tick(ts_ms=ts_ms, duration_ms=duration_ms, gpus=tuple(samples), events=tuple(events),
                    host_cpu_permille=host_cpu if duration_ms > 0 else None)

    def _device_count(self) -> int:
        """Device count; when even that fails, NVML as a whole is gone (driver unloaded or upgraded)."""
        try:
            return self._backend.device_count()
        except DeviceError as error:
            raise BackendInitError(f"NVML stopped answering: {error}") from error

    def _state(self, key: str) -> DeviceState:
        return self._devices.setdefault(key, DeviceState())

    def _failed(
        self, state: DeviceState, error: DeviceError, ts_ms: int, events: list[Event], index: int
    ) -> GpuSample | None:
        """Record a device error; the tick goes on with the other devices."""
        kind = "gpu_lost" if error.lost else "nvml_error"
        text = str(error)
        # A lost GPU stays lost: one event when it goes, not one per tick.
        if not (error.lost and state.failing == text):
            uuid = state.info.uuid if state.info else None
            detail = text if state.info else f"GPU index {index}: {text}"
            events.append(Event(ts_ms, kind, detail, uuid))
        state.failing = text
        state.util.take(0)
        state.proc_util.take()
        state.seen.clear()
        state.energy_mj = None
        if state.info is None:
            return None  # never identified: no UUID to file a sample under
        status = schema.STATUS_LOST if error.lost else schema.STATUS_ERROR
        return GpuSample(gpu=state.info, status=status, error=text)

    def _identify(self, state: DeviceState, raw: RawDevice) -> None:
        """Look up, while it may still be alive, each pid a read shows doing SM work that is not known yet.

        A job can exit before the tick that accounts for its work: its owner
        is only known if it was asked now. A pid /proc no longer has stays
        unknown (asked again only if a later read shows it again).
        """
        for pid, _ts, sm in raw.process_util or ():
            if 0 < sm <= 100 and pid not in state.seen:
                who = self._lookup.lookup(pid)
                if who is not None:
                    state.seen[pid] = Seen(who)

    def _running(self, raw: RawDevice, state: DeviceState) -> dict[int, tuple[ProcessInfo, int, int | None]]:
        """pid -> (identity, kind, used bytes) for the live pids in the running lists; remembered in state.seen."""
        running = {}
        for pid, (kind, used) in merge_processes(raw.processes, raw.memory_total).items():
            who = self._lookup.lookup(pid)  # asked every tick: a reused pid is a new process
            if who is not None:  # not a live process: a stale or garbage entry
                running[pid] = (who, kind, used)
                state.seen[pid] = Seen(who, kind)
        return running

    def _exited(self, state: DeviceState, sm: dict[int, int], running: set[int]) -> tuple[list[ProcSample], int]:
        """Rows for pids that did SM work this tick but are no longer listed, and how many had no known owner."""
        rows: list[ProcSample] = []
        unattributed = 0
        for pid, share in sorted(sm.items()):
            if pid in running:
                continue
            seen = state.seen.get(pid)
            if seen is None:
                unattributed += 1  # never identified: no owner is invented
            elif seen.kind == 0 or seen.kind & schema.KIND_COMPUTE:
                # Holds nothing any more (mem 0); its work still counts for its owner.
                rows.append(ProcSample(seen.who, schema.KIND_COMPUTE | schema.KIND_EXITED, 0, share))
            # A graphics-only process's SM never counts for its owner; gone, it does not either.
        return rows, unattributed

    def _sample(
        self,
        raw: RawDevice,
        state: DeviceState,
        duration_ms: int,
        live: set[tuple[int, int]],
        events: list[Event],
        ts_ms: int,
    ) -> GpuSample:
        info = GpuInfo(
            uuid=raw.uuid,
            index=raw.index,
            name=raw.name,
            memory_total=raw.memory_total,
            parent_uuid=raw.parent_uuid,
            mig_slot=raw.mig_slot,
        )
        state.info = info
        util, coverage = state.util.take(duration_ms)
        if not state.util_supported:
            util, coverage = None, None
        running = self._running(raw, state)
        self._identify(state, raw)
        sm = state.proc_util.take()
        procs: list[ProcSample] = []
        for pid, (who, kind, used) in running.items():
            live.add((who.pid, who.start_ms))
            procs.append(
                ProcSample(
                    process=who,
                    kind=kind,
                    mem_mib=None if used is None else round(used / MIB),
                    sm_util=sm.get(pid, 0) if state.proc_util_supported else None,
                )
            )
        if state.proc_util_supported:  # else no share is known, not even a departed one's
            exited, unattributed = self._exited(state, sm, set(running))
            procs.extend(exited)
            if unattributed:
                events.append(Event(ts_ms, "proc_unattributed",
                                    f"{unattributed} process(es) did SM work but left before they could be identified",
                                    info.uuid))
        # What the next tick may need: the pids running now. Reported exits are dropped.
        state.seen = {pid: state.seen[pid] for pid in running}
        self._gpm_event(raw, state, events, ts_ms)
        return GpuSample(
            gpu=info,
            status=schema.STATUS_OK,
            util_permille=util,
            coverage_permille=coverage,
            mem_used_mib=None if raw.memory_used is None else round(raw.memory_used / MIB),
            power_mw=raw.power_mw,
            energy_mj=state.energy_delta(raw.energy_mj),
            procs=tuple(procs),
            sm_active_permille=raw.sm_active_permille,
            tensor_active_permille=raw.tensor_active_permille,
        )

    @staticmethod
    def _gpm_event(raw: RawDevice, state: DeviceState, events: list[Event], ts_ms: int) -> None:
        """One nvml_error event when GPM starts failing on a device (or fails anew), not one per tick."""
        if raw.gpm_error and raw.gpm_error != state.gpm_failing:
            events.append(Event(ts_ms, "nvml_error", raw.gpm_error, raw.uuid))
        state.gpm_failing = raw.gpm_error
