"""The Prometheus textfile: what it says, that it is replaced atomically, and that failures stay local."""

from __future__ import annotations

import io
import re
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from collector_helpers import run_collector
from gua_collector.clock import SimClock
from gua_collector.records import GpuInfo, GpuSample, ProcessInfo, ProcSample, Tick
from gua_collector.service import Log, Service, Settings
from gua_collector.simulate import SimBackend
from gua_collector.store import Store
from gua_collector.textfile import Textfile

pytestmark = pytest.mark.timeout(30)
LINE = re.compile(r'^([a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\} (NaN|-?[0-9.e+]+)$')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A strict reader of the exposition lines this module writes."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = LINE.match(line)
        assert match, f"not a valid sample line: {line!r}"
        labels = frozenset(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', match.group(2)))
        out[(match.group(1), labels)] = float(match.group(3))
    return out


def who(pid: int, user: str) -> ProcessInfo:
    return ProcessInfo(pid, pid, 1000 + pid, user, "python", "/", "")


def test_busy_card_with_an_idle_tenant(tmp_path: Path) -> None:
    gpu = GpuInfo("GPU-1", 1, 'Test "quoted" GPU', 80 * 2**30)
    procs = (
        ProcSample(who(1, "carol"), 1, 12_288, 95),
        ProcSample(who(2, "bob"), 1, 2_048, 0),
        ProcSample(who(3, "alice"), 1, None, 0),
    )
    text = Textfile(str(tmp_path / "gua.prom"))
    tick = Tick(10_000, 10_000, (GpuSample(gpu, util_permille=950, coverage_permille=1000, mem_used_mib=14_500, procs=procs),))
    text.render(tick)
    metrics = parse(text.render(Tick(20_000, 10_000, tick.gpus)))
    base = {("gpu", "1"), ("uuid", "GPU-1"), ("name", 'Test \\"quoted\\" GPU')}
    assert metrics[("gua_gpu_state", frozenset(base | {("state", "active")}))] == 1
    assert metrics[("gua_gpu_state", frozenset(base | {("state", "idle_held")}))] == 0
    assert metrics[("gua_gpu_state_seconds_total", frozenset(base | {("state", "active")}))] == 20
    assert metrics[("gua_gpu_utilization_ratio", frozenset(base))] == 0.95
    assert metrics[("gua_user_idle_held", frozenset(base | {("user", "bob")}))] == 1
    assert metrics[("gua_user_idle_held", frozenset(base | {("user", "carol")}))] == 0
    assert metrics[("gua_user_idle_held", frozenset(base | {("user", "alice")}))] == 1, "unknown memory holds"
    assert metrics[("gua_user_gpu_memory_bytes", frozenset(base | {("user", "bob")}))] == 2_048 * 2**20
    alice_mem = metrics[("gua_user_gpu_memory_bytes", frozenset(base | {("user", "alice")}))]
    assert alice_mem != alice_mem, "unknown memory is NaN, not 0"


def test_publish_replaces_the_file_readable_by_node_exporter(tmp_path: Path) -> None:
    path = tmp_path / "gua.prom"
    text = Textfile(str(path))
    tick = Tick(10_000, 10_000, (GpuSample(GpuInfo("GPU-0", 0, "T", None), util_permille=0),))
    text.publish(tick)
    first_inode = path.stat().st_ino
    text.publish(tick)
    assert path.stat().st_ino != first_inode, "a new file is renamed over the old one"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gua.prom"], "no temporary left behind"
    assert parse(path.read_text())


def test_unwritable_textfile_is_logged_once_and_sampling_goes_on(tmp_path: Path) -> None:
    clock = SimClock(1_772_438_400_000)
    store = Store.open(str(tmp_path / "gua.db"), now_ms=clock.wall_ms())
    log = io.StringIO()
    service = Service(
        Settings(interval_s=10, retention_ms=86_400_000, ticks=5), store, SimBackend("lab", clock), clock,
        type("Quiet", (), {"send": lambda self, m: None})(), Log(log, journal=False), threading.Event(), None,
        Textfile(str(tmp_path / "missing-dir" / "gua.prom")),
    )
    assert service.run() == 0
    store.close()
    assert log.getvalue().count("cannot write") == 1, log.getvalue()
    assert sqlite3.connect(tmp_path / "gua.db").execute("SELECT count(*) FROM tick").fetchone()[0] == 5


def test_textfile_option(tmp_path: Path) -> None:
    proc = run_collector("--db", str(tmp_path / "gua.db"), "--backend", "simulate", "--ticks", "1", "--textfile", str(tmp_path / "gua.txt"))
    assert proc.returncode == 2 and "must end in .prom" in proc.stderr
    proc = run_collector("--db", str(tmp_path / "gua.db"), "--backend", "simulate:lab", "--ticks", "3", "--textfile", str(tmp_path / "gua.prom"))
    assert proc.returncode == 0, proc.stderr
    metrics = parse((tmp_path / "gua.prom").read_text())
    assert sum(1 for (name, _l) in metrics if name == "gua_gpu_state") == 4 * 4
