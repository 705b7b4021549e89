"""Collector cost per tick: CPU milliseconds and peak RSS, simulated backend, 8 GPUs.

Run: .venv/bin/python tests/bench/bench_collector.py [--ticks N]
Prints one table row per configuration. Not collected by pytest; figures,
not pass/fail.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(ticks: int, interval: str, scenario: str) -> tuple[float, float, float, int]:
    """(cpu ms per tick, wall s, peak RSS MiB, db bytes) of one fast-forwarded collector run."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "gua.db"
        start = time.perf_counter()
        # wait4 gives this child's own rusage, so each row's peak RSS is its own.
        child = subprocess.Popen(
            [sys.executable, "-m", "gua_collector", "--db", str(db), "--backend", f"simulate:{scenario}",
             "--interval", interval, "--ticks", str(ticks)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
    args = parser.parse_args()
    print(f"{'scenario':<10}{'interval':>9}{'ticks':>8}{'cpu ms/tick':>13}{'wall s':>9}{'peak RSS MiB':>14}{'DB bytes':>12}")
    for scenario, interval in (("lab8", "10s"), ("lab8", "1m"), ("lab", "10s")):
        cpu, wall, rss, size = measure(args.ticks, interval, scenario)
        print(f"{scenario:<10}{interval:>9}{args.ticks:>8}{cpu:>13.2f}{wall:>9.1f}{rss:>14.1f}{size:>12}")


if __name__ == "__main__":
    main()
