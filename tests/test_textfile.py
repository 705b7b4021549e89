"""The Prometheus textfile: what it says, that it is replaced atomically, and that failures stay local."""

from __future__ import annotations

import io
import os
import re
import sqlite3
import stat
import tempfile
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


def _victim(tmp_path: Path) -> Path:
    """A file the collector can write (like its own database) that a planted link points at."""
    victim = tmp_path / "state" / "gua.db"
    victim.parent.mkdir()
    victim.write_bytes(b"SQLite format 3\x00precious")
    victim.chmod(0o640)
    return victim


def _one_gpu_tick() -> Tick:
    return Tick(10_000, 10_000, (GpuSample(GpuInfo("GPU-0", 0, "T", None), util_permille=0),))


def _assert_published(path: Path) -> None:
    info = path.lstat()
    assert stat.S_ISREG(info.st_mode), "the final path is a regular file, not the planted link"
    assert stat.S_IMODE(info.st_mode) == 0o644
    assert parse(path.read_text())


def test_link_at_the_old_predictable_temp_name_is_not_followed(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    exporter = tmp_path / "textfile"
    exporter.mkdir()
    path = exporter / "gua.prom"
    # Anyone who can write the exporter directory could plant this before a tick.
    (exporter / f"gua.prom.{os.getpid()}.tmp").symlink_to(victim)
    Textfile(str(path)).publish(_one_gpu_tick())
    assert victim.read_bytes() == b"SQLite format 3\x00precious"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o640, "the victim did not become world-readable"
    _assert_published(path)


def test_link_at_the_final_path_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    exporter = tmp_path / "textfile"
    exporter.mkdir()
    path = exporter / "gua.prom"
    path.symlink_to(victim)
    Textfile(str(path)).publish(_one_gpu_tick())
    assert victim.read_bytes() == b"SQLite format 3\x00precious"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o640
    _assert_published(path)
    assert sorted(p.name for p in exporter.iterdir()) == ["gua.prom"]


def test_links_at_the_random_temp_names_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a link at the very name the temp-name generator picks is never opened."""
    if not hasattr(tempfile, "_get_candidate_names"):
        pytest.skip("this Python's tempfile draws names differently")
    victim = _victim(tmp_path)
    exporter = tmp_path / "textfile"
    exporter.mkdir()
    (exporter / ".gua-taken.tmp").symlink_to(victim)
    (exporter / ".gua-dangling.tmp").symlink_to(tmp_path / "state" / "created-through-a-link")
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(["taken", "dangling", "free"]))
    path = exporter / "gua.prom"
    Textfile(str(path)).publish(_one_gpu_tick())
    assert victim.read_bytes() == b"SQLite format 3\x00precious"
    assert not (tmp_path / "state" / "created-through-a-link").exists()
    _assert_published(path)


def test_failed_rename_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "gua.prom"
    path.mkdir()
    (path / "keep").write_text("x")  # rename() cannot replace a non-empty directory
    with pytest.raises(OSError) as info:
        Textfile(str(path)).publish(_one_gpu_tick())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gua.prom"], "no temporary left behind"
    assert info.value.filename == str(path), "the error names the configured file, not a random temporary"
    assert sorted(p.name for p in path.iterdir()) == ["keep"]


def test_mode_is_set_on_the_open_file_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "gua.prom"
    old = os.umask(0o077)  # the unit's UMask=
    try:
        Textfile(str(path)).publish(_one_gpu_tick())
    finally:
        os.umask(old)
    _assert_published(path)


def test_symlinked_directory_is_the_admins_choice(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "textfile").symlink_to(real)
    Textfile(str(tmp_path / "textfile" / "gua.prom")).publish(_one_gpu_tick())
    _assert_published(real / "gua.prom")
    assert sorted(p.name for p in real.iterdir()) == ["gua.prom"]
