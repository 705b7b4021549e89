"""gua-collector --check: one line per fact about this host, exit 0 unless something FAILs."""

from __future__ import annotations

import os
import pwd
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from collector_helpers import clean_env, collector_cmd, run_collector
from gua_collector import check
from gua_collector.backend import BackendInitError
from gua_collector.check import FAIL, OK, WARN, Host, run_checks
from gua_collector.clock import RealClock
from gua_collector.simulate import SimBackend

pytestmark = pytest.mark.timeout(60)
ME = pwd.getpwuid(os.geteuid()).pw_name
NOW = RealClock().wall_ms()


def host(tmp_path: Path | None = None, synced: bool | None = True, proc_root: str = "/proc") -> Host:
    return Host(proc_root=proc_root, clock_synchronised=lambda: synced, service_user=ME)


def levels(findings: list[check.Finding]) -> dict[str, str]:
    return {f.subject: f.level for f in findings}


def checks(db: Path, backend=None, textfile: str = "", **host_kw) -> list[check.Finding]:
    backend = backend or SimBackend("lab", RealClock())
    return run_checks(str(db), 10_000, textfile, backend, RealClock().wall_ms(), host(**host_kw))


def test_healthy_host_with_a_fresh_directory_passes(tmp_path: Path) -> None:
    found = levels(checks(tmp_path / "gua.db"))
    assert found["NVML"] == OK and found["GPU 0"] == OK and found["GPU 3"] == OK
    assert found["database"] == OK and found["clock"] == OK
    assert FAIL not in found.values()


def test_cli_exit_status_and_lines(tmp_path: Path) -> None:
    good = run_collector("--check", "--backend", "simulate:lab", "--db", str(tmp_path / "gua.db"))
    assert good.returncode == 0, good.stdout + good.stderr
    assert not (tmp_path / "gua.db").exists(), "--check creates nothing"
    assert all(len(line) <= 80 for line in good.stdout.splitlines()), good.stdout
    bad = run_collector("--check", "--backend", "simulate:lab", "--db", str(tmp_path / "missing" / "gua.db"))
    assert bad.returncode == 10, bad.stdout
    assert "FAIL  database: directory" in bad.stdout and "fix: " in bad.stdout
    assert run_collector("--check", "--ticks", "3", "--backend", "simulate").returncode == 2


class NoDriver(SimBackend):
    def init(self) -> None:
        raise BackendInitError("NVML init failed: Driver Not Loaded")


def test_missing_driver_fails_with_the_fix(tmp_path: Path) -> None:
    found = checks(tmp_path / "gua.db", backend=NoDriver("lab", RealClock()))
    nvml = next(f for f in found if f.subject == "NVML")
    assert nvml.level == FAIL and "Driver Not Loaded" in nvml.detail and "driver" in nvml.fix


def test_gpm_is_said_but_never_a_warning(tmp_path: Path) -> None:
    found = {f.subject: f for f in checks(tmp_path / "gua.db", backend=SimBackend("gpm", RealClock()))}
    assert "GPM SM activity" in found["GPU 0"].detail and "not offered" not in found["GPU 0"].detail
    assert "GPM SM activity not offered" in found["GPU 2"].detail and found["GPU 2"].level == OK


def test_mig_and_missing_capabilities_are_reported(tmp_path: Path) -> None:
    found = checks(tmp_path / "gua.db", backend=SimBackend("mig", RealClock()))
    gpu0 = next(f for f in found if f.subject == "GPU 0")
    assert "MIG on" in gpu0.detail and gpu0.level == OK


def test_database_modes_owner_schema_and_writer(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    assert run_collector("--db", str(db), "--backend", "simulate", "--ticks", "3").returncode == 0
    found = {f.subject: f for f in checks(db)}
    assert found["database"].level == OK and "0640" in found["database"].detail
    assert found["schema"].level == OK
    assert found["collector"].level == WARN and "none is writing" in found["collector"].detail
    os.chmod(db, 0o644)
    assert levels(checks(db))["database"] == WARN
    os.chmod(db, 0o640)
    if os.geteuid() == 0:
        os.chown(db, 54321, 0)
        assert levels(checks(db))["database"] == FAIL, "the service user could not write it"
        os.chown(db, 0, 0)
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {check.schema.SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    assert levels(checks(db))["schema"] == FAIL


def test_foreign_database_fails(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    assert levels(checks(db))["schema"] == FAIL


def test_running_collector_is_seen_through_its_lock(tmp_path: Path) -> None:
    db = tmp_path / "gua.db"
    proc = subprocess.Popen(collector_cmd("--db", str(db), "--backend", "simulate:lab", "--interval", "1s"),
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        found = {}
        while time.monotonic() < deadline:
            found = {f.subject: f for f in run_checks(str(db), 1000, "", SimBackend("lab", RealClock()),
                                                       RealClock().wall_ms(), host())}
            if found.get("collector") and found["collector"].level == OK:
                break
            time.sleep(0.3)
        assert found["collector"].level == OK and "recording" in found["collector"].detail, found.get("collector")
        # The check's own look at the file must not disturb the writer's locks.
        time.sleep(1.5)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_hidepid_proc_is_a_warning(tmp_path: Path) -> None:
    fake = tmp_path / "proc" / "self"
    fake.mkdir(parents=True)
    (fake / "mountinfo").write_text("23 28 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw,hidepid=2\n")
    found = {f.subject: f for f in checks(tmp_path / "gua.db", proc_root=str(tmp_path / "proc"))}
    assert found["/proc"].level == WARN and "hidepid=2" in found["/proc"].detail and "gid=" in found["/proc"].fix


def test_child_process_lists_are_checked(tmp_path: Path) -> None:
    """This kernel lists each thread's children (DataLoader workers' CPU counts); one that does not is a warning."""
    assert levels(checks(tmp_path / "gua.db"))["process CPU"] == OK
    task = tmp_path / "proc" / "self" / "task" / "42"
    task.mkdir(parents=True)
    (tmp_path / "proc" / "self" / "mountinfo").write_text("23 28 0:21 / /proc rw - proc proc rw\n")
    found = {f.subject: f for f in checks(tmp_path / "gua.db", proc_root=str(tmp_path / "proc"))}
    assert found["process CPU"].level == WARN and "CONFIG_PROC_CHILDREN" in found["process CPU"].fix
    (task / "children").write_text("")
    assert levels(checks(tmp_path / "gua.db", proc_root=str(tmp_path / "proc")))["process CPU"] == OK


def test_textfile_directory_and_clock(tmp_path: Path) -> None:
    found = levels(checks(tmp_path / "gua.db", textfile=str(tmp_path / "nowhere" / "gua.prom"), synced=False))
    assert found["textfile"] == FAIL and found["clock"] == WARN
    found = levels(checks(tmp_path / "gua.db", textfile=str(tmp_path / "gua.prom"), synced=None))
    assert found["textfile"] == OK and found["clock"] == WARN

