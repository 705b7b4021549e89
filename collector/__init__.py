"""gua-collector: records NVML telemetry into SQLite for gua-report."""

__version__ = "0.1.0"
