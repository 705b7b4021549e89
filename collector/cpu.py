"""Host and per-process CPU beside the GPU: deltas of cumulative /proc counters between ticks.

An idle-held process that is busy on the CPU (loading or preprocessing
data) is waiting, not abandoned; the report needs both numbers to tell
them apart. Counters come from the backend's ProcessLookup, so the
simulator drives the same arithmetic as the real /proc.
"""

from __future__ import annotations

from dataclasses import replace

from . import schema
from .backend import ProcessLookup
from .records import GpuSample, ProcessInfo, ProcUsage

MIB = 1024 * 1024
Key = tuple[int, int]  # (pid, start_ms): a reused pid is another process


class CpuMeter:
    """Remembers the previous tick's counters; each measure() turns them into rates."""

    def __init__(self, lookup: ProcessLookup) -> None:
        self._lookup = lookup
        self._procs: dict[Key, int] = {}  # cpu_ms at the previous tick
        self._host: tuple[int, int] | None = None

    def host(self) -> int | None:
        """All CPUs' busy share since the previous call, 0..1000; None the first time or when unreadable."""
        now = self._lookup.host_cpu()
        previous, self._host = self._host, now
        if now is None or previous is None:
            return None
        busy, total = now[0] - previous[0], now[1] - previous[1]
        if total <= 0 or busy < 0:
            return None
        return min(1000, round(busy * 1000 / total))

    def annotate(self, samples: list[GpuSample], duration_ms: int) -> list[GpuSample]:
        """The samples with each running process's CPU (per mille of one core) and RSS over this tick."""
        usage: dict[Key, ProcUsage | None] = {}
        # A GPU process's child that is a GPU process too is measured on its own, not in its parent's tree.
        on_gpu = frozenset(p.process.pid for s in samples for p in s.procs if not p.kind & schema.KIND_EXITED)
        for sample in samples:
            for proc in sample.procs:
                key = (proc.process.pid, proc.process.start_ms)
                if key not in usage and not proc.kind & schema.KIND_EXITED:
                    usage[key] = self._lookup.usage(proc.process, on_gpu - {proc.process.pid})
        rates = {key: self._rate(key, used, duration_ms) for key, used in usage.items()}
        self._procs = {key: used.cpu_ms for key, used in usage.items() if used is not None and used.cpu_ms is not None}
        return [self._with_rates(sample, rates) for sample in samples]

    def _rate(self, key: Key, used: ProcUsage | None, duration_ms: int) -> tuple[int | None, int | None]:
        if used is None:
            return None, None
        rss = None if used.rss_bytes is None else round(used.rss_bytes / MIB)
        previous = self._procs.get(key)
        if used.cpu_ms is None or previous is None or duration_ms <= 0 or used.cpu_ms < previous:
            return None, rss  # first sight of it: no interval to measure over
        return round((used.cpu_ms - previous) * 1000 / duration_ms), rss

    @staticmethod
    def _with_rates(sample: GpuSample, rates: dict[Key, tuple[int | None, int | None]]) -> GpuSample:
        if not sample.procs:
            return sample
        procs = []
        for proc in sample.procs:
            cpu, rss = rates.get(_key(proc.process), (None, None))
            procs.append(replace(proc, cpu_permille=cpu, rss_mib=rss))
        return replace(sample, procs=tuple(procs))


def _key(process: ProcessInfo) -> Key:
    return process.pid, process.start_ms
