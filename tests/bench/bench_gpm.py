"""Collector CPU that GPM adds per GPU per tick, against a fake pynvml (the Python side only).

Run: .venv/bin/python tests/bench/bench_gpm.py [--reads N] [--runs N]
Prints the median over runs; not collected by pytest; figures, not pass/fail.
The driver's own cost of nvmlGpmSampleGet/MetricsGet needs a real GPU
(tests/gpu/run_gpu_check.py measures it there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_gpm import FakeGpm, GpmDevice, gpm_nvml, read, started  # noqa: E402
from test_nvml_backend import fake_nvml  # noqa: E402


def cpu_per_read(nvml: types.SimpleNamespace, reads: int) -> float:
    """Thread CPU seconds per full device read."""
    backend = started(nvml)
    read(backend)  # the first read allocates and probes
    start = time.thread_time()
    for _ in range(reads):
        read(backend)
    return (time.thread_time() - start) / reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    extra = [
        cpu_per_read(gpm_nvml(FakeGpm({"h0": GpmDevice()})), args.reads) - cpu_per_read(fake_nvml(), args.reads)
        for _ in range(args.runs)
    ]
    print(f"GPM adds {statistics.median(extra) * 1e6:.1f} us of collector CPU per GPU per tick "
          f"(median of {args.runs} runs of {args.reads} reads; budget 1000 us)")


if __name__ == "__main__":
    main()
