"""System test: the gua packages under a real systemd (systemd-nspawn).

A minimal Debian 12 (cached debootstrap, see rootfs.py) is booted with
systemd-nspawn (see nspawn.py); the built gua-collector and gua-report
.debs are installed into the running system with dpkg, the collector runs
the simulated backend, and the tests drive it with systemctl, journalctl
and gua-report exactly as an admin would.

Run as root:  python -m pytest -m system -v -rs
Skips (with the reason) when not root, when a tool is missing, when the
root file system cannot be built or when nspawn cannot boot on this host.
Anything the product does wrong fails.

The tests share one booted container (module scope, fixtures in
conftest.py) and run in file order; each leaves the collector running
except the last ones, which stop it. test_faults.py boots its own.

Environment knobs:
  GUA_SYSTEST_CACHE    where the debootstrap tree is cached
                       (default /var/cache/gua-systest)
  GUA_SYSTEST_DIST     folder of the .debs (default dist/); packaging/build.sh
                       builds them there when they are missing or older than
                       the sources
  GUA_SYSTEST_REBUILD  set: always run packaging/build.sh first
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import nspawn
import pytest
from systest import ADMIN, CONF, DB, OUTSIDER, PERMISSION_DENIED_EXIT, UNIT, collector_conf, db_facts, journal, service_state

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]


# ------------------------------------------------------------------- tests
def test_harness_runs_a_notify_unit(container: nspawn.Container) -> None:
    """The harness itself: a throw-away Type=notify unit becomes active via
    READY=1 and shows its STATUS=. Proves the environment before the product."""
    unit = container.path("/etc/systemd/system/gua-systest-probe.service")
    unit.write_text(
        "[Service]\nType=notify\nNotifyAccess=main\n"
        "ExecStart=/usr/bin/python3 -c 'import sdnotify, time; "
        "sdnotify.SystemdNotifier().notify(\"READY=1\\\\nSTATUS=probe ok\"); "
        "time.sleep(3600)'\n"
    )
    container.run(["systemctl", "daemon-reload"], check=True)
    result = container.run(["systemctl", "start", "gua-systest-probe"], timeout=30)
    state = container.show("gua-systest-probe.service", "ActiveState", "SubState",
                           "StatusText")
    container.run(["systemctl", "stop", "gua-systest-probe"])
    assert result.returncode == 0 and state["ActiveState"] == "active", (
        f"a trivial Type=notify unit did not start under nspawn: {state}; "
        f"{result.stderr}\n"
        + container.run("journalctl -u gua-systest-probe --no-pager | tail -20").stdout)
    assert state["StatusText"] == "probe ok", state


def test_package_install_leaves_service_disabled(installed: nspawn.Container) -> None:
    """dpkg -i under a running systemd: unit known, gua user and group made,
    service installed disabled (the unit file says so) and not started."""
    box = installed
    enabled = box.run(["systemctl", "is-enabled", UNIT]).stdout.strip()
    active = box.run(["systemctl", "is-active", UNIT]).stdout.strip()
    assert enabled == "disabled", f"after dpkg -i, is-enabled says {enabled!r}"
    assert active == "inactive", f"after dpkg -i, is-active says {active!r}"
    ident = box.run(["id", "gua"])
    assert ident.returncode == 0, f"no gua user after install: {ident.stderr}"
    for tool in ("/usr/bin/gua-collector", "/usr/bin/gua-report"):
        assert box.path(tool).exists(), f"{tool} not installed"


def test_enable_now_reaches_running_via_ready(installed: nspawn.Container) -> None:
    """systemctl enable --now blocks until READY=1 and the unit is running."""
    box = installed
    started = time.monotonic()
    result = box.run(["systemctl", "enable", "--now", UNIT], timeout=90)
    took = time.monotonic() - started
    state = service_state(box)
    assert result.returncode == 0, (
        f"systemctl enable --now {UNIT} exited {result.returncode}: {result.stderr}\n"
        f"{state}\n{journal(box)[-3000:]}")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), (
        f"after enable --now: {state}\n{journal(box)[-3000:]}")
    assert state["Type"] == "notify", state
    assert state["NRestarts"] == "0", f"collector restarted while starting: {state}"
    assert box.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled"
    # The main process runs as the gua system user, not root.
    uid = box.run(["stat", "-c", "%U", f"/proc/{state['MainPID']}"]).stdout.strip()
    assert uid == "gua", f"collector main process runs as {uid!r}, expected gua"
    print(f"enable --now returned after {took:.2f} s")


def test_status_line_shows_collector_summary(installed: nspawn.Container) -> None:
    """STATUS= reaches systemctl: StatusText is a plausible one-line summary."""
    box = installed
    values = box.wait_for(UNIT, lambda v: v["StatusText"] != "", ["StatusText"],
                          timeout=10, what="a non-empty StatusText")
    text = values["StatusText"]
    print(f"StatusText: {text!r}")
    assert re.search(r"gpu", text, re.I), f"StatusText does not mention GPUs: {text!r}"
    assert "\n" not in text and len(text) < 300, f"StatusText not one short line: {text!r}"
    status = box.run(["systemctl", "status", "--no-pager", "-n", "0", UNIT]).stdout
    assert f"Status: \"{text}\"" in status or text in status, (
        f"systemctl status does not show the STATUS= line:\n{status}")


def test_state_directory_and_db_permissions(installed: nspawn.Container) -> None:
    """/var/lib/gua is 0750 gua:gua and the DB 0640 gua:gua (group reads)."""
    box = installed
    out = box.run(["stat", "-c", "%a %U %G %n", "/var/lib/gua", DB], check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("750 gua gua"), f"state dir: {lines[0]}"
    assert lines[1].startswith("640 gua gua"), f"database: {lines[1]}"


def test_second_collector_refuses_to_start(installed: nspawn.Container) -> None:
    """One writer: a second gua-collector on the same DB exits with an error
    instead of double-counting (it holds a lock next to the DB)."""
    box = installed
    result = box.run(["timeout", "20", "runuser", "-u", "gua", "--", "gua-collector",
                      "--backend", "simulate:lab", "--interval", "1s"], timeout=30)
    assert result.returncode not in (0, 124), (
        f"a second gua-collector on {DB} did not refuse to start "
        f"(exit {result.returncode}; 124 = still running after 20 s):\n"
        f"{result.stderr[-2000:]}")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip(), "the second collector exited without saying why"
    print(f"second collector: exit {result.returncode}: {result.stderr.strip()[-300:]}")
    state = service_state(box)
    assert (state["SubState"], state["NRestarts"]) == ("running", "0"), (
        f"the service suffered from the second collector: {state}")


def test_report_as_gua_group_member(installed: nspawn.Container) -> None:
    """An admin in group gua gets a report while the collector writes."""
    box = installed
    # A few ticks so the report has something to say.
    deadline = time.monotonic() + 15
    while db_facts(box)["ticks"] < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    result = box.run(["runuser", "-u", ADMIN, "--", "gua-report", "--since", "1h"])
    assert result.returncode == 0, (
        f"gua-report as {ADMIN} (group gua) exited {result.returncode}:\n"
        f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}")
    assert result.stdout.strip(), "gua-report printed nothing"
    print(result.stdout)
    assert "Traceback" not in result.stderr, result.stderr
    as_json = box.run(["runuser", "-u", ADMIN, "--", "gua-report", "--since", "1h",
                       "--format", "json"])
    assert as_json.returncode == 0, (
        f"gua-report --format json exited {as_json.returncode}: {as_json.stderr}")
    try:
        json.loads(as_json.stdout)
    except ValueError as exc:
        raise AssertionError(f"gua-report --format json is not JSON ({exc}):\n"
                             f"{as_json.stdout[:1000]}") from None


def test_check_after_install(installed: nspawn.Container) -> None:
    """gua-collector --check, as an admin runs it after installing: the database
    is gua's and 0640, the running collector is seen through its lock, nothing FAILs."""
    box = installed
    result = box.run(["gua-collector", "--check", "--backend", "simulate:lab"])
    print(result.stdout)
    assert result.returncode == 0, f"--check exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert "FAIL" not in result.stdout and "Traceback" not in result.stderr
    assert re.search(r"^OK +database: /var/lib/gua/gua.db, owner gua, mode 0640", result.stdout, re.M), result.stdout
    assert re.search(r"^OK +collector: running and recording", result.stdout, re.M), result.stdout
    as_admin = box.run(["runuser", "-u", ADMIN, "--", "gua-collector", "--check", "--backend", "simulate:lab"])
    assert as_admin.returncode == 0 and "OK    schema: version" in as_admin.stdout, (
        f"--check as a gua group member: exit {as_admin.returncode}\n{as_admin.stdout}\n{as_admin.stderr}")


def test_now_as_gua_group_member(installed: nspawn.Container) -> None:
    """gua-report now and its --check mode, as an admin in group gua, while the collector records."""
    box = installed
    result = box.run(["runuser", "-u", ADMIN, "--", "gua-report", "now"])
    print(result.stdout)
    assert result.returncode == 0, f"gua-report now exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert "GPUS" in result.stdout and "Traceback" not in result.stderr
    check = box.run(["runuser", "-u", ADMIN, "--", "gua-report", "now", "--check", "--warn", "2h", "--crit", "8h"])
    print(check.stdout)
    assert check.returncode in (0, 1, 2), f"--check said UNKNOWN or worse: {check.returncode}\n{check.stdout}{check.stderr}"
    assert len(check.stdout.strip().splitlines()) == 1 and check.stdout.startswith("GUA ") and " | " in check.stdout


def test_report_outside_group_is_denied(installed: nspawn.Container) -> None:
    """A user outside group gua gets a one-line permission error, exit 4."""
    box = installed
    result = box.run(["runuser", "-u", OUTSIDER, "--", "gua-report", "--since", "1h"])
    assert result.returncode == PERMISSION_DENIED_EXIT, (
        f"gua-report as {OUTSIDER} (not in group gua) exited {result.returncode}, "
        f"expected {PERMISSION_DENIED_EXIT}:\nstdout: {result.stdout[-1000:]}\n"
        f"stderr: {result.stderr[-1000:]}")
    assert re.search(r"\bgua\b", result.stderr) and "group" in result.stderr.lower(), (
        f"permission error does not name the gua group: {result.stderr!r}")
    print(f"outside the group: exit {result.returncode}: {result.stderr.strip()}")
    assert "Traceback" not in result.stderr, result.stderr


def test_watchdog_restarts_hung_collector(installed: nspawn.Container) -> None:
    """With simulate:hang a backend call never returns; the collector stops
    pinging and systemd's watchdog (WatchdogSec=6s here) kills and restarts it."""
    box = installed
    before = int(service_state(box)["NRestarts"])
    since = box.run(["date", "+%Y-%m-%d %H:%M:%S"], check=True).stdout.strip()
    box.path(CONF).write_text(collector_conf("simulate:hang", "1s"))
    try:
        box.run(["systemctl", "restart", UNIT], check=True, timeout=60)
        box.wait_for(UNIT, lambda v: int(v["NRestarts"]) > before, ["NRestarts"],
                     timeout=45, what="a watchdog restart (NRestarts to increase)")
        log = journal(box, since)
        assert "Watchdog timeout" in log, (
            f"NRestarts rose but the journal shows no 'Watchdog timeout':\n{log[-3000:]}")
        print("\n".join(line for line in log.splitlines() if "systemd[1]" in line))
        # The unit sets PYTHONFAULTHANDLER: SIGABRT from the watchdog dumps
        # the stack of the hung call into the journal.
        assert "most recent call first" in log, (
            f"no faulthandler stack dump in the journal after the watchdog kill:\n"
            f"{log[-3000:]}")
    finally:
        box.path(CONF).write_text(collector_conf("simulate:lab"))
        box.run(["systemctl", "reset-failed", UNIT])
        box.run(["systemctl", "restart", UNIT], timeout=60)
    state = box.wait_for(UNIT, lambda v: v["SubState"] == "running",
                         ["ActiveState", "SubState"], timeout=30,
                         what="running again on simulate:lab")
    assert state["ActiveState"] == "active", state


def test_reinstall_restarts_running_collector(installed: nspawn.Container,
                                             debs: list[Path]) -> None:
    """Upgrade path (dpkg -i over the installed version): a running
    collector is restarted with the new code, the edited conffile is kept
    and the restarted collector appends to the existing DB."""
    box = installed
    before = service_state(box)
    runs_before = len(db_facts(box)["runs"])
    names = " ".join(f"/root/gua-debs/{d.name}" for d in debs)
    result = box.run(f"DEBIAN_FRONTEND=noninteractive dpkg -i {names}", timeout=180)
    assert result.returncode == 0, (
        f"dpkg -i over the installed packages failed (exit {result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    state = box.wait_for(UNIT, lambda v: v["SubState"] == "running",
                         ["ActiveState", "SubState", "MainPID", "NRestarts"],
                         timeout=30, what="running after the reinstall")
    assert state["MainPID"] != before["MainPID"], (
        f"the collector was not restarted by the upgrade (MainPID {state['MainPID']})")
    conf = box.path(CONF).read_text()
    assert "simulate:lab" in conf, f"dpkg replaced the edited {CONF}:\n{conf}"
    deadline = time.monotonic() + 10
    while len(db_facts(box)["runs"]) <= runs_before and time.monotonic() < deadline:
        time.sleep(0.25)
    assert len(db_facts(box)["runs"]) == runs_before + 1, (
        "the restarted collector did not append a run to the existing DB")


def test_stop_is_clean_and_data_intact(installed: nspawn.Container) -> None:
    """systemctl stop: SIGTERM, STOPPING=1, exit 0; the DB is intact, its
    ticks kept, and the run is marked stopped."""
    box = installed
    before = db_facts(box)
    assert before["ticks"] > 0, f"no ticks recorded while running: {before}"
    result = box.run(["systemctl", "stop", UNIT], timeout=60)
    assert result.returncode == 0, f"systemctl stop exited {result.returncode}: {result.stderr}"
    state = service_state(box)
    assert state["ActiveState"] == "inactive", (
        f"after systemctl stop the unit is {state['ActiveState']!r}, not inactive "
        f"(a non-zero exit on SIGTERM?): {state}\n{journal(box)[-2000:]}")
    assert state["Result"] == "success", f"stop Result is not success: {state}"
    assert state["ExecMainStatus"] == "0", f"collector exit status on stop: {state}"
    after = db_facts(box)
    assert after["integrity"] == ["ok"], f"PRAGMA integrity_check: {after['integrity']}"
    assert after["ticks"] >= before["ticks"], f"ticks decreased: {before} -> {after}"
    assert after["gpus"] == 4, f"simulate:lab has 4 GPUs, DB has {after['gpus']}"
    last_run = after["runs"][-1]
    print(f"before stop: {before}\nafter stop: {after}")
    assert last_run[2] is not None, f"last run not marked stopped: {after['runs']}"


def test_report_after_stop(installed: nspawn.Container) -> None:
    """The admin can still report once the collector stopped (no -wal left
    for mode=ro; DESIGN.md: the reporter must cope)."""
    box = installed
    active = box.run(["systemctl", "is-active", UNIT]).stdout.strip()
    assert active != "active", f"precondition: the collector should be stopped, is {active!r}"
    result = box.run(["runuser", "-u", ADMIN, "--", "gua-report", "--since", "1h"])
    assert result.returncode == 0, (
        f"gua-report after the collector stopped exited {result.returncode}:\n"
        f"stderr: {result.stderr[-2000:]}\n"
        + box.run(["ls", "-la", "/var/lib/gua"]).stdout)
    assert result.stdout.strip(), "gua-report printed nothing after stop"
    print(result.stdout)
    # The run the watchdog killed has no stop recorded: the report's data
    # quality must count exactly those runs as unclean stops.
    killed = [r for r in db_facts(box)["runs"] if r[2] is None]
    as_json = box.run(["runuser", "-u", ADMIN, "--", "gua-report", "--since", "1h",
                       "--format", "json"])
    assert as_json.returncode == 0, f"gua-report --format json: {as_json.stderr}"
    quality = json.loads(as_json.stdout).get("data_quality", {})
    assert killed, "expected the watchdog-killed run to have no stop recorded"
    assert quality.get("unclean_stops") == len(killed), (
        f"report counts {quality.get('unclean_stops')} unclean stops, the DB has "
        f"{len(killed)} runs without a stop ({killed})")


def test_remove_and_purge_keep_the_data(installed: nspawn.Container) -> None:
    """dpkg -r stops a running collector and removes the unit, keeping the
    config and data; dpkg -P removes the config but keeps /var/lib/gua and
    the gua user (packaging/README.md: the DB is an audit trail)."""
    box = installed
    box.run(["systemctl", "start", UNIT], check=True, timeout=60)
    result = box.run("DEBIAN_FRONTEND=noninteractive dpkg -r gua-collector", timeout=120)
    assert result.returncode == 0, f"dpkg -r gua-collector failed:\n{result.stdout}{result.stderr}"
    active = box.run(["systemctl", "is-active", UNIT]).stdout.strip()
    assert active in ("inactive", "unknown"), f"after dpkg -r the service is {active!r}"
    assert not box.path("/lib/systemd/system/gua-collector.service").exists(), \
        "unit file still installed after dpkg -r"
    assert box.path(CONF).exists(), f"dpkg -r removed the conffile {CONF}"
    assert box.path(DB).exists(), "dpkg -r removed the database"
    result = box.run("DEBIAN_FRONTEND=noninteractive dpkg -P gua-collector", timeout=120)
    assert result.returncode == 0, f"dpkg -P gua-collector failed:\n{result.stdout}{result.stderr}"
    assert not box.path(CONF).exists(), f"dpkg -P left {CONF}"
    assert box.path(DB).exists(), "dpkg -P deleted the recorded data"
    assert box.run(["id", "gua"]).returncode == 0, "dpkg -P deleted the gua user"
    facts = db_facts(box)
    assert facts["integrity"] == ["ok"], facts


def test_journal_has_no_traceback(installed: nspawn.Container) -> None:
    """Nothing the collector logged over the whole run is a Python traceback."""
    log = journal(installed)
    assert log.strip(), "the collector logged nothing at all"
    assert "Traceback" not in log, (
        "journalctl -u gua-collector contains a Traceback:\n"
        + log[max(0, log.find("Traceback") - 500):][:4000])
