"""GPM (SM and tensor activity, Hopper and newer) through NvmlBackend against a fake pynvml, and the simulator's GPM."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gua_collector.backend import Cursor, DeviceError
from gua_collector.clock import SimClock
from gua_collector.nvml_backend import GPM_SM_ACTIVE, GPM_TENSOR_ACTIVE, NvmlBackend
from gua_collector.records import Tick
from gua_collector.sampler import Sampler
from gua_collector.simulate import SCENARIOS, SimBackend
from test_nvml_backend import NoLookup, NVMLError, fake_nvml

pytestmark = pytest.mark.timeout(60)

NOT_SUPPORTED, NO_PERMISSION, GPU_IS_LOST, UNKNOWN = 3, 4, 15, 999


@dataclass(eq=False)  # buffers are told apart by identity, as NVML's pointers are
class Counters:
    """What a GPM sample buffer holds: cumulative cycle counters at one instant."""

    elapsed: float = 0.0
    sm_active: float = 0.0
    tensor_active: float = 0.0
    filled: bool = False


@dataclass
class Metric:
    metricId: int = 0
    nvmlReturn: int = 0
    value: float = 0.0


@dataclass
class MetricsGet:
    """Shaped like pynvml's c_nvmlGpmMetricsGet_t (a ctypes Structure)."""

    version: int = 0
    numMetrics: int = 0
    sample1: Counters | None = None
    sample2: Counters | None = None
    metrics: list[Metric] = field(default_factory=lambda: [Metric() for _ in range(8)])


@dataclass
class GpmDevice:
    """One fake Hopper card's GPM counters: each tick() runs a stretch at the given activity."""

    supported: int = 1
    elapsed: float = 0.0
    sm_active: float = 0.0
    tensor_active: float = 0.0

    def run(self, seconds: float, sm: float, tensor: float = 0.0) -> None:
        """Advance the counters: `sm` and `tensor` are fractions of the stretch (0..1)."""
        self.elapsed += seconds
        self.sm_active += seconds * sm
        self.tensor_active += seconds * tensor


class FakeGpm:
    """The GPM half of a fake pynvml: counters per handle, sample buffers tracked to check they are freed."""

    def __init__(self, devices: dict[str, GpmDevice]) -> None:
        self.devices = devices
        self.allocated: list[Counters] = []
        self.freed: list[Counters] = []
        self.fail: dict[str, int] = {}  # function name -> NVML error code to raise on the next call
        self.metric_failures: dict[int, int] = {}  # metric id -> per-metric nvmlReturn
        self.nan = False

    def _maybe_fail(self, name: str) -> None:
        if name in self.fail:
            raise NVMLError(self.fail.pop(name))

    def query(self, handle: str) -> types.SimpleNamespace:
        self._maybe_fail("query")
        return types.SimpleNamespace(version=1, isSupportedDevice=self.devices[handle].supported)

    def alloc(self) -> Counters:
        self._maybe_fail("alloc")
        sample = Counters()
        self.allocated.append(sample)
        return sample

    def free(self, sample: Counters) -> None:
        assert sample in self.allocated and sample not in self.freed, "freed twice or never allocated"
        self.freed.append(sample)

    def sample_get(self, handle: str, sample: Counters) -> Counters:
        self._maybe_fail("sample")
        assert sample in self.allocated and sample not in self.freed
        card = self.devices[handle]
        card.elapsed += 1e-9  # the elapsed-cycles counter always moves, even between back-to-back samples
        sample.elapsed, sample.sm_active, sample.tensor_active = card.elapsed, card.sm_active, card.tensor_active
        sample.filled = True
        return sample

    def metrics_get(self, request: MetricsGet) -> MetricsGet:
        self._maybe_fail("metrics")
        assert request.version == 1 and request.numMetrics == 2
        older, newer = request.sample1, request.sample2
        assert older is not None and newer is not None and older.filled and newer.filled
        span = newer.elapsed - older.elapsed
        assert span > 0, "sample1 must be the older sample"
        for metric in request.metrics[: request.numMetrics]:
            counter = {GPM_SM_ACTIVE: "sm_active", GPM_TENSOR_ACTIVE: "tensor_active"}[metric.metricId]
            metric.nvmlReturn = self.metric_failures.get(metric.metricId, 0)
            delta = getattr(newer, counter) - getattr(older, counter)
            metric.value = math.nan if self.nan else 100.0 * delta / span
        return request

    def functions(self) -> dict[str, object]:
        return dict(
            nvmlGpmQueryDeviceSupport=self.query,
            nvmlGpmSampleAlloc=self.alloc,
            nvmlGpmSampleFree=self.free,
            nvmlGpmSampleGet=self.sample_get,
            nvmlGpmMetricsGet=self.metrics_get,
            c_nvmlGpmMetricsGet_t=MetricsGet,
        )


def gpm_nvml(gpm: FakeGpm, **overrides: object) -> types.SimpleNamespace:
    return fake_nvml(**{**gpm.functions(), **overrides})


def hopper(**overrides: object) -> tuple[types.SimpleNamespace, FakeGpm, GpmDevice]:
    card = GpmDevice()
    gpm = FakeGpm({"h0": card})
    return gpm_nvml(gpm, **overrides), gpm, card


def started(nvml: types.SimpleNamespace) -> NvmlBackend:
    b = NvmlBackend(nvml, NoLookup())  # type: ignore[arg-type]
    b.init()
    return b


def read(b: NvmlBackend):
    return b.read_device(0, Cursor(), full=True)


def test_support_is_probed_once_and_buffers_allocated_once() -> None:
    nvml, gpm, card = hopper()
    b = started(nvml)
    for _ in range(4):
        card.run(10, 0.5)
        read(b)
    assert nvml.calls["nvmlGpmQueryDeviceSupport"] == 1
    assert nvml.calls["nvmlGpmSampleAlloc"] == 2, "two buffers per device, reused every tick"
    assert nvml.calls["nvmlGpmSampleGet"] == 4
    assert nvml.calls["nvmlGpmMetricsGet"] == 3, "no metrics at the first read: one sample is no interval"


def test_values_come_from_the_previous_and_this_sample() -> None:
    nvml, _, card = hopper()
    b = started(nvml)
    first = read(b)
    assert first.gpm_supported and first.gpm_error == ""
    assert (first.sm_active_permille, first.tensor_active_permille) == (None, None), "first tick: no interval yet"
    card.run(10, 0.008)  # a one-block spin kernel: 1 SM of 132 busy
    second = read(b)
    assert (second.sm_active_permille, second.tensor_active_permille) == (8, 0)
    card.run(4, 0.9, 0.5)
    card.run(6, 0.0)  # idle for the rest of the tick: the metric covers the whole stretch
    third = read(b)
    assert (third.sm_active_permille, third.tensor_active_permille) == (360, 200)


def test_poll_reads_leave_gpm_alone() -> None:
    nvml, _, _ = hopper()
    b = started(nvml)
    raw = b.read_device(0, Cursor(), full=False)
    assert raw.sm_active_permille is None and not raw.gpm_supported
    assert nvml.calls.get("nvmlGpmSampleGet", 0) == 0 and nvml.calls.get("nvmlGpmQueryDeviceSupport", 0) == 0


@pytest.mark.parametrize("variant", ["pre-hopper", "not supported", "function not found", "version mismatch", "old pynvml"])
def test_unsupported_is_none_without_errors(variant: str) -> None:
    card = GpmDevice(supported=0 if variant == "pre-hopper" else 1)
    gpm = FakeGpm({"h0": card})
    code = {"not supported": NOT_SUPPORTED, "function not found": 13, "version mismatch": 25}.get(variant)

    def query(handle: str) -> types.SimpleNamespace:
        if code is not None:
            raise NVMLError(code)
        return gpm.query(handle)

    # fake_nvml alone is a pynvml from before the GPM API: none of its names.
    nvml = fake_nvml() if variant == "old pynvml" else gpm_nvml(gpm, nvmlGpmQueryDeviceSupport=query)
    b = started(nvml)
    for _ in range(3):
        card.run(10, 0.5)
        raw = read(b)
        assert (raw.sm_active_permille, raw.tensor_active_permille, raw.gpm_supported, raw.gpm_error) == (None, None, False, "")
        assert raw.util_samples and raw.processes, "the other reads are untouched"
    assert nvml.calls.get("nvmlGpmQueryDeviceSupport", 0) <= 1, "asked once at most"
    assert gpm.allocated == [] and nvml.calls.get("nvmlGpmSampleGet", 0) == 0


def test_sample_failure_mid_run_gives_none_then_a_fresh_interval() -> None:
    nvml, gpm, card = hopper()
    b = started(nvml)
    read(b)
    card.run(10, 0.5)
    assert read(b).sm_active_permille == 500
    gpm.fail["sample"] = UNKNOWN
    card.run(10, 0.5)
    failed = read(b)
    assert failed.sm_active_permille is None and failed.gpm_supported
    assert failed.gpm_error.startswith("GPM read failed") and "Unknown Error" in failed.gpm_error
    assert failed.memory_used is not None and failed.util_samples, "the device's other values stand"
    card.run(10, 0.2)
    again = read(b)
    assert again.sm_active_permille is None and again.gpm_error == "", "a new baseline, not an interval spanning the failure"
    card.run(10, 0.2)
    assert read(b).sm_active_permille == 200
    assert nvml.calls["nvmlGpmSampleAlloc"] == 2, "the buffers are reused across the failure"


def test_metrics_failure_keeps_the_new_baseline() -> None:
    nvml, gpm, card = hopper()
    b = started(nvml)
    read(b)
    card.run(10, 0.5)
    gpm.fail["metrics"] = UNKNOWN
    failed = read(b)
    assert failed.sm_active_permille is None and failed.gpm_error.startswith("GPM metrics failed")
    card.run(10, 0.3)
    assert read(b).sm_active_permille == 300, "the sample taken with the failed metrics call is the next baseline"


def test_one_metric_failing_or_nan_is_none_for_that_metric() -> None:
    nvml, gpm, card = hopper()
    b = started(nvml)
    read(b)
    gpm.metric_failures[GPM_TENSOR_ACTIVE] = NOT_SUPPORTED
    card.run(10, 0.25, 0.1)
    raw = read(b)
    assert (raw.sm_active_permille, raw.tensor_active_permille, raw.gpm_error) == (250, None, "")
    gpm.metric_failures.clear()
    gpm.nan = True
    card.run(10, 0.25, 0.1)
    raw = read(b)
    assert (raw.sm_active_permille, raw.tensor_active_permille) == (None, None)


def test_values_are_clamped_to_permille() -> None:
    nvml, _, card = hopper()
    b = started(nvml)
    read(b)
    card.run(10, 1.0004)  # driver rounding a hair over 100 %
    assert read(b).sm_active_permille == 1000


def test_lost_gpu_in_a_gpm_call_is_the_device_lost() -> None:
    nvml, gpm, card = hopper()
    b = started(nvml)
    read(b)
    gpm.fail["sample"] = GPU_IS_LOST
    with pytest.raises(DeviceError) as info:
        read(b)
    assert info.value.lost


def test_refusal_is_told_once_then_not_asked_again() -> None:
    nvml, gpm, card = hopper()
    b = started(nvml)
    read(b)
    gpm.fail["sample"] = NO_PERMISSION
    refused = read(b)
    assert refused.sm_active_permille is None and not refused.gpm_supported
    assert "GPM unavailable" in refused.gpm_error and "NVreg_RestrictProfilingToAdminUsers" in refused.gpm_error
    assert sorted(map(id, gpm.freed)) == sorted(map(id, gpm.allocated)), "its buffers are freed at once"
    calls = nvml.calls["nvmlGpmSampleGet"]
    for _ in range(3):
        raw = read(b)
        assert raw.gpm_error == "" and raw.sm_active_permille is None
    assert nvml.calls["nvmlGpmSampleGet"] == calls


def test_probe_refusal_is_told_once() -> None:
    nvml, gpm, _ = hopper()
    gpm.fail["query"] = NO_PERMISSION
    b = started(nvml)
    assert "GPM unavailable" in read(b).gpm_error
    assert read(b).gpm_error == ""
    assert nvml.calls["nvmlGpmQueryDeviceSupport"] == 1


def test_transient_probe_error_is_asked_again() -> None:
    nvml, gpm, card = hopper()
    gpm.fail["query"] = UNKNOWN
    b = started(nvml)
    assert read(b).gpm_error.startswith("GPM read failed")
    assert read(b).gpm_supported
    card.run(10, 0.1)
    assert read(b).sm_active_permille == 100


def test_failed_allocation_frees_what_it_got() -> None:
    nvml, gpm, _ = hopper()
    first = gpm.alloc
    count = iter(range(10))

    def second_fails() -> Counters:
        if next(count) == 1:
            raise NVMLError(20)  # NVML_ERROR_MEMORY
        return first()

    b = started(gpm_nvml(gpm, nvmlGpmSampleAlloc=second_fails))
    assert read(b).gpm_error.startswith("GPM read failed")
    assert gpm.freed == gpm.allocated[:1]


def test_samples_freed_at_shutdown_and_a_restart_probes_again() -> None:
    nvml, gpm, card = hopper(nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
                             nvmlDeviceGetUUID=lambda h: f"GPU-{h}")
    gpm.devices["h1"] = GpmDevice()
    b = started(nvml)
    for _ in range(2):
        read(b)
        b.read_device(1, Cursor(), full=True)
    assert len(gpm.allocated) == 4 and gpm.freed == []
    order: list[str] = []
    nvml.nvmlShutdown = lambda: order.append("shutdown")
    free = nvml.nvmlGpmSampleFree
    nvml.nvmlGpmSampleFree = lambda s: (order.append("free"), free(s))[1]
    b.shutdown()
    assert sorted(map(id, gpm.freed)) == sorted(map(id, gpm.allocated))
    assert order == ["free"] * 4 + ["shutdown"], "buffers are freed while NVML is still up"
    b.shutdown()  # a second shutdown frees nothing twice
    b.init()
    assert read(b).sm_active_permille is None, "a new NVML session starts a new interval"
    card.run(10, 0.4)
    assert read(b).sm_active_permille == 400
    assert nvml.calls["nvmlGpmQueryDeviceSupport"] == 3


def test_free_failing_at_shutdown_is_not_an_error() -> None:
    def gone(sample: Counters) -> None:
        raise NVMLError(9)  # driver not loaded any more

    nvml, _, _ = hopper(nvmlGpmSampleFree=gone)
    b = started(nvml)
    read(b)
    b.shutdown()


def test_mig_gpu_and_its_instances_have_no_gpm() -> None:
    nvml, gpm, card = hopper(
        nvmlDeviceGetMigMode=lambda h: (1, 1),
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 1,
        nvmlDeviceGetMigDeviceHandleByIndex=lambda h, slot: f"mig{slot}",
        nvmlDeviceGetUUID=lambda h: "MIG-" + h if h.startswith("mig") else "GPU-abc",
    )
    b = started(nvml)
    for _ in range(2):
        card.run(10, 0.5)
        raw = read(b)
        assert raw.mig_enabled and raw.sm_active_permille is None and not raw.gpm_supported
        assert all(m.sm_active_permille is None and not m.gpm_supported for m in raw.mig_devices)
    assert nvml.calls.get("nvmlGpmQueryDeviceSupport", 0) == 0 and gpm.allocated == []


def test_device_error_elsewhere_restarts_the_interval() -> None:
    answers = {"fail": False}
    nvml, _, card = hopper()
    memory = nvml.nvmlDeviceGetMemoryInfo

    def flaky(handle: str, version: object = None) -> object:
        if answers["fail"]:
            raise NVMLError(UNKNOWN)
        return memory(handle, version=version)

    nvml.nvmlDeviceGetMemoryInfo = flaky
    b = started(nvml)
    read(b)
    card.run(10, 0.5)
    answers["fail"] = True
    with pytest.raises(DeviceError):
        read(b)
    answers["fail"] = False
    card.run(10, 0.9)
    assert read(b).sm_active_permille is None, "the interval would span the failed read"
    card.run(10, 0.9)
    assert read(b).sm_active_permille == 900


# Through the sampler: GpuSample fields and events.

def sampler_with(nvml: types.SimpleNamespace) -> Sampler:
    return Sampler(started(nvml))


def test_sampler_carries_gpm_into_gpu_sample() -> None:
    nvml, _, card = hopper()
    sampler = sampler_with(nvml)
    first = sampler.tick(0, 0).gpus[0]
    assert (first.sm_active_permille, first.tensor_active_permille) == (None, None)
    assert first.util_permille == 400, "GPM sits beside utilization, it replaces nothing"
    card.run(10, 0.008, 0.0)
    second = sampler.tick(10_000, 10_000).gpus[0]
    assert (second.sm_active_permille, second.tensor_active_permille) == (8, 0)


def test_sampler_reports_a_gpm_failure_once_per_episode() -> None:
    nvml, gpm, card = hopper()
    sampler = sampler_with(nvml)
    sampler.tick(0, 0)
    kinds = []
    for step in range(6):
        if step in (1, 2, 4):
            gpm.fail["sample"] = UNKNOWN
        card.run(10, 0.5)
        tick = sampler.tick((step + 1) * 10_000, 10_000)
        assert tick.gpus[0].status == 0, "a GPM failure is not the GPU's failure"
        kinds.append([(e.kind, e.gpu_uuid) for e in tick.events])
    assert kinds == [[], [("nvml_error", "GPU-abc")], [], [], [("nvml_error", "GPU-abc")], []]


# The overhead GPM adds to a full read, Python side (the fake's calls cost next to nothing).

# The simulator.

MONDAY_10H = 1_772_445_600_000  # 2026-03-02 10:00 UTC: alice's weekday training runs


def sim_ticks(scenario: str, ticks: int, start_ms: int = MONDAY_10H) -> list[Tick]:
    """Ticks 10 s apart, as the collector loop takes them, with the simulated clock."""
    clock = SimClock(start_ms)
    backend = SimBackend(scenario, clock)
    backend.init()
    sampler = Sampler(backend)
    out = []
    for i in range(ticks):
        out.append(sampler.tick(clock.wall_ms(), 0 if i == 0 else 10_000))
        clock.sleep(10, threading.Event())
    return out


def test_simulated_spin_kernel_reads_full_utilization_but_almost_no_sm_activity() -> None:
    ticks = sim_ticks("gpm", 12)
    assert all(g.sm_active_permille is None for g in ticks[0].gpus), "first tick: no interval yet"
    for tick in ticks[1:]:
        spin, training, notebook, display = tick.gpus
        assert spin.util_permille == 1000 and 7 <= (spin.sm_active_permille or 0) <= 9
        assert spin.tensor_active_permille == 0
        assert spin.procs[0].process.username == "carol" and spin.procs[0].sm_util == 100
        assert training.util_permille and training.sm_active_permille is not None
        assert abs(training.sm_active_permille - 9 * training.util_permille / 10) <= 20
        assert training.tensor_active_permille and training.tensor_active_permille < training.sm_active_permille
        for no_gpm in (notebook, display):
            assert (no_gpm.sm_active_permille, no_gpm.tensor_active_permille) == (None, None), "unknown, never 0"


@pytest.mark.parametrize("scenario", sorted(set(SCENARIOS) - {"gpm", "hang", "late"}))
def test_older_scenarios_have_no_gpm(scenario: str) -> None:
    for tick in sim_ticks(scenario, 3):
        assert all(g.sm_active_permille is None and g.tensor_active_permille is None for g in tick.gpus)


# tests/gpu/run_gpu_check.py is run by hand on a GPU host. Here (no GPU, as in
# CI) only what needs none: it parses, plans within budget, and its judging
# code reads the simulator's 'gpm' scenario right. Its real run is never started.

GPU_CHECK = Path(__file__).resolve().parent / "gpu" / "run_gpu_check.py"


def _gpu_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], capture_output=True, text=True, timeout=120)


def test_gpu_check_help_and_plan_within_eight_minutes() -> None:
    assert _gpu_check("--help").returncode == 0
    plan = _gpu_check("--dry-run")
    assert plan.returncode == 0, plan.stderr
    rows = plan.stdout.splitlines()[2:]
    phases = [line.split()[0] for line in rows if line[:1].isalpha() and not line.startswith(("estimated", "each"))]
    assert phases == ["busy", "idle-held", "duty-50", "shared", "back-to-back", "spin"]
    minutes = float(re.search(r"estimated GPU time: ([0-9.]+) min", plan.stdout).group(1))  # type: ignore[union-attr]
    assert minutes < 8


def test_gpu_check_judging_against_the_simulator() -> None:
    judged = _gpu_check("--selftest-sim")
    assert judged.returncode in (0, 3), judged.stdout + judged.stderr  # 3: GPM checks skipped (not stored yet)
    assert " 0 failed" in judged.stdout and "holder idle-held" in judged.stdout


def test_gpm_activity_is_stored_null_where_unsupported(tmp_path: Path) -> None:
    """Through the real write path: values where GPM exists, NULL (unknown) elsewhere, never 0."""
    import sqlite3

    from gua_collector.store import Store

    store = Store.open(str(tmp_path / "gua.db"), now_ms=MONDAY_10H)
    store.begin_run(MONDAY_10H, 10_000, "simulate:gpm", "host", "0")
    store.write_ticks(sim_ticks("gpm", 12))
    store.close()
    conn = sqlite3.connect(tmp_path / "gua.db")
    rows = conn.execute(
        "SELECT g.gpu_index, min(s.sm_active_permille), max(s.sm_active_permille), count(s.sm_active_permille),"
        " max(s.util_permille) FROM gpu_sample s JOIN gpu g USING (gpu_id) JOIN tick t USING (tick_id)"
        " WHERE t.duration_ms > 0 GROUP BY g.gpu_index").fetchall()
    by_gpu = {r[0]: r[1:] for r in rows}
    assert by_gpu[0][1] < 50 and by_gpu[0][3] >= 900, "the spin kernel: ~100 % utilization, <5 % SM active"
    assert by_gpu[1][2] == 11, "GPM on card 1 every tick after the first"
    assert by_gpu[2][2] == 0 and by_gpu[3][2] == 0, "no GPM: NULL, not 0"
