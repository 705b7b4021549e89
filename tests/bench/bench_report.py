"""Benchmark gua-report, whole process, installed: every time zone kind and threshold, three windows.

Not collected by pytest (no test_ prefix); prints figures, asserts nothing.
Builds the database once through the collector's own Store (8 GPUs, the
simulator's lab8 workloads, 10 s ticks, rollups as the collector writes
them) and caches it under --cache. Then it times fresh processes of

    gua-report --db DB --since WINDOW --until END --format json [--tz ZONE] [THRESHOLDS]

for each row (zone and thresholds) and column (window), and prints the
median of --runs runs in milliseconds, and each cell's ratio to the UTC
default-threshold cell of the same window (the goal: within 2x).

The package runs as installed: reporter/ copied to gua_report/ (as the
wheel lays it out) and byte-compiled, started by /usr/bin/python3 through a
script like the console script pip writes (`from gua_report.cli import
main`). An editable install would recompile every module at each start
here (PYTHONDONTWRITEBYTECODE=1) and overstate start-up time.

END is 7 min 17 s before the last tick, so no window starts or ends on a
whole hour or quarter hour, as with `--until now`.

    .venv/bin/python tests/bench/bench_report.py [--days 365] [--runs 5] [--cache DIR]

Goals (issue 8): every cell within 2x of the UTC default cell of its
window; the 365 d window <= 1 s; the 1 h window <= 50 ms. Building 365 days
takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))

from benchlib import console_script, drop_stale_cache, installed_copy, time_runs, write_batched  # noqa: E402

from report_helpers import DAY, T0, sim_ticks  # noqa: E402

INTERVAL_MS = 10_000
END_BEFORE_LAST_MS = 7 * 60_000 + 17_000

# Rows: (label, extra arguments). Zones: UTC, a +05:30 and a +05:45 one.
# Thresholds: the defaults (10 %, 100 MB: the hourly rollups), other whole
# percents and sizes (the histograms: up to their caps of 50 % and 1024 MiB,
# and in steps of 10 % and 1 GiB above), and thresholds the histograms cannot
# serve (raw rows, said in the report): one between whole percents, one
# between the memory steps.
ZONES = (("UTC", "UTC"), ("Kolkata", "Asia/Kolkata"), ("Kathmandu", "Asia/Kathmandu"))
THRESHOLDS = (
    ("default", ()),
    ("active 50%", ("--active-threshold", "50")),
    ("held 1000MiB", ("--held-threshold", "1000MiB")),
    ("active 25% held 1GB", ("--active-threshold", "25", "--held-threshold", "1GB")),
    ("held 300MB", ("--held-threshold", "300MB")),
    ("active 80% held 2GiB", ("--active-threshold", "80", "--held-threshold", "2GiB")),
    ("active 7.5% (raw)", ("--active-threshold", "7.5")),
    ("held 2GB (raw)", ("--held-threshold", "2GB")),
)
WINDOWS = ("1h", "7d", "365d")


def build(path: str, days: int) -> float:
    from gua_collector.store import Store

    start = time.monotonic()
    end_ms = T0 + days * DAY
    store = Store.open(path + ".tmp", now_ms=T0)
    try:
        store.begin_run(T0, INTERVAL_MS, "simulate:lab8", "bench01", "bench")
        write_batched(store, sim_ticks(T0, end_ms, INTERVAL_MS, "lab8"))
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


PYTHON = shutil.which("python3", path="/usr/bin") or sys.executable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=365, help="length of the database (default 365)")
    ap.add_argument("--windows", default=",".join(WINDOWS), help="--since values (default 1h,7d,365d)")
    ap.add_argument("--runs", type=int, default=5, help="runs per cell; the median is shown (default 5)")
    ap.add_argument("--give-up", type=float, default=15.0,
                    help="seconds after which a cell is not run again (its median is of fewer runs)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gua-bench"),
                    help="where built databases are kept between runs")
    ap.add_argument("--source", default=os.path.join(REPO, "reporter"),
                    help="the reporter tree to install and time (default: this checkout's)")
    ap.add_argument("--rows", default="", help="only rows whose label contains this text")
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    path = os.path.join(args.cache, f"bench-{args.days}d.db")
    drop_stale_cache(path)
    if not os.path.exists(path):
        secs = build(path, args.days)
        print(f"built {args.days} d in {secs:.0f} s: {path}", file=sys.stderr, flush=True)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    samples = conn.execute("SELECT count(*) FROM tick").fetchone()[0] * 8  # rows and compacted alike
    last = conn.execute("SELECT max(ts_ms) FROM tick").fetchone()[0]
    conn.close()
    until = last - END_BEFORE_LAST_MS
    until_iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(until // 1000)) + f".{until % 1000:03d}Z"

    script = console_script(installed_copy(os.path.join(args.cache, "installed-report"), args.source, PYTHON))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = os.path.dirname(script)
    windows = args.windows.split(",")
    print(f"database: {path}, {os.path.getsize(path):,} bytes, {samples:,} GPU-samples ({args.days} days, "
          f"8 GPUs, 10 s ticks); --until {until_iso}")
    print(f"gua-report installed from {args.source}, byte-compiled, run by {PYTHON}; "
          f"median of {args.runs} runs, whole process, ms; (x: ratio to the UTC default cell)")
    print(f"{'zone':<10} {'thresholds':<20}" + "".join(f" {w:>16}" for w in windows))
    for w in windows:  # untimed: the first run after a build or boot reads the file from disk
        time_runs([PYTHON, script, "--db", path, "--since", w, "--until", until_iso, "--format", "json",
                   "--tz", "UTC"], env, 1)
    base: dict[str, float] = {}
    for zone_label, zone in ZONES:
        for thr_label, thr in THRESHOLDS:
            label = f"{zone_label} {thr_label}"
            if args.rows and args.rows not in label:
                continue
            cells = []
            for w in windows:
                cmd = [PYTHON, script, "--db", path, "--since", w, "--until", until_iso, "--format", "json",
                       "--tz", zone, *thr]
                runs = time_runs(cmd, env, args.runs, give_up_s=args.give_up)[0]
                med = statistics.median(runs) * 1000
                if zone == "UTC" and not thr:
                    base[w] = med
                ratio = f"x{med / base[w]:.1f}" if w in base else ""
                more = "" if len(runs) == args.runs else f"({len(runs)})"
                cells.append(f"{med:9.0f}{more:>3}{ratio:>5}")
            print(f"{zone_label:<10} {thr_label:<20}" + "".join(f" {c:>16}" for c in cells), flush=True)
    for what, extra in (("--version", ["--version"]), ("--help", ["--help"])):
        runs = time_runs([PYTHON, script, *extra], env, args.runs * 2, give_up_s=args.give_up)[0]
        print(f"gua-report {what}: {statistics.median(runs) * 1000:.0f} ms")
    runs = time_runs([PYTHON, "-c", "pass"], env, args.runs * 2, give_up_s=args.give_up)[0]
    print(f"{PYTHON} -c pass: {statistics.median(runs) * 1000:.0f} ms (interpreter start alone)")
    print(f"(cpu cores: {os.cpu_count()}; (n): a cell over --give-up {args.give_up:g} s ran n times)")


if __name__ == "__main__":
    main()
