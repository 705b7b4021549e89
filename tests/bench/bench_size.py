"""Database size: bytes per GPU-tick by table, and the size of a year of job churn under retention.

Run: .venv/bin/python tests/bench/bench_size.py [--ticks N] [--year]
Every database is built by the real collector (`python -m gua_collector
--ticks`, simulated backend, fast-forwarded clock), so it holds exactly what
a service writes. "All-in" is every file of the database after a clean stop
(the WAL is truncated then). Figures, not pass/fail; not collected by pytest.
Since schema 5 the collector compacts each rolled-up hour older than the
last two into one raw_chunk row, so a run's figure mixes the few bytes of
compacted hours with the ~55 B of the two hours kept as rows; "head" and
"chunks" split it, and "compacted" is the cost of a GPU-tick once its hour
is compacted: what a 90-day database pays for nearly all of its ticks.
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
from datetime import UTC
from pathlib import Path

DAY_MS = 86_400_000
START_MS = 1_767_225_600_000  # 2026-01-01 00:00 UTC


def collect(db: Path, scenario: str, interval: str, ticks: int, start_ms: int, retention: str = "90d",
            unit_retention: str = "400d") -> None:
    """One fast-forwarded collector run onto db."""
    from datetime import datetime

    start = datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = subprocess.run(
        [sys.executable, "-m", "gua_collector", "--db", str(db), "--backend", f"simulate:{scenario}",
         "--interval", interval, "--ticks", str(ticks), "--start", start, "--retention", retention,
         "--unit-retention", unit_retention],
        capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"collector failed with {r.returncode}: {r.stderr.strip()}")


def by_table(db: Path) -> dict[str, int]:
    """Bytes per table and index (dbstat), the largest first."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC").fetchall()
    return {name: size for name, size in rows}


def all_in(db: Path) -> int:
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))


def stored_rows(db: Path) -> tuple[int, int, int, int]:
    """(GPU-ticks as rows, GPU-ticks in chunks, process rows as rows, process rows in chunks)."""
    from gua_collector import rawchunk

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        gpu_rows = conn.execute("SELECT count(*) FROM gpu_sample").fetchone()[0]
        proc_rows = conn.execute("SELECT count(*) FROM proc_sample").fetchone()[0]
        chunked = {"gpu_sample": 0, "proc_sample": 0}
        for (data,) in conn.execute("SELECT data FROM raw_chunk"):
            for t in rawchunk.decode(data):
                chunked[t.name] += len(t.rows)
    return gpu_rows, chunked["gpu_sample"], proc_rows, chunked["proc_sample"]


def per_gpu_tick(ticks: int) -> None:
    print(f"{'scenario':<9}{'procs/GPU':>10}{'B/GPU-tick':>12}{'head':>7}{'chunks':>8}{'compacted':>11}"
          "  largest tables, B/GPU-tick")
    for scenario in ("lab8", "lab", "churn8"):
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "gua.db"
            collect(db, scenario, "10s", ticks, START_MS)
            gpu_rows, gpu_chunked, proc_rows, proc_chunked = stored_rows(db)
            gpu_ticks = gpu_rows + gpu_chunked
            tables = by_table(db)
            top = ", ".join(f"{n} {s / gpu_ticks:.1f}" for n, s in list(tables.items())[:6])
            head = sum(tables.get(t, 0) for t in ("gpu_sample", "proc_sample"))
            chunks = tables.get("raw_chunk", 0) + tables.get("raw_chunk_hour", 0)
            # A compacted GPU-tick: its share of the chunks, plus everything but the rows kept as rows
            # ("-": a run shorter than the day kept as rows compacts nothing).
            compacted = (f"{(all_in(db) - head - chunks) / gpu_ticks + chunks / gpu_chunked:.1f}"
                         if gpu_chunked else "-")
            print(f"{scenario:<9}{(proc_rows + proc_chunked) / gpu_ticks:>10.2f}{all_in(db) / gpu_ticks:>12.1f}"
                  f"{head / gpu_ticks:>7.1f}{chunks / gpu_ticks:>8.1f}{compacted:>11}  {top}")


def churn_year(days_per_step: int, interval_s: int, retention: str, unit_retention: str) -> None:
    """simulate:churn8 (8 cards, ~9,600 jobs a day) for a year, printing sizes as it grows."""
    ticks = days_per_step * DAY_MS // (interval_s * 1000)
    print(f"churn8, {interval_s} s ticks, retention {retention}, unit_retention {unit_retention}: "
          f"sizes after each {days_per_step} days")
    print(f"{'day':>5}{'DB MiB':>9}{'process rows':>14}{'raw MiB':>9}{'rollup MiB':>12}{'hist MiB':>10}"
          f"{'unit rows':>11}{'other MiB':>11}")
    raw = ("tick", "tick_ts", "gpu_sample", "proc_sample", "raw_chunk", "raw_chunk_hour")
    hist = ("hour_gpu_hist", "quarter_gpu", "hour_account_hist", "hour_unit_hist")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "gua.db"
        for step in range(1, 365 // days_per_step + 1):
            collect(db, "churn8", f"{interval_s}s", ticks, START_MS + (step - 1) * days_per_step * DAY_MS, retention,
                    unit_retention)
            tables = by_table(db)
            with sqlite3.connect(db) as conn:
                processes = conn.execute("SELECT count(*) FROM process").fetchone()[0]
                units = conn.execute("SELECT count(*) FROM hour_unit").fetchone()[0]
            mib = 1024 * 1024
            raw_b = sum(tables.get(t, 0) for t in raw)
            hist_b = sum(tables.get(t, 0) for t in hist)
            roll_b = sum(s for t, s in tables.items() if t.startswith("hour_") and t not in hist)
            other = all_in(db) - raw_b - hist_b - roll_b
            print(f"{step * days_per_step:>5}{all_in(db) / mib:>9.1f}{processes:>14}{raw_b / mib:>9.1f}"
                  f"{roll_b / mib:>12.1f}{hist_b / mib:>10.1f}{units:>11}{other / mib:>11.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=60480,
                        help="ticks per scenario (default: a week at 10 s, of which the last day stays rows)")
    parser.add_argument("--year", action="store_true", help="also a year of simulate:churn8 (minutes)")
    parser.add_argument("--step-days", type=int, default=30, help="with --year: days per collector run")
    parser.add_argument("--interval", type=int, default=60, help="with --year: tick interval in seconds")
    parser.add_argument("--retention", default="90d", help="with --year: raw retention")
    parser.add_argument("--unit-retention", default="400d", help="with --year: per-unit rollup retention")
    args = parser.parse_args()
    per_gpu_tick(args.ticks)
    if args.year:
        churn_year(args.step_days, args.interval, args.retention, args.unit_retention)


if __name__ == "__main__":
    main()
