"""What the benchmarks share: the installed copy of gua-report, timed fresh processes, a database built in batches.

Imported by the bench_*.py scripts, which run as `python tests/bench/bench_X.py`
(this folder is then first on sys.path). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BATCH = 360  # ticks per transaction while building (the collector writes one per tick)


def add_variant_arguments(ap: argparse.ArgumentParser) -> None:
    """--runs, --cache and --system-python, for the benchmarks that time an editable and an installed variant."""
    ap.add_argument("--runs", type=int, default=21, help="runs per variant; the median is shown")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gua-bench"))
    ap.add_argument("--system-python", default=shutil.which("python3", path="/usr/bin") or sys.executable,
                    help="interpreter for the installed copy (default /usr/bin/python3)")


def installed_copy(target: str, source: str = os.path.join(REPO, "reporter"), python: str = sys.executable) -> str:
    """`source` (a reporter/ tree) copied to TARGET/gua_report, as a wheel lays it out, byte-compiled by `python`.

    gua_report is standard library only, so this is what an installed package
    runs; no build backend or network needed. Copied afresh on every run.
    Returns TARGET, the directory to put on PYTHONPATH.
    """
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, os.path.join(target, "gua_report"), ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    subprocess.run([python, "-m", "compileall", "-q", target], check=True)
    return target


def console_script(target: str) -> str:
    """TARGET/gua-report, what pip writes for the console script; returns its path."""
    script = os.path.join(target, "gua-report")
    with open(script, "w", encoding="utf-8") as f:
        f.write("import sys\nfrom gua_report.cli import main\nif __name__ == '__main__':\n    sys.exit(main())\n")
    return script


def time_runs(cmd: list[str], env: dict[str, str], runs: int, *, stdin: str | None = None,
              ok: tuple[int, ...] = (0,), give_up_s: float | None = None) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds (user + system, from wait4) of up to `runs` fresh processes.

    On a loaded machine the wall time includes waiting for a core; the CPU
    time is what the process itself cost. An exit status outside `ok` ends
    the benchmark; once a run took over `give_up_s`, no more are started.
    """
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(runs):
        with open(stdin or os.devnull, "rb") as inp:
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=inp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            wall.append(time.perf_counter() - t)
        cpu.append(usage.ru_utime + usage.ru_stime)
        assert proc.stderr is not None
        err = proc.stderr.read().decode().strip()
        proc.stderr.close()
        code = os.waitstatus_to_exitcode(status)
        if code not in ok:
            raise SystemExit(f"{' '.join(cmd[:6])} ...: exit {code}: {err}")
        if give_up_s is not None and wall[-1] > give_up_s:
            break
    return wall, cpu


def median_ms(values: list[float]) -> str:
    """The median of seconds, as milliseconds in a 10-column cell."""
    return f"{statistics.median(values) * 1000:7.1f} ms"


def timed_row(name: str, form: str, width: int, wall: list[float], cpu: list[float]) -> str:
    """A table row: variant, form, median / min / max wall and median CPU."""
    return (f"{name:<10} {form:<{width}} {median_ms(wall)} {min(wall) * 1000:7.1f} ms {max(wall) * 1000:7.1f} ms "
            f"{median_ms(cpu)}")


def print_interpreter_start(variants: dict[str, tuple[list[str], dict[str, str]]], runs: int, system_python: str) -> None:
    """What each variant's interpreter costs to start alone, and the machine."""
    for name, (exe, env) in variants.items():
        wall, cpu = time_runs([*exe[:1], "-c", "pass"], env, runs)
        print(f"{name:<10} python -c pass: {median_ms(wall)} wall, {median_ms(cpu)} CPU (interpreter start alone)")
    print(f"(cpu cores: {os.cpu_count()}; {system_python} for 'installed')")


def write_batched(store: Any, ticks: Iterable[Any], batch: int = BATCH) -> None:
    """Write `ticks` through the collector's Store, `batch` to a transaction.

    After each batch, the collector's compaction of the hours it may compact
    (schema 5), as the service runs it between ticks: the file then has the
    size a collector's has, not that of rows written and compacted later.
    """
    pending: list[Any] = []
    for tick in ticks:
        pending.append(tick)
        if len(pending) >= batch:
            store.write_ticks(pending)
            pending = []
            while store.compact() is not None:
                pass
    if pending:
        store.write_ticks(pending)
    while store.compact() is not None:
        pass


def _tables(uri: str, create: bool = False) -> list[tuple[str, str]]:
    from gua_collector import schema

    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        if create:
            schema.ensure_schema(conn, 0)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        return [("user_version", str(version)), *conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name")]
    finally:
        conn.close()


def drop_stale_cache(path: str) -> None:
    """Remove a cached database of another schema version or other tables (an older development schema)."""
    if os.path.exists(path) and _tables(f"file:{path}?mode=ro") != _tables(":memory:", create=True):
        print(f"{path} is from an older development schema: rebuilding", file=sys.stderr, flush=True)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
