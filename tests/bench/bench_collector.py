"""Collector cost per tick: CPU milliseconds and peak RSS, simulated backend, 8 GPUs.

Run: .venv/bin/python tests/bench/bench_collector.py [--ticks N] [--runs N] [--python PATH]
Prints one table row per configuration, the median of --runs runs. Not
collected by pytest; figures, not pass/fail. --python: the interpreter whose
installed gua_collector runs (a venv with a non-editable install of another
commit, for a before/after). The simulated clock starts on a fixed date, so
every run writes the same ticks. Compaction (schema 5) starts once a day is
stored: --ticks above 8640 at 10 s includes it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(ticks: int, interval: str, scenario: str, python: str) -> tuple[float, float, float, int]:
    """(cpu ms per tick, wall s, peak RSS MiB, db bytes) of one fast-forwarded collector run."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "gua.db"
        start = time.perf_counter()
        # wait4 gives this child's own rusage, so each row's peak RSS is its own.
        child = subprocess.Popen(
            [python, "-m", "gua_collector", "--db", str(db), "--backend", f"simulate:{scenario}",
             "--interval", interval, "--ticks", str(ticks), "--start", "2026-01-01T00:00:00Z"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp,
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise SystemExit(f"collector failed with {child.returncode}")
        wall = time.perf_counter() - start
        cpu = usage.ru_utime + usage.ru_stime
        size = sum(p.stat().st_size for p in Path(tmp).glob("gua.db*"))
        return cpu * 1000 / ticks, wall, usage.ru_maxrss / 1024, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=8640, help="ticks per run (default: one day at 10 s)")
    parser.add_argument("--runs", type=int, default=1, help="runs per configuration; the median is shown")
    parser.add_argument("--python", default=sys.executable, help="interpreter to run gua_collector with")
    args = parser.parse_args()
    print(f"{'scenario':<10}{'interval':>9}{'ticks':>8}{'cpu ms/tick':>13}{'wall s':>9}{'peak RSS MiB':>14}{'DB bytes':>12}")
    for scenario, interval in (("lab8", "10s"), ("lab8", "1m"), ("lab", "10s")):
        runs = [measure(args.ticks, interval, scenario, args.python) for _ in range(args.runs)]
        cpu, wall, rss = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{scenario:<10}{interval:>9}{args.ticks:>8}{cpu:>13.2f}{wall:>9.1f}{rss:>14.1f}{runs[-1][3]:>12}")


if __name__ == "__main__":
    main()
