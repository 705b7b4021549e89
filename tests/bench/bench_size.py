"""Database size: bytes per GPU-tick by table, and the size of a year of job churn under retention.

Run: .venv/bin/python tests/bench/bench_size.py [--ticks N] [--year] [--layouts]
Every database is built by the real collector (`python -m gua_collector
--ticks`, simulated backend, fast-forwarded clock), so it holds exactly what
a service writes. "All-in" is every file of the database after a clean stop
(the WAL is truncated then). Figures, not pass/fail; not collected by pytest.
--layouts also stores each database's raw facts in two candidate layouts
(nothing the collector writes) and prints their size: the figures behind
the choice of a denser raw layout (issue 9's size goals).
"""

from __future__ import annotations

import argparse
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable
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


def per_gpu_tick(ticks: int, layouts: bool = False) -> None:
    print(f"{'scenario':<9}{'procs/GPU':>10}{'B/GPU-tick':>12}  largest tables, B/GPU-tick")
    for scenario in ("lab8", "lab", "churn8"):
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "gua.db"
            collect(db, scenario, "10s", ticks, START_MS)
            with sqlite3.connect(db) as conn:
                gpu_ticks = conn.execute("SELECT count(*) FROM gpu_sample").fetchone()[0]
                procs = conn.execute("SELECT count(*) FROM proc_sample").fetchone()[0]
            tables = by_table(db)
            top = ", ".join(f"{n} {s / gpu_ticks:.1f}" for n, s in list(tables.items())[:6])
            print(f"{scenario:<9}{procs / gpu_ticks:>10.2f}{all_in(db) / gpu_ticks:>12.1f}  {top}")
            if layouts:
                print(f"{'':<9}candidate layouts, B/GPU-tick: {candidate_layouts(db, gpu_ticks)}")


# --- candidate layouts (not what the collector writes; figures for a decision) ---------
GPU_COLUMNS = ("status", "util_permille", "coverage_permille", "mem_used_mib", "power_mw", "energy_mj",
               "sm_active_permille", "tensor_active_permille")
PROC_COLUMNS = ("proc_id", "kind", "mem_mib", "sm_util", "cpu_permille", "rss_mib")


def _varints(values: Iterable[int | None]) -> bytes:
    """Unsigned LEB128 of value + 1 (0 = NULL); every value here is >= 0."""
    out = bytearray()
    for v in values:
        n = 0 if v is None else v + 1
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        out.append(n)
    return bytes(out)


def _columns_zlib(rows: list[tuple[int | None, ...]]) -> bytes:
    """Column-major little-endian int64 (NULL = -1), the first column delta-coded, zlib level 6."""
    cols = [[-1 if v is None else v for v in col] for col in zip(*rows, strict=True)]
    cols[0] = cols[0][:1] + [b - a for a, b in zip(cols[0], cols[0][1:], strict=False)]
    return zlib.compress(b"".join(struct.pack(f"<{len(c)}q", *c) for c in cols), 6)


def candidate_layouts(db: Path, gpu_ticks: int) -> str:
    """Bytes per GPU-tick of the raw tables today and in two candidate layouts, each a real SQLite table.

    packed: one row per tick, every GPU's and process's facts as varints in two blobs.
    chunks: one row per UTC hour and GPU (the grain the rollups close), column arrays under zlib,
    as the rows of an hour could be compacted once it is rolled up; with the time to decode them.
    """
    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    ticks = src.execute("SELECT tick_id, run_id, ts_ms, duration_ms, cpu_permille FROM tick ORDER BY tick_id").fetchall()
    gpus: dict[int, list[tuple[int | None, ...]]] = {}
    for row in src.execute(f"SELECT tick_id, gpu_id, {', '.join(GPU_COLUMNS)} FROM gpu_sample ORDER BY 1, 2"):
        gpus.setdefault(row[0], []).append(row[1:])
    procs: dict[int, list[tuple[int | None, ...]]] = {}
    for row in src.execute(f"SELECT tick_id, gpu_id, {', '.join(PROC_COLUMNS)} FROM proc_sample ORDER BY 1, 2, 3"):
        procs.setdefault(row[0], []).append(row[1:])
    raw_now = src.execute("SELECT sum(pgsize) FROM dbstat WHERE name IN ('tick', 'tick_ts', 'gpu_sample', "
                          "'proc_sample')").fetchone()[0]
    src.close()
    out = sqlite3.connect(":memory:")
    out.execute("CREATE TABLE packed (tick_id INTEGER PRIMARY KEY, run_id, ts_ms, duration_ms, cpu_permille, "
                "gpus BLOB, procs BLOB)")
    out.execute("CREATE INDEX packed_ts ON packed (ts_ms)")
    out.executemany("INSERT INTO packed VALUES (?, ?, ?, ?, ?, ?, ?)",
                    ((*t, _varints(v for r in gpus.get(t[0], []) for v in r),
                      _varints(v for r in procs.get(t[0], []) for v in r)) for t in ticks))
    hours: dict[tuple[int, int], tuple[list[tuple[int | None, ...]], list[tuple[int | None, ...]]]] = {}
    for tick_id, run_id, ts, duration, cpu in ticks:
        for g in gpus.get(tick_id, []):
            hours.setdefault((ts // 3_600_000, g[0]), ([], []))[0].append((ts, run_id, duration, cpu, *g[1:]))
        for p in procs.get(tick_id, []):
            hours.setdefault((ts // 3_600_000, p[0]), ([], []))[1].append((ts, *p[1:]))
    out.execute("CREATE TABLE chunk (hour, gpu_id, gpus BLOB, procs BLOB, PRIMARY KEY (hour, gpu_id)) WITHOUT ROWID")
    blobs = [(h, g, _columns_zlib(a), _columns_zlib(b) if b else None) for (h, g), (a, b) in sorted(hours.items())]
    out.executemany("INSERT INTO chunk VALUES (?, ?, ?, ?)", blobs)
    size = dict(out.execute("SELECT CASE WHEN name LIKE 'packed%' THEN 'packed' ELSE 'chunk' END, sum(pgsize) "
                            "FROM dbstat GROUP BY 1").fetchall())
    out.close()
    started = time.perf_counter()
    for _, _, a, b in blobs:
        for blob in (a, b):
            if blob is not None:
                raw = zlib.decompress(blob)
                struct.unpack(f"<{len(raw) // 8}q", raw)
    decode_ms = (time.perf_counter() - started) * 1000 * 1000 / max(len(blobs), 1)
    return (f"raw tables {raw_now / gpu_ticks:.1f}, packed per tick {size['packed'] / gpu_ticks:.1f}, "
            f"compacted per GPU-hour {size['chunk'] / gpu_ticks:.1f} (decode {decode_ms:.0f} ms per 1000 GPU-hours)")


def churn_year(days_per_step: int, interval_s: int, retention: str, unit_retention: str) -> None:
    """simulate:churn8 (8 cards, ~9,600 jobs a day) for a year, printing sizes as it grows."""
    ticks = days_per_step * DAY_MS // (interval_s * 1000)
    print(f"churn8, {interval_s} s ticks, retention {retention}, unit_retention {unit_retention}: "
          f"sizes after each {days_per_step} days")
    print(f"{'day':>5}{'DB MiB':>9}{'process rows':>14}{'raw MiB':>9}{'rollup MiB':>12}{'hist MiB':>10}"
          f"{'unit rows':>11}{'other MiB':>11}")
    raw = ("tick", "tick_ts", "gpu_sample", "proc_sample")
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
    parser.add_argument("--ticks", type=int, default=8640, help="ticks per scenario (default: one day at 10 s)")
    parser.add_argument("--year", action="store_true", help="also a year of simulate:churn8 (minutes)")
    parser.add_argument("--layouts", action="store_true",
                        help="also the raw facts' size in two candidate layouts (packed per tick; per GPU-hour, zlib)")
    parser.add_argument("--step-days", type=int, default=30, help="with --year: days per collector run")
    parser.add_argument("--interval", type=int, default=60, help="with --year: tick interval in seconds")
    parser.add_argument("--retention", default="90d", help="with --year: raw retention")
    parser.add_argument("--unit-retention", default="400d", help="with --year: per-unit rollup retention")
    args = parser.parse_args()
    per_gpu_tick(args.ticks, args.layouts)
    if args.year:
        churn_year(args.step_days, args.interval, args.retention, args.unit_retention)


if __name__ == "__main__":
    main()
