"""Shared helpers for the collector tests (imported by test modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def collector_cmd(*args: str) -> list[str]:
    """The real gua-collector entry point, in this interpreter."""
    return [sys.executable, "-m", "gua_collector", *args]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any systemd variables, plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")}
    env.update(extra)
    return env


def run_collector(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """Run gua-collector to completion and capture its output."""
    return subprocess.run(collector_cmd(*args), capture_output=True, text=True, timeout=timeout, env=clean_env(**env))
