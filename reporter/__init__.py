"""gua-report: read-only report of active, idle-held and idle GPU time."""

__version__ = "0.1.0"
