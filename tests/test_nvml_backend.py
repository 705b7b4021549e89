"""The NVML backend against a fake pynvml: fallbacks, NOT_FOUND, lost GPUs, probing once."""

from __future__ import annotations

import sqlite3
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from gua_collector import schema
from gua_collector.backend import BackendInitError, Cursor, DeviceError
from gua_collector.nvml_backend import NvmlBackend
from gua_collector.records import ProcessInfo
from gua_collector.sampler import Sampler
from gua_collector.store import Store

pytestmark = pytest.mark.timeout(30)


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__({3: "Not Supported", 6: "Not Found", 15: "GPU is lost", 999: "Unknown Error"}.get(value, str(value)))
        self.value = value


class FunctionNotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(13)


class NVMLLibraryMismatchError(Exception):
    pass


@dataclass
class Proc:
    pid: int
    usedGpuMemory: int | None


@dataclass
class Sample:
    timeStamp: int
    sampleValue: types.SimpleNamespace


@dataclass
class ProcUtil:
    pid: int
    timeStamp: int
    smUtil: int


def fake_nvml(**overrides: object) -> types.SimpleNamespace:
    """A pynvml stand-in with one healthy H100; overrides replace functions."""
    calls: dict[str, int] = {}

    def counted(name: str, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    def missing_v3(handle):
        raise NVMLLibraryMismatchError("Unversioned function called")

    def samples(handle, kind, since):
        data = [Sample(t, types.SimpleNamespace(uiVal=v)) for t, v in [(1_000_000, 30), (2_000_000, 50)] if t > since]
        if not data:
            raise NVMLError(6)
        return 1, data

    def energy(handle):
        raise NVMLError(3)

    base = dict(
        NVMLError=NVMLError,
        NVMLError_FunctionNotFound=FunctionNotFound,
        NVMLLibraryMismatchError=NVMLLibraryMismatchError,
        NVML_ERROR_NOT_SUPPORTED=3,
        NVML_ERROR_NOT_FOUND=6,
        NVML_ERROR_FUNCTION_NOT_FOUND=13,
        NVML_ERROR_GPU_IS_LOST=15,
        NVML_GPU_UTILIZATION_SAMPLES=1,
        nvmlMemory_v2=0x02000028,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetUUID=lambda h: b"GPU-abc",
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
        nvmlDeviceGetMigMode=lambda h: (_ for _ in ()).throw(NVMLError(3)),
        nvmlDeviceGetMemoryInfo=lambda h, version=None: types.SimpleNamespace(total=80 * 2**30, used=(9 if version else 10) * 2**30),
        nvmlDeviceGetComputeRunningProcesses_v3=missing_v3,
        nvmlDeviceGetComputeRunningProcesses_v2=lambda h: [Proc(10, 8 * 2**30), Proc(11, None)],
        nvmlDeviceGetGraphicsRunningProcesses_v3=lambda h: [Proc(12, 50 * 2**20)],
        nvmlDeviceGetSamples=samples,
        nvmlDeviceGetProcessUtilization=lambda h, since: [ProcUtil(10, 2_000_000, 70)] if since < 2_000_000 else (_ for _ in ()).throw(NVMLError(6)),
        nvmlDeviceGetTotalEnergyConsumption=energy,
        nvmlDeviceGetPowerUsage=lambda h: 310_000,
    )
    base.update(overrides)
    wrapped = {k: counted(k, v) if callable(v) and k.startswith("nvml") else v for k, v in base.items()}
    ns = types.SimpleNamespace(**wrapped)
    ns.calls = calls
    return ns


class NoLookup:
    def lookup(self, pid):
        return None

    def retain(self, live):
        pass

    def hidden(self):
        return ""

    def usage(self, process, skip=frozenset()):
        return None

    def host_cpu(self):
        return None


def backend(nvml: types.SimpleNamespace) -> NvmlBackend:
    b = NvmlBackend(nvml, NoLookup())  # type: ignore[arg-type]
    b.init()
    return b


def test_read_with_fallbacks() -> None:
    nvml = fake_nvml()
    raw = backend(nvml).read_device(0, Cursor(), full=True)
    assert raw.uuid == "GPU-abc"
    assert raw.memory_used == 9 * 2**30, "memory info v2 preferred"
    assert raw.util_samples == [(1_000_000, 30), (2_000_000, 50)]
    assert raw.process_util == [(10, 2_000_000, 70)]
    assert [(p.pid, p.used_bytes, p.kind) for p in raw.processes] == [
        (10, 8 * 2**30, schema.KIND_COMPUTE),
        (11, None, schema.KIND_COMPUTE),
        (12, 50 * 2**20, schema.KIND_GRAPHICS),
    ]
    assert raw.energy_mj is None and raw.power_mw == 310_000
    # A pynvml without the GPM API: SM activity unknown, and no error for it.
    assert (raw.sm_active_permille, raw.gpm_supported, raw.gpm_error) == (None, False, "")


def test_not_found_means_no_new_samples() -> None:
    raw = backend(fake_nvml()).read_device(0, Cursor(util_us=2_000_000, process_us=2_000_000), full=False)
    assert raw.util_samples == [] and raw.process_util == []


def test_unsupported_calls_probed_once_and_v3_miss_remembered() -> None:
    nvml = fake_nvml()
    b = backend(nvml)
    for _ in range(3):
        b.read_device(0, Cursor(), full=True)
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 1
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 3


def test_gpu_lost_and_other_errors() -> None:
    def lost(h):
        raise NVMLError(15)

    with pytest.raises(DeviceError) as info:
        backend(fake_nvml(nvmlDeviceGetUUID=lost)).read_device(0, Cursor(), full=True)
    assert info.value.lost and "lost" in str(info.value)

    def unknown(h, version=None):
        raise NVMLError(999)

    with pytest.raises(DeviceError) as info:
        backend(fake_nvml(nvmlDeviceGetMemoryInfo=unknown)).read_device(0, Cursor(), full=True)
    assert not info.value.lost


def test_init_failure_is_retryable() -> None:
    def driver_gone():
        raise NVMLError(9)

    with pytest.raises(BackendInitError):
        NvmlBackend(fake_nvml(nvmlInit=driver_gone), NoLookup()).init()  # type: ignore[arg-type]

    def no_library():
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    with pytest.raises(BackendInitError, match="not loadable"):
        NvmlBackend(fake_nvml(nvmlInit=no_library), NoLookup()).init()  # type: ignore[arg-type]


def test_mig_instances_listed_and_empty_slots_skipped() -> None:
    def mig_handle(h, slot):
        if slot == 1:
            raise NVMLError(6)
        return f"mig{slot}"

    nvml = fake_nvml(
        nvmlDeviceGetMigMode=lambda h: (1, 1),
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 3,
        nvmlDeviceGetMigDeviceHandleByIndex=mig_handle,
        nvmlDeviceGetUUID=lambda h: "MIG-" + h if h.startswith("mig") else "GPU-abc",
    )
    raw = backend(nvml).read_device(0, Cursor(), full=True)
    assert raw.mig_enabled and raw.util_samples is None and raw.processes == []
    assert [m.uuid for m in raw.mig_devices] == ["MIG-mig0", "MIG-mig2"]
    assert raw.mig_devices[0].parent_uuid == "GPU-abc" and raw.mig_devices[0].util_samples is None
    assert nvml.calls.get("nvmlDeviceGetSamples", 0) == 0, "utilization is not asked of a MIG GPU"


START_MS = 1_772_438_400_000


class People:
    """/proc for the fake card's three processes."""

    def lookup(self, pid: int) -> ProcessInfo | None:
        if pid not in (10, 11, 12):
            return None
        return ProcessInfo(pid, 1_000, 1000 + pid, f"user{pid}", "python", "/user.slice", "")

    def retain(self, live: set[tuple[int, int]]) -> None:
        pass

    def hidden(self) -> str:
        return ""

    def usage(self, process: ProcessInfo, skip: frozenset[int] = frozenset()) -> None:
        return None  # CPU is not what these tests are about

    def host_cpu(self) -> None:
        return None


def stored_sm(tmp_path: Path, nvml: types.SimpleNamespace, *, poll_first: bool) -> dict[int, int | None]:
    """pid -> proc_sample.sm_util as stored for one tick read through NvmlBackend and the Sampler."""
    b = NvmlBackend(nvml, People())  # type: ignore[arg-type]
    b.init()
    sampler = Sampler(b)
    if poll_first:
        sampler.poll()
    tick = sampler.tick(START_MS, 10_000)
    store = Store.open(str(tmp_path / "gua.db"), now_ms=START_MS)
    store.begin_run(START_MS, 10_000, "nvml", "host", "0")
    store.write_ticks([tick])
    store.close()
    with sqlite3.connect(tmp_path / "gua.db") as db:
        rows = db.execute("SELECT p.pid, s.sm_util FROM proc_sample AS s JOIN process AS p USING (proc_id)").fetchall()
    return dict(rows)


def test_unsupported_process_utilization_is_stored_as_unknown(tmp_path: Path) -> None:
    def unsupported(handle, since):
        raise NVMLError(3)

    assert stored_sm(tmp_path, fake_nvml(nvmlDeviceGetProcessUtilization=unsupported), poll_first=True) == {
        10: None, 11: None, 12: None
    }


def test_process_utilization_unsupported_at_the_tick_after_a_poll_read_it(tmp_path: Path) -> None:
    """A poll read that gave per-process SM does not make a NOT_SUPPORTED tick read look known."""
    answers = iter([[ProcUtil(10, 2_000_000, 70)]])

    def supported_once(handle, since):
        for answer in answers:
            return answer
        raise NVMLError(3)

    assert stored_sm(tmp_path, fake_nvml(nvmlDeviceGetProcessUtilization=supported_once), poll_first=True) == {
        10: None, 11: None, 12: None
    }


def test_no_new_process_samples_is_zero_not_unknown(tmp_path: Path) -> None:
    """NOT_FOUND says no process did SM work since the cursor: running pids read 0 %, not NULL."""
    def none_newer(handle, since):
        raise NVMLError(6)

    assert stored_sm(tmp_path, fake_nvml(nvmlDeviceGetProcessUtilization=none_newer), poll_first=True) == {
        10: 0, 11: 0, 12: 0
    }
    (tmp_path / "b").mkdir()
    assert stored_sm(tmp_path / "b", fake_nvml(), poll_first=False) == {10: 70, 11: 0, 12: 0}
