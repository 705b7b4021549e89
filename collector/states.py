"""The live state of one GPU in one tick, by SCHEMA.md's rules at the default thresholds.

The report classifies from raw rows with its own thresholds; this is only
for what the collector shows as it goes (STATUS=, the Prometheus textfile).
"""

from __future__ import annotations

from collections.abc import Sequence

from . import schema
from .records import GpuSample, ProcSample

ACTIVE = "active"
IDLE_HELD = "idle_held"
IDLE = "idle"
UNKNOWN = "unknown"
STATES = (ACTIVE, IDLE_HELD, IDLE, UNKNOWN)
MIB = 1024 * 1024


def holds(procs: Sequence[ProcSample]) -> bool:
    """Compute processes holding memory over the threshold, or memory NVML cannot report."""
    compute = [p for p in procs if p.kind & schema.KIND_COMPUTE]
    if any(p.mem_mib is None for p in compute):
        return True
    return sum(p.mem_mib or 0 for p in compute) * MIB > schema.ROLLUP_HELD_BYTES


def gpu_state(sample: GpuSample) -> str:
    """active, idle_held, idle or unknown."""
    if sample.status != schema.STATUS_OK or sample.util_permille is None:
        return UNKNOWN
    if sample.util_permille >= schema.ROLLUP_ACTIVE_PERMILLE:
        return ACTIVE
    return IDLE_HELD if holds(sample.procs) else IDLE
