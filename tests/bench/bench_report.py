"""Benchmark gua-report on simulated databases of 1, 30 and 365 days.

Not collected by pytest (no test_ prefix). Builds each DB once through the
collector's own Store (8 GPUs, the simulator's lab8 workloads, 10 s ticks,
hourly rollups as the collector writes them) and caches it under --cache;
then times `gua-report --since Nd --format json` in a subprocess and reads
its peak RSS with getrusage(RUSAGE_CHILDREN).

    .venv/bin/python tests/bench/bench_report.py [--days 1,30,365] [--cache DIR]

Goals: 30 d < 0.5 s, 365 d < 2 s on 2 cores. Building 365 days takes a few
minutes (about 1 s per simulated day).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from report_helpers import DAY, T0, sim_ticks  # noqa: E402

INTERVAL_MS = 10_000
BATCH = 360  # ticks per transaction while building (the collector writes one per tick)


def build(path: str, days: int) -> float:
    from gua_collector.store import Store

    start = time.monotonic()
    end_ms = T0 + days * DAY
    store = Store.open(path + ".tmp", now_ms=T0)
    try:
        store.begin_run(T0, INTERVAL_MS, "simulate:lab8", "bench01", "bench")
        batch = []
        for tick in sim_ticks(T0, end_ms, INTERVAL_MS, "lab8"):
            batch.append(tick)
            if len(batch) >= BATCH:
                store.write_ticks(batch)
                batch = []
        if batch:
            store.write_ticks(batch)
        store.end_run(end_ms)
    finally:
        store.close()
    os.replace(path + ".tmp", path)
    for side in (".tmp.lock",):
        try:
            os.unlink(path + side)
        except FileNotFoundError:
            pass
    return time.monotonic() - start


def gpu_samples(path: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM gpu_sample").fetchone()[0]
    finally:
        conn.close()


def time_report(path: str, days: int, extra: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one report run in a fresh process.

    os.wait4 gives this child's own rusage (RUSAGE_CHILDREN would keep the
    largest child so far); ru_maxrss is in KiB on Linux.
    """
    # --until the end of the data so the window is exactly N days of samples.
    until = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime((T0 + days * DAY) / 1000))
    t = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gua_report", "--db", path, "--since", f"{days}d", "--until", until,
         "--format", "json", "--tz", "Europe/Berlin", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"gua-report failed on {path} (exit {proc.returncode})")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", default="1,30,365", help="comma-separated DB lengths (default 1,30,365)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gua-bench"),
                    help="where built DBs are kept between runs")
    ap.add_argument("--repeat", type=int, default=3, help="report runs per DB; the best is shown")
    ap.add_argument("--no-rollups", action="store_true", help="also time the raw path")
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    rows = []
    for days in [int(d) for d in args.days.split(",")]:
        path = os.path.join(args.cache, f"bench-{days}d.db")
        if not os.path.exists(path):
            secs = build(path, days)
            print(f"built {days} d in {secs:.0f} s: {path}", file=sys.stderr, flush=True)
        size = os.path.getsize(path)
        n = gpu_samples(path)
        runs = [time_report(path, days, []) for _ in range(args.repeat)]
        wall = min(w for w, _ in runs)
        rss = max(m for _, m in runs)
        raw = ""
        if args.no_rollups:
            w2, m2 = time_report(path, days, ["--no-rollups"])
            raw = f"{w2:9.2f} s {m2:6.0f} MiB"
        rows.append((days, size, n, wall, rss, raw))
    print(f"{'days':>5} {'DB bytes':>14} {'GPU-samples':>12} {'B/sample':>9} {'report':>9} {'peak RSS':>9}"
          + ("   --no-rollups" if args.no_rollups else ""))
    for days, size, n, wall, rss, raw in rows:
        print(f"{days:>5} {size:>14,} {n:>12,} {size / n:>9.1f} {wall:>7.2f} s {rss:>5.0f} MiB  {raw}")
    print(f"(cpu cores: {os.cpu_count()}; peak RSS is the largest report process)")


if __name__ == "__main__":
    main()
