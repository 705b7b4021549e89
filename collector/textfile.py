"""An optional Prometheus node_exporter textfile, rewritten atomically after every tick.

For fleets: node_exporter's textfile collector picks the file up, and
Prometheus/Grafana aggregate hosts. The SQLite database stays the record;
this file only mirrors the latest tick plus running totals since the
collector started (counters reset on restart, as Prometheus expects).

Label scheme (gua-collector(8), PROMETHEUS METRICS):
- Identity lives on one `_info` series per device: `gua_gpu_info{gpu, uuid,
  name}`, so other series carry only `gpu` (the NVML index) and are joined
  with `* on(instance, gpu) group_left(name) gua_gpu_info` when wanted.
- MIG instances get their own families (`gua_mig_*{gpu, mig}`): their memory
  is part of the parent's, so a `sum by (gpu)` or a plain `sum` over a
  `gua_gpu_*` family never counts a card twice. Per-user series carry `mig`
  only for processes on an instance; the parent of MIG instances lists no
  processes, so summing them per GPU adds disjoint parts.
- Unknown values (memory NVML cannot report, utilization of a MIG instance)
  are left out, never written as 0 or NaN.
- User names are published only with users=True (textfile_users = on); the
  file is then 0640 instead of 0644, and takes the directory's group when
  the directory is setgid (how node_exporter's user gets to read it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from . import schema
from .records import GpuSample, ProcSample, Tick
from .states import STATES, gpu_state, holds

MIB = 1024 * 1024
MODE_PUBLIC = 0o644  # GPU-level facts only: what nvidia-smi shows every local account anyway
MODE_PRIVATE = 0o640  # names users: the owner and the directory's group only

Labels = dict[str, str]
Rows = list[tuple[Labels, float]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    """Exact for integers (byte counts, timestamps), shortest round-trip otherwise."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class _Family:
    name: str
    kind: str
    help: str


# Every family this module may write, in file order. HELP says what a sample
# means; the thresholds are the report's defaults (SCHEMA.md).
FAMILIES = {
    f.name: f
    for f in (
        _Family("gua_collector_info", "gauge", "Always 1; the collector's version and backend."),
        _Family("gua_collector_start_time_seconds", "gauge", "When this collector run began recording (Unix time)."),
        _Family("gua_collector_interval_seconds", "gauge", "Configured time between ticks."),
        _Family("gua_collector_last_tick_timestamp_seconds", "gauge",
                "When the last tick ended (Unix time); frozen once the collector stops. Alerts check its age."),
        _Family("gua_gpu_info", "gauge", "Always 1; the identity of each physical GPU (NVML index, UUID, name)."),
        _Family("gua_gpu_state", "gauge",
                "1 for the GPU's state in the last tick (active: >= 10 % SM; idle_held: below that while "
                "compute processes hold > 100 MB; idle; unknown: no reading)."),
        _Family("gua_gpu_state_seconds_total", "counter", "Seconds spent in each state since the collector started."),
        _Family("gua_gpu_utilization_ratio", "gauge", "Mean SM utilization over the last tick (0 to 1)."),
        _Family("gua_gpu_utilization_coverage_ratio", "gauge",
                "Share of the last tick covered by the driver's utilization samples."),
        _Family("gua_gpu_memory_used_bytes", "gauge", "Device memory in use."),
        _Family("gua_gpu_memory_total_bytes", "gauge", "Device memory in all."),
        _Family("gua_gpu_power_watts", "gauge", "Board power draw."),
        _Family("gua_gpu_energy_joules_total", "counter", "Energy used since the collector started."),
        _Family("gua_gpu_nvml_errors_total", "counter",
                "Ticks since the collector started in which NVML failed for this GPU (lost, unknown error)."),
        _Family("gua_mig_info", "gauge", "Always 1; the identity of each MIG instance (parent's gpu index, slot)."),
        _Family("gua_mig_memory_used_bytes", "gauge", "Memory in use on a MIG instance (part of its parent's)."),
        _Family("gua_mig_memory_total_bytes", "gauge", "Memory of a MIG instance."),
        _Family("gua_user_gpu_memory_bytes", "gauge",
                "GPU memory held by a user's compute processes (left out when NVML cannot report it)."),
        _Family("gua_user_idle_held", "gauge",
                "1 when the user holds the GPU (> 100 MB or unknown memory) while their own processes do < 10 % SM."),
        _Family("gua_user_held_seconds_total", "counter",
                "Seconds the user's compute processes held the GPU since the collector started."),
        _Family("gua_user_idle_held_seconds_total", "counter",
                "Seconds the user held the GPU while their own processes did < 10 % SM, since the collector started."),
    )
}


class Textfile:
    """Builds the metrics text, keeps the counters between ticks, and writes the file."""

    def __init__(
        self, path: str, *, users: bool = False, interval_s: float | None = None, version: str = "",
        backend: str = "",
    ) -> None:
        self.path = path
        self.users = users
        self.mode = MODE_PRIVATE if users else MODE_PUBLIC
        self._interval_s = interval_s
        self._info = {"version": version, "backend": backend}
        self._start_s: float | None = None
        self._last_tick_s: float | None = None
        self._state_seconds: dict[tuple[str, str], float] = defaultdict(float)  # (uuid, state)
        self._energy_joules: dict[str, float] = defaultdict(float)
        self._errors: dict[str, int] = defaultdict(int)
        # Per (uuid, user): the labels when first seen, and the two counters. Kept
        # for the collector's life: a counter must not vanish while it can still grow.
        self._user_labels: dict[tuple[str, str], Labels] = {}
        self._held_s: dict[tuple[str, str], float] = defaultdict(float)
        self._idle_held_s: dict[tuple[str, str], float] = defaultdict(float)

    # --- rendering -------------------------------------------------------------------------
    def render(self, tick: Tick) -> str:
        """The whole file for this tick, in the Prometheus text exposition format."""
        if self._start_s is None:
            self._start_s = (tick.ts_ms - tick.duration_ms) / 1000
        self._last_tick_s = tick.ts_ms / 1000
        rows: dict[str, Rows] = defaultdict(list)
        seconds = tick.duration_ms / 1000
        users_now: dict[tuple[str, str], tuple[Labels, list[ProcSample]]] = {}
        for sample in tick.gpus:
            if sample.gpu.parent_uuid is None:
                self._gpu_rows(sample, seconds, rows)
            else:
                self._mig_rows(sample, rows)
            if self.users:
                for user, procs in _compute_by_user(sample.procs).items():
                    users_now[(sample.gpu.uuid, user)] = ({**_device_labels(sample), "user": user}, procs)
        if self.users:
            self._user_rows(users_now, seconds, rows)
        return self._text(self._collector_rows() | rows)

    def render_stopped(self) -> str:
        """The file after a clean stop: the collector's own series only, its last tick frozen.

        No GPU or user series are left for Prometheus to keep evaluating, and
        the frozen last-tick time makes every shipped alert's freshness guard
        drop them, while the stopped-collector alert fires.
        """
        return self._text(self._collector_rows())

    def _collector_rows(self) -> dict[str, Rows]:
        rows: dict[str, Rows] = {"gua_collector_info": [(self._info, 1.0)]}
        if self._start_s is not None:
            rows["gua_collector_start_time_seconds"] = [({}, self._start_s)]
        if self._interval_s is not None:
            rows["gua_collector_interval_seconds"] = [({}, self._interval_s)]
        if self._last_tick_s is not None:
            rows["gua_collector_last_tick_timestamp_seconds"] = [({}, self._last_tick_s)]
        return rows

    def _gpu_rows(self, sample: GpuSample, seconds: float, rows: dict[str, Rows]) -> None:
        gpu = sample.gpu
        labels = {"gpu": str(gpu.index)}
        rows["gua_gpu_info"].append(({**labels, "uuid": gpu.uuid, "name": gpu.name}, 1.0))
        current = gpu_state(sample)
        self._state_seconds[(gpu.uuid, current)] += seconds
        for state in STATES:
            rows["gua_gpu_state"].append(({**labels, "state": state}, 1.0 if state == current else 0.0))
            rows["gua_gpu_state_seconds_total"].append(
                ({**labels, "state": state}, self._state_seconds[(gpu.uuid, state)]))
        if sample.status != schema.STATUS_OK:
            self._errors[gpu.uuid] += 1
        rows["gua_gpu_nvml_errors_total"].append((labels, float(self._errors[gpu.uuid])))
        if sample.util_permille is not None:
            rows["gua_gpu_utilization_ratio"].append((labels, sample.util_permille / 1000))
        if sample.coverage_permille is not None:
            rows["gua_gpu_utilization_coverage_ratio"].append((labels, sample.coverage_permille / 1000))
        if sample.mem_used_mib is not None:
            rows["gua_gpu_memory_used_bytes"].append((labels, float(sample.mem_used_mib * MIB)))
        if gpu.memory_total is not None:
            rows["gua_gpu_memory_total_bytes"].append((labels, float(gpu.memory_total)))
        if sample.power_mw is not None:
            rows["gua_gpu_power_watts"].append((labels, sample.power_mw / 1000))
        if sample.energy_mj is not None:
            self._energy_joules[gpu.uuid] += sample.energy_mj / 1000
        if gpu.uuid in self._energy_joules:
            rows["gua_gpu_energy_joules_total"].append((labels, self._energy_joules[gpu.uuid]))

    def _mig_rows(self, sample: GpuSample, rows: dict[str, Rows]) -> None:
        labels = _device_labels(sample)
        rows["gua_mig_info"].append(({**labels, "uuid": sample.gpu.uuid, "name": sample.gpu.name}, 1.0))
        if sample.mem_used_mib is not None:
            rows["gua_mig_memory_used_bytes"].append((labels, float(sample.mem_used_mib * MIB)))
        if sample.gpu.memory_total is not None:
            rows["gua_mig_memory_total_bytes"].append((labels, float(sample.gpu.memory_total)))

    def _user_rows(
        self, now: dict[tuple[str, str], tuple[Labels, list[ProcSample]]], seconds: float, rows: dict[str, Rows]
    ) -> None:
        for key, (labels, procs) in sorted(now.items()):
            self._user_labels.setdefault(key, labels)
            held = holds(procs)
            own_sm = [p.sm_util for p in procs if p.sm_util is not None]
            idle = held and len(own_sm) == len(procs) and sum(own_sm) * 10 < schema.ROLLUP_ACTIVE_PERMILLE
            if held:
                self._held_s[key] += seconds
            if idle:
                self._idle_held_s[key] += seconds
            known = [p.mem_mib for p in procs if p.mem_mib is not None]
            if len(known) == len(procs):  # unknown memory: leave the sample out, never 0 or NaN
                rows["gua_user_gpu_memory_bytes"].append((labels, float(sum(known) * MIB)))
            rows["gua_user_idle_held"].append((labels, 1.0 if idle else 0.0))
        for key, labels in sorted(self._user_labels.items()):
            rows["gua_user_held_seconds_total"].append((labels, self._held_s[key]))
            rows["gua_user_idle_held_seconds_total"].append((labels, self._idle_held_s[key]))

    @staticmethod
    def _text(rows: dict[str, Rows]) -> str:
        out: list[str] = []
        for name, family in FAMILIES.items():
            if not rows.get(name):
                continue  # no HELP/TYPE without samples: promtool and node_exporter accept either
            out.append(f"# HELP {name} {family.help}")
            out.append(f"# TYPE {name} {family.kind}")
            out.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in rows[name])
        return "\n".join(out) + "\n"

    # --- writing ---------------------------------------------------------------------------
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
        self._write(self.render(tick))

    def invalidate(self) -> None:
        """At a clean stop: replace the file with one that says the collector stopped.

        Not an unlink: a link to this file (the package's, in node-exporter's
        directory) would dangle, and node_exporter reports a dangling link as
        a scrape error on every scrape.
        """
        self._write(self.render_stopped())

    def _write(self, text: str) -> None:
        try:
            _replace(self.path, text.encode("utf-8"), self.mode)
        except OSError as error:
            if error.errno is None:
                raise
            # Name the file the admin configured, not the random temporary, so
            # one lasting fault reads the same every tick and is logged once.
            raise type(error)(error.errno, error.strerror, self.path) from error


def _device_labels(sample: GpuSample) -> Labels:
    labels = {"gpu": str(sample.gpu.index)}
    if sample.gpu.mig_slot is not None:
        labels["mig"] = str(sample.gpu.mig_slot)
    return labels


def _compute_by_user(procs: Sequence[ProcSample]) -> dict[str, list[ProcSample]]:
    by_user: dict[str, list[ProcSample]] = defaultdict(list)
    for proc in procs:
        if proc.kind & schema.KIND_COMPUTE:
            by_user[proc.process.username].append(proc)
    return by_user


def _replace(path: str, data: bytes, mode: int = MODE_PUBLIC) -> None:
    """Write data to a new file beside path and rename it over path; never leave the new file behind."""
    # mkstemp: O_CREAT | O_EXCL | O_NOFOLLOW with a random name, retried on a clash.
    # The dot prefix and .tmp suffix keep node_exporter (it reads *.prom) off it.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".gua-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            # On the open file, whatever the umask (the unit's is 0027). The group is
            # the directory's when it is setgid: that is how a 0640 file reaches
            # node_exporter's user without the collector being in its group.
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
