"""An optional Prometheus node_exporter textfile, rewritten atomically after every tick.

For fleets: node_exporter's textfile collector picks the file up, and
Prometheus/Grafana aggregate hosts. The SQLite database stays the record;
this file only mirrors the latest tick plus running totals since the
collector started (counters reset on restart, as Prometheus expects).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence

from . import schema
from .records import GpuSample, ProcSample, Tick
from .states import STATES, gpu_state, holds

MIB = 1024 * 1024


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    """Exact for integers (byte counts), shortest round-trip otherwise; NaN for unknown."""
    if value != value:
        return "NaN"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _gpu_labels(sample: GpuSample) -> dict[str, str]:
    gpu = sample.gpu
    labels = {"gpu": str(gpu.index), "uuid": gpu.uuid, "name": gpu.name}
    if gpu.mig_slot is not None:
        labels["mig"] = str(gpu.mig_slot)
    return labels


class Textfile:
    """Builds the metrics text and keeps the counters between ticks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._state_seconds: dict[tuple[str, str], float] = defaultdict(float)  # (uuid, state)
        self._energy_joules: dict[str, float] = defaultdict(float)

    def render(self, tick: Tick) -> str:
        """The whole file for this tick, in the Prometheus text exposition format."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, rows: Sequence[tuple[dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{_labels(**labels)} {_number(value)}" for labels, value in rows)

        Rows = list[tuple[dict[str, str], float]]
        states: Rows = []
        util: Rows = []
        coverage: Rows = []
        memory: Rows = []
        power: Rows = []
        seconds: Rows = []
        energy: Rows = []
        users_memory: Rows = []
        users_idle: Rows = []
        for sample in tick.gpus:
            labels = _gpu_labels(sample)
            current = gpu_state(sample)
            self._state_seconds[(sample.gpu.uuid, current)] += tick.duration_ms / 1000
            for state in STATES:
                states.append(({**labels, "state": state}, 1.0 if state == current else 0.0))
                seconds.append(({**labels, "state": state}, self._state_seconds[(sample.gpu.uuid, state)]))
            if sample.util_permille is not None:
                util.append((labels, sample.util_permille / 1000))
            if sample.coverage_permille is not None:
                coverage.append((labels, sample.coverage_permille / 1000))
            if sample.mem_used_mib is not None:
                memory.append((labels, float(sample.mem_used_mib * MIB)))
            if sample.power_mw is not None:
                power.append((labels, sample.power_mw / 1000))
            if sample.energy_mj is not None:
                self._energy_joules[sample.gpu.uuid] += sample.energy_mj / 1000
            if sample.gpu.uuid in self._energy_joules:
                energy.append((labels, self._energy_joules[sample.gpu.uuid]))
            by_user: dict[str, list[ProcSample]] = defaultdict(list)
            for proc in sample.procs:
                if proc.kind & schema.KIND_COMPUTE:
                    by_user[proc.process.username].append(proc)
            for user, procs in sorted(by_user.items()):
                user_labels = {**labels, "user": user}
                known = [p.mem_mib for p in procs if p.mem_mib is not None]
                unknown = len(known) < len(procs)
                users_memory.append((user_labels, float("nan") if unknown else float(sum(known) * MIB)))
                own_sm = [p.sm_util for p in procs if p.sm_util is not None]
                idle = holds(procs) and len(own_sm) == len(procs) and sum(own_sm) * 10 < schema.ROLLUP_ACTIVE_PERMILLE
                users_idle.append((user_labels, 1.0 if idle else 0.0))

        family("gua_gpu_state", "gauge",
               "1 for the GPU's state in the last tick (active >= 10 % SM; idle_held: compute memory > 100 MB).", states)
        family("gua_gpu_state_seconds_total", "counter",
               "Seconds spent in each state since the collector started.", seconds)
        family("gua_gpu_utilization_ratio", "gauge", "Mean SM utilization over the last tick.", util)
        family("gua_gpu_utilization_coverage_ratio", "gauge",
               "Share of the last tick covered by the driver's utilization samples.", coverage)
        family("gua_gpu_memory_used_bytes", "gauge", "Device memory in use.", memory)
        family("gua_gpu_power_watts", "gauge", "Board power draw.", power)
        family("gua_gpu_energy_joules_total", "counter", "Energy since the collector started.", energy)
        family("gua_user_gpu_memory_bytes", "gauge",
               "GPU memory held by a user's compute processes (NaN: NVML cannot report it).", users_memory)
        family("gua_user_idle_held", "gauge",
               "1 when the user holds the GPU while their own processes do < 10 % SM.", users_idle)
        family("gua_collector_last_tick_timestamp_seconds", "gauge", "When the last tick ended.",
               [({}, tick.ts_ms / 1000)])
        return "\n".join(out) + "\n"

    def publish(self, tick: Tick) -> None:
        """Render and replace the file atomically (node_exporter never sees half a file).

        The directory may be writable by others (node_exporter's is often
        group-writable), so nothing here may follow a link planted there or
        use a name someone can guess: the text goes into a fresh file with an
        unpredictable name, created exclusively, and rename() puts it in
        place. rename() replaces whatever the final name is, a symlink
        included; it never writes through it.

        No fsync: the file is a mirror rebuilt every tick, and a flush per
        tick would cost more than a stale or empty file after a power loss,
        which the next tick replaces anyway.
        """
        data = self.render(tick).encode("utf-8")
        try:
            _replace(self.path, data)
        except OSError as error:
            if error.errno is None:
                raise
            # Name the file the admin configured, not the random temporary, so
            # one lasting fault reads the same every tick and is logged once.
            raise type(error)(error.errno, error.strerror, self.path) from error


def _replace(path: str, data: bytes) -> None:
    """Write data to a new file beside path and rename it over path; never leave the new file behind."""
    # mkstemp: O_CREAT | O_EXCL | O_NOFOLLOW with a random name, retried on a clash.
    # The dot prefix and .tmp suffix keep node_exporter (it reads *.prom) off it.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".gua-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # node_exporter runs as another user; our umask is 0077
            handle.write(data)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
