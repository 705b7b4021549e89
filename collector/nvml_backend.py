"""The real backend: NVML through pynvml, with the fallbacks older drivers and MIG need."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from . import schema
from .backend import BackendInitError, Cursor, DeviceError, ProcessLookup, RawDevice, RawProcess
from .procinfo import ProcReader

# NVML_ERROR_FUNCTION_NOT_FOUND; spelled out because old pynvml releases lack the name.
_FUNCTION_NOT_FOUND = 13
_NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED
_NO_PERMISSION = 4  # NVML_ERROR_NO_PERMISSION
_ARGUMENT_VERSION_MISMATCH = 25  # NVML_ERROR_ARGUMENT_VERSION_MISMATCH: this pynvml's struct is not the driver's

# nvmlGpmMetricId_t values (ABI-stable enums). DCGM computes DCGM_FI_PROF_SM_ACTIVE
# (1002, "cycles an SM has at least one warp assigned") from NVML_GPM_METRIC_SM_UTIL
# and DCGM_FI_PROF_PIPE_TENSOR_ACTIVE (1004) from NVML_GPM_METRIC_ANY_TENSOR_UTIL
# (DcgmFieldIdToNvmlGpmMetricId in DCGM's dcgm_fields.cpp). Not SM_OCCUPANCY (3):
# that is warps resident over the maximum, far lower than SM activity for busy work.
GPM_SM_ACTIVE = 2
GPM_TENSOR_ACTIVE = 5
_GPM_VERSION = 1  # NVML_GPM_METRICS_GET_VERSION

# What the capability cache is keyed by: an NVML index, or (index, MIG slot).
Device = int | tuple[int, int]

# The deb ships pynvml privately here (Debian 12 has no python3-pynvml).
VENDOR_DIR = "/usr/lib/gua-collector/vendor"


def load_pynvml() -> ModuleType:
    """Import pynvml from site-packages, else from the package's private copy."""
    try:
        import pynvml
    except ImportError:
        if VENDOR_DIR not in sys.path:
            sys.path.append(VENDOR_DIR)
        try:
            import pynvml
        except ImportError as error:
            raise BackendInitError("pynvml (nvidia-ml-py) is not installed") from error
    return pynvml


class NvmlBackend:
    """Reads devices through NVML. Each capability is probed once per device."""

    name = "nvml"

    def __init__(self, nvml: ModuleType | None = None, lookup: ProcessLookup | None = None) -> None:
        self._nvml = nvml
        self._lookup = lookup
        self._handles: dict[int, Any] = {}
        # (device, capability) -> False once NVML said NOT_SUPPORTED. A device
        # is its index, or (index, slot) for a MIG instance.
        self._supported: dict[tuple[Device, str], bool] = {}
        self._proc_versions: dict[str, list[str]] = {}
        self._gpm = Gpm(nvml)

    def init(self) -> None:
        nvml = self._nvml or load_pynvml()
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            raise BackendInitError(f"NVML init failed: {error}") from error
        except OSError as error:  # libnvidia-ml.so.1 missing or unloadable
            raise BackendInitError(f"NVML library not loadable: {error}") from error
        self._handles.clear()
        self._supported.clear()
        self._gpm.close()  # buffers of an earlier session that was not shut down
        self._gpm = Gpm(nvml)
        if self._lookup is None:
            self._lookup = ProcReader()

    def shutdown(self) -> None:
        if self._nvml is not None:
            self._gpm.close()  # the buffers are NVML's memory: free them while NVML is up
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass

    def versions(self) -> dict[str, str]:
        nvml = self._nvml
        assert nvml is not None
        out = {}
        for label, call in (("driver", "nvmlSystemGetDriverVersion"), ("NVML", "nvmlSystemGetNVMLVersion")):
            try:
                out[label] = _text(getattr(nvml, call)())
            except (nvml.NVMLError, AttributeError) as error:
                out[label] = f"unknown ({error})"
        return out

    def processes(self) -> ProcessLookup:
        if self._lookup is None:
            self._lookup = ProcReader()
        return self._lookup

    def device_count(self) -> int:
        nvml = self._nvml
        assert nvml is not None
        try:
            return int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as error:
            raise DeviceError(str(error)) from error

    def read_device(self, index: int, cursor: Cursor, *, full: bool) -> RawDevice:
        nvml = self._nvml
        assert nvml is not None
        try:
            handle = self._handles.get(index)
            if handle is None:
                handle = self._handles[index] = nvml.nvmlDeviceGetHandleByIndex(index)
            return self._read(index, handle, cursor, full)
        except nvml.NVMLError as error:
            self._handles.pop(index, None)
            self._gpm.forget(index)  # the next GPM interval would span the failure
            lost = getattr(error, "value", None) == nvml.NVML_ERROR_GPU_IS_LOST
            raise DeviceError(str(error), lost=lost) from error

    def _read(self, index: int, handle: Any, cursor: Cursor, full: bool) -> RawDevice:
        nvml = self._nvml
        assert nvml is not None
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        mig_enabled = self._optional(index, "mig", lambda: nvml.nvmlDeviceGetMigMode(handle)[0]) == 1
        # Utilization is not supported on MIG-enabled GPUs: mark it unknown.
        util = None if mig_enabled else self._util_samples(index, handle, cursor.util_us)
        proc_util = None if mig_enabled else self._process_util(index, handle, cursor.process_us)
        if not full:
            return RawDevice(uuid, index, "", None, None, util, [], proc_util, None, None, mig_enabled)
        memory_total, memory_used = self._memory(index, handle)
        if mig_enabled:
            # GPM of a MIG GPU is per GPU instance (nvmlGpmMigSampleGet); like
            # utilization there, it is left unknown.
            self._gpm.forget(index)
            gpm = GpmReading()
        else:
            gpm = self._gpm.read(index, handle)
        return RawDevice(
            uuid=uuid,
            index=index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            memory_total=memory_total,
            memory_used=memory_used,
            util_samples=util,
            # On a MIG GPU processes are listed per instance, below.
            processes=[] if mig_enabled else self._processes(handle),
            process_util=proc_util,
            energy_mj=self._optional(index, "energy", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle)),
            power_mw=self._optional(index, "power", lambda: nvml.nvmlDeviceGetPowerUsage(handle)),
            mig_enabled=mig_enabled,
            mig_devices=self._mig_devices(index, handle, uuid) if mig_enabled else [],
            sm_active_permille=gpm.sm_active,
            tensor_active_permille=gpm.tensor_active,
            gpm_supported=gpm.supported,
            gpm_error=gpm.error,
        )

    def _optional(self, device: Device, what: str, call: Callable[[], Any]) -> Any:
        """Value of call(), or None where the device does not support it (probed once)."""
        nvml = self._nvml
        assert nvml is not None
        if self._supported.get((device, what)) is False:
            return None
        try:
            return call()
        except nvml.NVMLError as error:
            code = getattr(error, "value", None)
            if code in (nvml.NVML_ERROR_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
                self._supported[(device, what)] = False
                return None
            raise

    def _util_samples(self, index: int, handle: Any, since_us: int) -> list[tuple[int, int]] | None:
        nvml = self._nvml
        assert nvml is not None

        def call() -> list[tuple[int, int]]:
            try:
                _kind, samples = nvml.nvmlDeviceGetSamples(handle, nvml.NVML_GPU_UTILIZATION_SAMPLES, since_us)
            except nvml.NVMLError as error:
                if getattr(error, "value", None) == nvml.NVML_ERROR_NOT_FOUND:
                    return []  # no sample newer than since_us
                raise
            return [(int(s.timeStamp), int(s.sampleValue.uiVal)) for s in samples]

        return self._optional(index, "samples", call)

    def _process_util(self, index: int, handle: Any, since_us: int) -> list[tuple[int, int, int]] | None:
        nvml = self._nvml
        assert nvml is not None

        def call() -> list[tuple[int, int, int]]:
            try:
                samples = nvml.nvmlDeviceGetProcessUtilization(handle, since_us)
            except nvml.NVMLError as error:
                if getattr(error, "value", None) == nvml.NVML_ERROR_NOT_FOUND:
                    return []
                raise
            return [(int(s.pid), int(s.timeStamp), int(s.smUtil)) for s in samples]

        return self._optional(index, "process_util", call)

    def _memory(self, device: Device, handle: Any) -> tuple[int | None, int | None]:
        """(total, used) bytes; v2 first, as v1 counts the driver's reserve as used."""
        nvml = self._nvml
        assert nvml is not None
        if self._supported.get((device, "memory_v2")) is not False:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
                return int(info.total), int(info.used)
            except (nvml.NVMLError, AttributeError, TypeError):
                self._supported[(device, "memory_v2")] = False
        info = self._optional(device, "memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        if info is None:
            return None, None
        return int(info.total), int(info.used)

    def _processes(self, handle: Any) -> list[RawProcess]:
        nvml = self._nvml
        assert nvml is not None
        procs: list[RawProcess] = []
        for kind, base in (
            (schema.KIND_COMPUTE, "nvmlDeviceGetComputeRunningProcesses"),
            (schema.KIND_GRAPHICS, "nvmlDeviceGetGraphicsRunningProcesses"),
        ):
            for entry in self._process_list(handle, base):
                used = getattr(entry, "usedGpuMemory", None)
                procs.append(RawProcess(int(entry.pid), None if used is None else int(used), kind))
        return procs

    def _process_list(self, handle: Any, base: str) -> list[Any]:
        """Call the newest variant the driver has: _v3, then _v2, then the plain symbol."""
        nvml = self._nvml
        assert nvml is not None
        variants = self._proc_versions.setdefault(base, [f"{base}_v3", f"{base}_v2", base])
        while variants:
            function = getattr(nvml, variants[0], None)
            if function is None:
                variants.pop(0)
                continue
            try:
                return list(function(handle))
            except nvml.NVMLError as error:
                code = getattr(error, "value", None)
                if code == nvml.NVML_ERROR_NOT_SUPPORTED:
                    return []
                if code != _FUNCTION_NOT_FOUND:
                    raise
                variants.pop(0)  # symbol missing on this driver: older variant next
            except getattr(nvml, "NVMLLibraryMismatchError", ()):
                variants.pop(0)  # pynvml's own way (not an NVMLError) of saying the same
        return []

    def _mig_devices(self, index: int, handle: Any, parent_uuid: str) -> list[RawDevice]:
        nvml = self._nvml
        assert nvml is not None
        out: list[RawDevice] = []
        count = self._optional(index, "mig_count", lambda: nvml.nvmlDeviceGetMaxMigDeviceCount(handle)) or 0
        for slot in range(count):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError as error:
                if getattr(error, "value", None) == nvml.NVML_ERROR_NOT_FOUND:
                    continue  # empty slot
                raise
            total, used = self._memory((index, slot), mig)
            out.append(
                RawDevice(
                    uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(mig)),
                    memory_total=total,
                    memory_used=used,
                    util_samples=None,
                    processes=self._processes(mig),
                    process_util=None,
                    energy_mj=None,
                    power_mw=None,
                    parent_uuid=parent_uuid,
                    mig_slot=slot,
                )
            )
        return out


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class GpmReading:
    """One device's GPM figures for one read; None where unknown."""

    sm_active: int | None = None  # per mille
    tensor_active: int | None = None
    supported: bool = False
    error: str = ""  # why this read has no figures, when a GPM call failed


@dataclass
class _GpmBuffers:
    """A device's two GPM sample buffers, swapped at every read."""

    baseline: Any  # the sample of the device's previous full read (valid when primed)
    spare: Any  # filled by the next read
    primed: bool = False


# A device without GPM: not offered, a driver older than the API (R520), or
# this pynvml's struct not the driver's. Said silently at the probe.
_GPM_ABSENT = (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND, _ARGUMENT_VERSION_MISMATCH)
# Errors after which a device is not asked again; after the probe said yes they are told once.
_GPM_FOR_GOOD = (*_GPM_ABSENT, _NO_PERMISSION)
_NO_PERMISSION_HINT = " (profiling restricted to admin users? see NVreg_RestrictProfilingToAdminUsers)"


class Gpm:
    """SM and tensor activity per device from NVML's GPM API (Hopper and newer).

    A GPM metric is a difference of two samples, so each device keeps the
    sample of its previous full read and the figures cover the stretch
    between two ticks. Support is probed once per device; the two sample
    buffers and the one metrics request are allocated once and reused, so a
    tick costs two NVML calls per device and no allocation.
    """

    def __init__(self, nvml: ModuleType | None) -> None:
        self._nvml = nvml
        # index -> buffers, or None once the device is known not to offer GPM.
        self._devices: dict[int, _GpmBuffers | None] = {}
        self._request: Any = None  # one nvmlGpmMetricsGet_t for every device: reads are sequential

    def read(self, index: int, handle: Any) -> GpmReading:
        """Figures since this device's previous read; raises NVMLError only when the GPU is lost."""
        nvml = self._nvml
        assert nvml is not None
        if index in self._devices and self._devices[index] is None:
            return GpmReading()
        try:
            buffers = self._devices.get(index) or self._start(index, handle)
            if buffers is None:
                return GpmReading()
            nvml.nvmlGpmSampleGet(handle, buffers.spare)
        except nvml.NVMLError as error:
            return self._failed(index, error)
        older, newer = buffers.baseline, buffers.spare
        # This sample is the next read's baseline, whatever the metrics call says.
        buffers.baseline, buffers.spare = newer, older
        primed, buffers.primed = buffers.primed, True
        if not primed:
            return GpmReading(supported=True)  # first read: no interval yet
        try:
            return self._metrics(older, newer)
        except nvml.NVMLError as error:
            if _code(error) in _GPM_FOR_GOOD or _code(error) == nvml.NVML_ERROR_GPU_IS_LOST:
                return self._failed(index, error)
            return GpmReading(supported=True, error=f"GPM metrics failed: {error}")

    def forget(self, index: int) -> None:
        """Drop the device's previous sample: the next read starts a new interval."""
        buffers = self._devices.get(index)
        if buffers is not None:
            buffers.primed = False

    def close(self) -> None:
        """Free every sample buffer (before nvmlShutdown); support answers are forgotten too."""
        for buffers in self._devices.values():
            if buffers is not None:
                self._free(buffers.baseline, buffers.spare)
        self._devices.clear()
        self._request = None

    def _start(self, index: int, handle: Any) -> _GpmBuffers | None:
        """Probe the device once; where it offers GPM, allocate its two buffers."""
        if not self._probe(handle):
            self._devices[index] = None
            return None
        nvml = self._nvml
        assert nvml is not None
        if self._request is None:
            self._request = _metrics_request(nvml)
        first = nvml.nvmlGpmSampleAlloc()
        try:
            second = nvml.nvmlGpmSampleAlloc()
        except nvml.NVMLError:
            self._free(first)
            raise
        buffers = self._devices[index] = _GpmBuffers(first, second)
        return buffers

    def _probe(self, handle: Any) -> bool:
        """Whether the device offers GPM; an old pynvml or driver without the API says no."""
        nvml = self._nvml
        assert nvml is not None
        query = getattr(nvml, "nvmlGpmQueryDeviceSupport", None)
        if query is None or not hasattr(nvml, "c_nvmlGpmMetricsGet_t"):
            return False  # a pynvml older than the GPM API
        try:
            return bool(query(handle).isSupportedDevice)  # SUCCESS with 0 on pre-Hopper GPUs
        except nvml.NVMLError as error:
            if _code(error) in _GPM_ABSENT:
                return False
            raise  # NO_PERMISSION among others: told once, by read()

    def _metrics(self, older: Any, newer: Any) -> GpmReading:
        """SM and tensor activity between two samples."""
        nvml = self._nvml
        assert nvml is not None
        request = self._request
        request.sample1 = older
        request.sample2 = newer
        nvml.nvmlGpmMetricsGet(request)
        metrics = request.metrics
        return GpmReading(_permille(metrics[0]), _permille(metrics[1]), supported=True)

    def _failed(self, index: int, error: Exception) -> GpmReading:
        """A GPM call failed: no figures this read; the device's other reads stand.

        A lost GPU is the device's failure, not GPM's: it goes up. Where the
        driver refuses GPM for good, the device is not asked again.
        """
        nvml = self._nvml
        assert nvml is not None
        code = _code(error)
        if code == nvml.NVML_ERROR_GPU_IS_LOST:
            raise error
        buffers = self._devices.get(index)
        if code in _GPM_FOR_GOOD:
            if buffers is not None:
                self._free(buffers.baseline, buffers.spare)
            self._devices[index] = None
            hint = _NO_PERMISSION_HINT if code == _NO_PERMISSION else ""
            return GpmReading(error=f"GPM unavailable: {error}{hint}; SM activity is not recorded for this GPU")
        self.forget(index)  # the buffer may hold half a sample: start a new interval
        return GpmReading(supported=buffers is not None, error=f"GPM read failed: {error}")

    def _free(self, *samples: Any) -> None:
        nvml = self._nvml
        assert nvml is not None
        for sample in samples:
            try:
                nvml.nvmlGpmSampleFree(sample)
            except nvml.NVMLError:
                pass  # NVML already gone (driver unloaded): nothing left to free


def _code(error: Exception) -> int | None:
    return getattr(error, "value", None)


def _metrics_request(nvml: ModuleType) -> Any:
    """An nvmlGpmMetricsGet_t asking for SM and tensor activity; NVML writes only values and return codes into it."""
    request = nvml.c_nvmlGpmMetricsGet_t()
    request.version = _GPM_VERSION
    request.numMetrics = 2
    request.metrics[0].metricId = GPM_SM_ACTIVE
    request.metrics[1].metricId = GPM_TENSOR_ACTIVE
    return request


def _permille(metric: Any) -> int | None:
    """A GPM percentage (0.0-100.0) in per mille; None where NVML gave no value for this metric."""
    if getattr(metric, "nvmlReturn", 0) != 0:
        return None  # NVML_SUCCESS is 0: this one metric failed, the other may not have
    value = float(metric.value)
    if math.isnan(value):
        return None  # DCGM reads NaN as blank too
    return min(1000, max(0, round(value * 10)))
