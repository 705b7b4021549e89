"""The real backend: NVML through pynvml, with the fallbacks older drivers and MIG need."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from . import schema
from .backend import BackendInitError, Cursor, DeviceError, ProcessLookup, RawDevice, RawProcess
from .procinfo import ProcReader

# NVML_ERROR_FUNCTION_NOT_FOUND; spelled out because old pynvml releases lack the name.
_FUNCTION_NOT_FOUND = 13

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
        if self._lookup is None:
            self._lookup = ProcReader()

    def shutdown(self) -> None:
        if self._nvml is not None:
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
