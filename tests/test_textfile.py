"""The Prometheus textfile: what it says, that it is replaced atomically, and that failures stay local."""

from __future__ import annotations

import grp
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
from gua_collector import schema
from gua_collector.clock import SimClock
from gua_collector.records import GpuInfo, GpuSample, ProcessInfo, ProcSample, Tick
from gua_collector.service import Log, Service, Settings
from gua_collector.simulate import SimBackend
from gua_collector.store import Store
from gua_collector.textfile import Textfile

pytestmark = pytest.mark.timeout(30)
LINE = re.compile(r'^([a-z_]+)(?:\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\})? (-?[0-9.e+]+)$')
Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Metrics:
    """A strict reader of the exposition lines this module writes (NaN is not among them)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = LINE.match(line)
        assert match, f"not a valid sample line: {line!r}"
        labels = frozenset(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        out[(match.group(1), labels)] = float(match.group(3))
    return out


def series(metrics: Metrics, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (n, labels), value in metrics.items() if n == name}


def key(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def who(pid: int, user: str) -> ProcessInfo:
    return ProcessInfo(pid, pid, 1000 + pid, user, "python", "/", "")


def test_busy_card_with_an_idle_tenant(tmp_path: Path) -> None:
    gpu = GpuInfo("GPU-1", 1, 'Test "quoted" GPU', 80 * 2**30)
    procs = (
        ProcSample(who(1, "carol"), 1, 12_288, 95),
        ProcSample(who(2, "bob"), 1, 2_048, 0),
        ProcSample(who(3, "alice"), 1, None, 0),
    )
    text = Textfile(str(tmp_path / "gua.prom"), users=True)
    tick = Tick(10_000, 10_000, (GpuSample(gpu, util_permille=950, coverage_permille=1000, mem_used_mib=14_500, procs=procs),))
    text.render(tick)
    metrics = parse(text.render(Tick(20_000, 10_000, tick.gpus)))
    assert metrics[("gua_gpu_info", key(gpu="1", uuid="GPU-1", name='Test \\"quoted\\" GPU'))] == 1
    assert metrics[("gua_gpu_state", key(gpu="1", state="active"))] == 1
    assert metrics[("gua_gpu_state", key(gpu="1", state="idle_held"))] == 0
    assert metrics[("gua_gpu_state_seconds_total", key(gpu="1", state="active"))] == 20
    assert metrics[("gua_gpu_utilization_ratio", key(gpu="1"))] == 0.95
    assert metrics[("gua_user_idle_held", key(gpu="1", user="bob"))] == 1
    assert metrics[("gua_user_idle_held", key(gpu="1", user="carol"))] == 0
    assert metrics[("gua_user_idle_held", key(gpu="1", user="alice"))] == 1, "unknown memory holds"
    assert metrics[("gua_user_idle_held_seconds_total", key(gpu="1", user="bob"))] == 20
    assert metrics[("gua_user_idle_held_seconds_total", key(gpu="1", user="carol"))] == 0
    assert metrics[("gua_user_held_seconds_total", key(gpu="1", user="carol"))] == 20
    assert metrics[("gua_user_gpu_memory_bytes", key(gpu="1", user="bob"))] == 2_048 * 2**20
    assert ("gua_user_gpu_memory_bytes", key(gpu="1", user="alice")) not in metrics, "unknown memory is left out"


def test_identity_only_on_the_info_series(tmp_path: Path) -> None:
    """uuid and name once per GPU, not on every series (Prometheus cardinality, readable joins)."""
    metrics = parse(Textfile(str(tmp_path / "gua.prom"), users=True).render(_lab_tick()))
    for (name, labels) in metrics:
        names = {k for k, _ in labels}
        if name in ("gua_gpu_info", "gua_mig_info"):
            assert {"uuid", "name"} <= names
        else:
            assert not names & {"uuid", "name"}, (name, labels)


def test_no_nan_and_nothing_unknown_as_zero(tmp_path: Path) -> None:
    gpu = GpuInfo("GPU-0", 0, "T", None)
    procs = (ProcSample(who(1, "alice"), schema.KIND_COMPUTE, None, None),)
    tick = Tick(10_000, 10_000, (GpuSample(gpu, procs=procs),))  # nothing known but the process
    text = Textfile(str(tmp_path / "gua.prom"), users=True).render(tick)
    assert "NaN" not in text and "Inf" not in text
    metrics = parse(text)
    for name in ("gua_gpu_utilization_ratio", "gua_gpu_memory_used_bytes", "gua_gpu_memory_total_bytes",
                 "gua_gpu_power_watts", "gua_gpu_energy_joules_total", "gua_user_gpu_memory_bytes"):
        assert not series(metrics, name), f"{name}: an unknown value is left out"
    assert metrics[("gua_gpu_state", key(gpu="0", state="unknown"))] == 1


def _mig_tick() -> Tick:
    parent = GpuInfo("GPU-A", 0, "A100", 80 * 2**30)
    slots = [GpuInfo(f"MIG-{s}", 0, "A100 3g.40gb", 40 * 2**30, parent_uuid="GPU-A", mig_slot=s) for s in (0, 1)]
    return Tick(10_000, 10_000, (
        GpuSample(parent, mem_used_mib=30_000),
        GpuSample(slots[0], mem_used_mib=20_000, procs=(ProcSample(who(1, "alice"), 1, 20_000, None),)),
        GpuSample(slots[1], mem_used_mib=10_000, procs=(ProcSample(who(2, "bob"), 1, 10_000, None),)),
        GpuSample(GpuInfo("GPU-B", 1, "H100", 80 * 2**30), util_permille=0, mem_used_mib=0),
    ))


def test_mig_instances_never_add_to_their_parent(tmp_path: Path) -> None:
    """sum by (gpu) over any gua_gpu_* family sees physical cards only; instances have their own families."""
    metrics = parse(Textfile(str(tmp_path / "gua.prom"), users=True).render(_mig_tick()))
    per_gpu: dict[str, float] = {}
    for labels, value in series(metrics, "gua_gpu_memory_used_bytes").items():
        per_gpu[dict(labels)["gpu"]] = per_gpu.get(dict(labels)["gpu"], 0) + value
    assert per_gpu == {"0": 30_000 * 2**20, "1": 0}, "the parent's memory counted once"
    assert all(not name.startswith("gua_gpu_") or "mig" not in dict(labels) for name, labels in metrics)
    assert series(metrics, "gua_mig_memory_used_bytes") == {
        key(gpu="0", mig="0"): 20_000 * 2**20, key(gpu="0", mig="1"): 10_000 * 2**20}
    assert metrics[("gua_mig_info", key(gpu="0", mig="1", uuid="MIG-1", name="A100 3g.40gb"))] == 1
    assert len(series(metrics, "gua_gpu_info")) == 2
    # Users on an instance carry its slot; their SM is unknown there, so never idle-held.
    assert metrics[("gua_user_gpu_memory_bytes", key(gpu="0", mig="1", user="bob"))] == 10_000 * 2**20
    assert metrics[("gua_user_idle_held", key(gpu="0", mig="1", user="bob"))] == 0


def test_user_names_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "gua.prom"
    Textfile(str(path)).publish(_lab_tick())
    text = path.read_text()
    assert "user=" not in text and not any(u in text for u in ("alice", "bob", "carol"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    Textfile(str(path), users=True).publish(_lab_tick())
    assert 'user="bob"' in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640, "names users: not world-readable"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown of a directory to another group needs root")
def test_private_file_takes_a_setgid_directory_s_group(tmp_path: Path) -> None:
    """How node_exporter's user gets to read a 0640 file the collector (another user) writes."""
    other = next(g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getegid())
    directory = tmp_path / "textfile"
    directory.mkdir()
    os.chown(directory, -1, other)
    directory.chmod(0o2750)
    Textfile(str(directory / "gua.prom"), users=True).publish(_lab_tick())
    info = (directory / "gua.prom").stat()
    assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (other, 0o640)


def test_counters_for_alerts(tmp_path: Path) -> None:
    """Idle-held seconds per GPU and per user, and NVML errors, count up across ticks."""
    text = Textfile(str(tmp_path / "gua.prom"), users=True, interval_s=10, version="9.9", backend="simulate:lab")
    idle = GpuSample(GpuInfo("GPU-0", 0, "T", None), util_permille=0, procs=(ProcSample(who(1, "bob"), 1, 8_000, 0),))
    lost = GpuSample(GpuInfo("GPU-0", 0, "T", None), status=schema.STATUS_LOST, error="GPU is lost")
    text.render(Tick(100_000, 0, (idle,)))
    text.render(Tick(110_000, 10_000, (idle,)))
    text.render(Tick(120_000, 10_000, (lost,)))
    metrics = parse(text.render(Tick(130_000, 10_000, (idle,))))
    assert metrics[("gua_gpu_state_seconds_total", key(gpu="0", state="idle_held"))] == 20
    assert metrics[("gua_gpu_state_seconds_total", key(gpu="0", state="unknown"))] == 10
    assert metrics[("gua_gpu_nvml_errors_total", key(gpu="0"))] == 1
    assert metrics[("gua_user_idle_held_seconds_total", key(gpu="0", user="bob"))] == 20
    assert metrics[("gua_user_held_seconds_total", key(gpu="0", user="bob"))] == 20
    assert metrics[("gua_collector_last_tick_timestamp_seconds", key())] == 130
    assert metrics[("gua_collector_start_time_seconds", key())] == 100
    assert metrics[("gua_collector_interval_seconds", key())] == 10
    assert metrics[("gua_collector_info", key(version="9.9", backend="simulate:lab"))] == 1


def test_a_user_s_counters_stay_after_their_processes_leave(tmp_path: Path) -> None:
    """A counter that vanishes and comes back reads as a reset; keep it for the collector's life."""
    text = Textfile(str(tmp_path / "gua.prom"), users=True)
    held = GpuSample(GpuInfo("GPU-0", 0, "T", None), util_permille=0, procs=(ProcSample(who(1, "bob"), 1, 8_000, 0),))
    text.render(Tick(10_000, 10_000, (held,)))
    metrics = parse(text.render(Tick(20_000, 10_000, (GpuSample(GpuInfo("GPU-0", 0, "T", None), util_permille=0),))))
    assert metrics[("gua_user_idle_held_seconds_total", key(gpu="0", user="bob"))] == 10
    assert ("gua_user_idle_held", key(gpu="0", user="bob")) not in metrics, "the gauge says what holds now"


def test_invalidate_leaves_only_the_collector_s_own_series(tmp_path: Path) -> None:
    path = tmp_path / "gua.prom"
    text = Textfile(str(path), users=True, interval_s=10)
    text.publish(_lab_tick())
    text.invalidate()
    metrics = parse(path.read_text())
    assert {name for name, _ in metrics} == {
        "gua_collector_info", "gua_collector_start_time_seconds", "gua_collector_interval_seconds",
        "gua_collector_last_tick_timestamp_seconds"}
    assert metrics[("gua_collector_last_tick_timestamp_seconds", key())] == _lab_tick().ts_ms / 1000
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gua.prom"], "replaced, not removed"


def _lab_tick() -> Tick:
    """A real tick of the lab scenario through the sampler (four GPUs, three users)."""
    from gua_collector.sampler import Sampler

    backend = SimBackend("lab", SimClock(1_772_449_200_000))  # a Monday, 11:00 UTC
    backend.init()
    sampler = Sampler(backend)
    sampler.tick(1_772_449_200_000, 0)
    return sampler.tick(1_772_449_210_000, 10_000)


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


class Heard:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, message: str) -> None:
        self.sent.append(message)


def _service(tmp_path: Path, textfile: Textfile, log: io.StringIO, heard: Heard | None = None) -> tuple[Service, Store]:
    clock = SimClock(1_772_438_400_000)
    store = Store.open(str(tmp_path / "gua.db"), now_ms=clock.wall_ms())
    service = Service(
        Settings(interval_s=10, retention_ms=86_400_000, ticks=5), store, SimBackend("lab", clock), clock,
        heard or Heard(), Log(log, journal=False), threading.Event(), None, textfile,
    )
    return service, store


def test_unwritable_textfile_is_logged_once_and_sampling_goes_on(tmp_path: Path) -> None:
    log = io.StringIO()
    service, store = _service(tmp_path, Textfile(str(tmp_path / "missing-dir" / "gua.prom")), log)
    assert service.run() == 0
    store.close()
    assert log.getvalue().count("cannot write") == 1, log.getvalue()
    assert sqlite3.connect(tmp_path / "gua.db").execute("SELECT count(*) FROM tick").fetchone()[0] == 5


def test_status_says_the_textfile_is_not_written(tmp_path: Path) -> None:
    """The stock-Debian failure (a directory gua cannot write) must not hide behind an active unit."""
    heard = Heard()
    service, store = _service(tmp_path, Textfile(str(tmp_path / "missing-dir" / "gua.prom")), io.StringIO(), heard)
    assert service.run() == 0
    store.close()
    statuses = [m for m in heard.sent if m.startswith("STATUS=") and "GPUs" in m]
    assert statuses and all(m.endswith("; textfile not written: No such file or directory") for m in statuses), statuses


def test_status_is_clean_when_the_textfile_is_written(tmp_path: Path) -> None:
    heard = Heard()
    service, store = _service(tmp_path, Textfile(str(tmp_path / "gua.prom")), io.StringIO(), heard)
    assert service.run() == 0
    store.close()
    assert not [m for m in heard.sent if "textfile" in m]


def test_clean_stop_invalidates_the_file(tmp_path: Path) -> None:
    """After a stop no GPU or user series stay behind for alerts to fire on."""
    log = io.StringIO()
    service, store = _service(tmp_path, Textfile(str(tmp_path / "gua.prom"), users=True, interval_s=10), log)
    assert service.run() == 0
    store.close()
    names = {name for name, _ in parse((tmp_path / "gua.prom").read_text())}
    assert "gua_collector_last_tick_timestamp_seconds" in names
    assert not {n for n in names if n.startswith(("gua_gpu_", "gua_user_", "gua_mig_"))}


def test_textfile_option(tmp_path: Path) -> None:
    proc = run_collector("--db", str(tmp_path / "gua.db"), "--backend", "simulate", "--ticks", "1",
                         "--textfile", str(tmp_path / "gua.txt"))
    assert proc.returncode == 2 and "must end in .prom" in proc.stderr
    proc = run_collector("--db", str(tmp_path / "gua.db"), "--backend", "simulate", "--ticks", "1",
                         "--textfile", str(tmp_path / "gua.prom"), "--textfile-users", "maybe")
    assert proc.returncode == 2 and "textfile_users must be on or off" in proc.stderr
    proc = run_collector("--db", str(tmp_path / "gua.db"), "--backend", "simulate:lab", "--ticks", "3",
                         "--textfile", str(tmp_path / "gua.prom"), "--textfile-users", "on")
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "gua.prom"
    metrics = parse(path.read_text())
    assert ("gua_collector_info", key(version=_version(), backend="simulate:lab")) in metrics
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    config = tmp_path / "gua.conf"
    config.write_text(f"[collector]\ntextfile = {path}\ntextfile_users = off\n")
    proc = run_collector("--config", str(config), "--db", str(tmp_path / "gua.db"), "--backend", "simulate:lab",
                         "--ticks", "3")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def _version() -> str:
    from gua_collector import __version__

    return __version__


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
    textfile = Textfile(str(path))
    textfile.publish(_one_gpu_tick())
    assert victim.read_bytes() == b"SQLite format 3\x00precious"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o640
    _assert_published(path)
    assert sorted(p.name for p in exporter.iterdir()) == ["gua.prom"]
    path.unlink()
    path.symlink_to(victim)
    textfile.invalidate()  # the stop path writes the same way
    assert victim.read_bytes() == b"SQLite format 3\x00precious"
    _assert_published(path)


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


# --- gua-collector --check: can the service write it, can node_exporter read it ------------------

@pytest.fixture
def open_base(shared_dir: str) -> Path:
    """A directory every user may enter (pytest's tmp_path is 0700)."""
    return Path(shared_dir)


def _reader() -> tuple[str, int]:
    """A real non-root account to play node_exporter's user, and its primary group."""
    import pwd

    for name in ("nobody", "daemon"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != os.geteuid():
            return name, entry.pw_gid
    pytest.skip("no account to play node_exporter's user")


def _exporter_check(textfile: Path, exporter: Path, users: bool = False, service_user: str | None = None):
    import pwd

    from gua_collector.check import Host, run_checks

    me = pwd.getpwuid(os.geteuid()).pw_name
    host = Host(clock_synchronised=lambda: True, service_user=service_user or me, exporter_user=_reader()[0],
                exporter_dir=str(exporter))
    findings = run_checks(str(textfile.parent / "gua.db"), 10_000, str(textfile), SimBackend("lab", SimClock(0)), 0,
                          host, textfile_users=users)
    return {f.subject: f for f in findings}


def _packaged_layout(base: Path, users: bool = False) -> tuple[Path, Path]:
    """/run/gua-collector and node-exporter's directory with the deb's link, under base."""
    run = base / "run" / "gua-collector"
    run.mkdir(parents=True)
    run.chmod(0o755)
    (base / "run").chmod(0o755)
    exporter = base / "node-exporter"
    exporter.mkdir()
    (exporter / "gua.prom").symlink_to(run / "gua.prom")
    Textfile(str(run / "gua.prom"), users=users).publish(_one_gpu_tick())
    return run / "gua.prom", exporter


def test_check_passes_the_packaged_layout(open_base: Path) -> None:
    textfile, exporter = _packaged_layout(open_base)
    found = _exporter_check(textfile, exporter)
    assert found["textfile"].level == "OK"
    assert found["node_exporter"].level == "OK", found["node_exporter"]
    assert str(exporter / "gua.prom") in found["node_exporter"].detail


def test_check_finds_the_state_directory_closed_to_node_exporter(open_base: Path) -> None:
    """/var/lib/gua is 0750: a textfile there is never read, whatever the file's mode."""
    state = open_base / "gua"
    state.mkdir(mode=0o750)
    state.chmod(0o750)
    exporter = open_base / "node-exporter"
    exporter.mkdir()
    found = _exporter_check(state / "gua.prom", exporter)["node_exporter"]
    assert found.level == "WARN" and f"cannot enter {state}" in found.detail, found
    assert "/run/gua-collector/gua.prom" in found.fix


def test_check_finds_a_missing_link(open_base: Path) -> None:
    textfile, exporter = _packaged_layout(open_base)
    (exporter / "gua.prom").unlink()
    found = _exporter_check(textfile, exporter)["node_exporter"]
    assert found.level == "WARN" and f"ln -s {textfile} {exporter}/gua.prom" == found.fix, found


def test_check_finds_user_names_node_exporter_cannot_read(open_base: Path) -> None:
    textfile, exporter = _packaged_layout(open_base, users=True)
    found = _exporter_check(textfile, exporter, users=True)["node_exporter"]
    assert found.level == "WARN" and "0640" in found.detail and "setgid" in found.fix, found
    if os.geteuid() == 0:  # the documented fix: the directory setgid, in the exporter's group
        os.chown(textfile.parent, -1, _reader()[1])
        textfile.parent.chmod(0o2750)
        assert _exporter_check(textfile, exporter, users=True)["node_exporter"].level == "OK"


def test_check_fails_the_stock_debian_directory(open_base: Path) -> None:
    """node-exporter's own directory is root's 0755: the service user cannot write there."""
    exporter = open_base / "node-exporter"
    exporter.mkdir()
    exporter.chmod(0o755)
    if os.geteuid() != 0:
        pytest.skip("needs a directory owned by another user than the service's")
    found = _exporter_check(exporter / "gua.prom", exporter, service_user=_reader()[0])["textfile"]
    assert found.level == "FAIL" and "/run/gua-collector/gua.prom" in found.fix, found
