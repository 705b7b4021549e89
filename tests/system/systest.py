"""Constants and helpers the system test modules share (fixtures: conftest.py)."""

from __future__ import annotations

import atexit
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nspawn
import pytest
import rootfs

REPO = Path(__file__).resolve().parents[2]
# GUA_SYSTEST_DIST: take (or build) the .debs in another folder than dist/.
DIST = Path(os.environ.get("GUA_SYSTEST_DIST") or REPO / "dist")
# What the packages are built from: newer files here mean the debs are stale.
SOURCES = [REPO / d for d in ("collector", "reporter", "deploy", "packaging", "pyproject.toml")]
UNIT = "gua-collector.service"
DB = "/var/lib/gua/gua.db"
CONF = "/etc/gua/gua-collector.conf"
DROPIN = "/etc/systemd/system/gua-collector.service.d/test.conf"
ADMIN = "admin1"  # member of group gua
OUTSIDER = "outsider1"  # not in group gua
PERMISSION_DENIED_EXIT = 4  # gua-report's exit code for "permission denied"

# The watchdog test needs a short WatchdogSec and a short tick.
DROPIN_TEXT = """\
# gua system test: a short watchdog so a hung collector is restarted fast.
[Service]
WatchdogSec=6s
RestartSec=1s
"""


def collector_conf(backend: str, interval: str = "2s") -> str:
    """/etc/gua/gua-collector.conf for the test."""
    return f"[collector]\nbackend = {backend}\ninterval = {interval}\n"


def log(request: pytest.FixtureRequest, line: str) -> None:
    """Write a progress line to the terminal, past pytest's output capture."""
    plugins = request.config.pluginmanager
    reporter = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(line)


def db_facts(box: nspawn.Container, db: str = DB) -> dict[str, Any]:
    """integrity_check, tick count and the runs, read as root (read-only)."""
    script = f"""
import json, sqlite3
con = sqlite3.connect("file:{db}?mode=ro", uri=True)
out = {{
    "integrity": [r[0] for r in con.execute("PRAGMA integrity_check")],
    "user_version": con.execute("PRAGMA user_version").fetchone()[0],
    "ticks": con.execute("SELECT count(*) FROM tick").fetchone()[0],
    "first_tick_ms": con.execute("SELECT min(ts_ms) FROM tick").fetchone()[0],
    "last_tick_ms": con.execute("SELECT max(ts_ms) FROM tick").fetchone()[0],
    "gpus": con.execute("SELECT count(*) FROM gpu WHERE parent_id IS NULL").fetchone()[0],
    "runs": con.execute("SELECT run_id, backend, stopped_ms FROM run ORDER BY run_id").fetchall(),
}}
print(json.dumps(out))
"""
    result = box.run(["python3", "-"], input=script, check=True)
    return json.loads(result.stdout)


def journal(box: nspawn.Container, since: str | None = None) -> str:
    """The collector's journal as text (optionally since a cursor-less time)."""
    argv = ["journalctl", "-u", UNIT, "--no-pager", "-o", "short-precise"]
    if since:
        argv += ["--since", since]
    return box.run(argv, check=True).stdout


def service_state(box: nspawn.Container) -> dict[str, str]:
    """The collector unit's properties the tests look at."""
    return box.show(UNIT, "ActiveState", "SubState", "Type", "NRestarts", "Result",
                    "ExecMainStatus", "MainPID", "StatusText")


def booted_container(request: pytest.FixtureRequest, debs: list[Path], extra: tuple[str, ...] = (),
                     prepare: Callable[[Path], None] | None = None) -> Iterator[nspawn.Container]:
    """A freshly booted copy of the cached root (with `extra` Debian packages), `prepare`d before boot;
    always powered off after. Skips, with the reason, where the root cannot be built or booted."""
    try:
        cached = rootfs.cached_root(rootfs.deb_dependencies(debs) + list(extra), log=lambda s: log(request, s))
    except rootfs.RootfsUnavailable as exc:
        pytest.skip(f"cannot build the Debian root{' with ' + ', '.join(extra) if extra else ''}: {exc}")
    for stale in rootfs.remove_stale_copies():
        log(request, f"[gua-systest] removed {stale} left by an aborted run")
    started = time.monotonic()
    root = rootfs.fresh_copy(cached)
    if prepare is not None:
        prepare(root)
    box = nspawn.Container(root, root.with_name(root.name + ".console.log"))
    # Belt and braces: should pytest die without running finalizers (e.g.
    # a second Ctrl-C), the interpreter's exit still powers the container off.
    atexit.register(box.shutdown)
    try:
        try:
            state = box.boot()
        except nspawn.BootFailed as exc:
            pytest.skip(f"systemd-nspawn cannot boot a container here: {exc}")
        log(request, f"[gua-systest] container copied and booted in "
                     f"{time.monotonic() - started:.2f} s ({state})")
        yield box
    finally:
        box.shutdown()
        atexit.unregister(box.shutdown)
        rootfs.remove_copy(root)
        box.log_path.unlink(missing_ok=True)
