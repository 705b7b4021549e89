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

The tests share one booted container (module scope) and run in file order;
each leaves the collector running except the last ones, which stop it.

Environment knobs:
  GUA_SYSTEST_CACHE    where the debootstrap tree is cached
                       (default /var/cache/gua-systest)
  GUA_SYSTEST_DIST     folder of the .debs (default dist/); packaging/build.sh
                       builds them there when they are missing or older than
                       the sources
  GUA_SYSTEST_REBUILD  set: always run packaging/build.sh first
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nspawn
import rootfs

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

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


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _duration(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how long the whole system test took (module setup to teardown)."""
    started = time.monotonic()
    yield
    _log(request, f"[gua-systest] total system test duration: "
                  f"{time.monotonic() - started:.1f} s")


def _log(request: pytest.FixtureRequest, line: str) -> None:
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


@pytest.fixture(scope="module")
def host_ready() -> None:
    """Skip unless this host can run the system test at all."""
    if os.geteuid() != 0:
        pytest.skip("system test needs root (debootstrap, systemd-nspawn, nsenter)")
    missing = [t for t in ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-deb")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"system test needs {', '.join(missing)} (apt install "
                    "systemd-container debootstrap util-linux dpkg)")
    if not Path("/proc/self/ns/pid").exists():
        pytest.skip("no pid namespaces on this host")


@pytest.fixture(scope="module")
def debs(host_ready: None, request: pytest.FixtureRequest) -> list[Path]:
    """The gua-collector and gua-report .debs, built with packaging/build.sh
    when dist/ lacks them or they are older than the sources (or
    GUA_SYSTEST_REBUILD is set). A failing build is a product failure."""

    def newest(name: str) -> Path | None:
        found = sorted(DIST.glob(f"{name}_*_all.deb"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def stale(deb: Path | None) -> bool:
        """No deb, or a source file changed after it was built."""
        if deb is None:
            return True
        built = deb.stat().st_mtime
        for top in SOURCES:
            for path in [top] if top.is_file() else top.rglob("*"):
                if "__pycache__" not in path.parts and path.is_file() \
                        and path.stat().st_mtime > built:
                    return True
        return False

    wanted = ("gua-collector", "gua-report")
    if os.environ.get("GUA_SYSTEST_REBUILD") or any(stale(newest(n)) for n in wanted):
        script = REPO / "packaging" / "build.sh"
        if not script.exists():
            pytest.fail(f"{script} is missing and dist/ has no gua .debs; "
                        "cannot install the product")
        if shutil.which("dpkg-buildpackage") is None:
            pytest.skip("dpkg-buildpackage missing (apt install dpkg-dev debhelper "
                        "dh-python pybuild-plugin-pyproject) to build the .debs")
        _log(request, f"[gua-systest] building packages: {script}")
        started = time.monotonic()
        result = subprocess.run(["bash", str(script)], cwd=REPO,
                                env=dict(os.environ, GUA_DIST=str(DIST)),
                                capture_output=True, text=True, timeout=600)
        # Exit 3 means built but lintian complained: the packaging test's
        # business, not a reason to skip running the packages here.
        assert result.returncode in (0, 3), (
            f"packaging/build.sh failed (exit {result.returncode}):\n"
            f"{(result.stdout + result.stderr)[-4000:]}")
        _log(request, f"[gua-systest] packages built in {time.monotonic() - started:.1f} s"
                      + (" (lintian complained: see dist/lintian.txt)"
                         if result.returncode == 3 else ""))
    paths = [newest(n) for n in wanted]
    assert all(paths), f"packaging/build.sh did not produce {wanted} in {DIST}: " \
        f"{sorted(p.name for p in DIST.glob('*'))}"
    return [p for p in paths if p is not None]


@pytest.fixture(scope="module")
def container(host_ready: None, debs: list[Path],
              request: pytest.FixtureRequest) -> Iterator[nspawn.Container]:
    """A freshly booted copy of the cached root; always powered off after."""
    try:
        extra = rootfs.deb_dependencies(debs)
        cached = rootfs.cached_root(extra, log=lambda s: _log(request, s))
    except rootfs.RootfsUnavailable as exc:
        pytest.skip(f"cannot build the Debian root: {exc}")
    for stale in rootfs.remove_stale_copies():
        _log(request, f"[gua-systest] removed {stale} left by an aborted run")
    root = rootfs.fresh_copy(cached)
    box = nspawn.Container(root, root.with_name(root.name + ".console.log"))
    # Belt and braces: should pytest die without running finalizers (e.g.
    # a second Ctrl-C), the interpreter's exit still powers the container off.
    atexit.register(box.shutdown)
    try:
        try:
            started = time.monotonic()
            state = box.boot()
        except nspawn.BootFailed as exc:
            pytest.skip(f"systemd-nspawn cannot boot a container here: {exc}")
        _log(request, f"[gua-systest] container booted in "
                      f"{time.monotonic() - started:.2f} s ({state})")
        yield box
    finally:
        box.shutdown()
        atexit.unregister(box.shutdown)
        rootfs.remove_copy(root)
        box.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def installed(container: nspawn.Container, debs: list[Path]) -> nspawn.Container:
    """The .debs installed with dpkg in the running container, the test
    config in place, users admin1 (group gua) and outsider1 created."""
    incoming = container.path("/root/gua-debs")
    incoming.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        shutil.copy2(deb, incoming / deb.name)
    # The drop-in goes in first: it only shortens the watchdog.
    dropin = container.path(DROPIN)
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(DROPIN_TEXT)
    names = " ".join(f"/root/gua-debs/{d.name}" for d in debs)
    result = container.run(f"DEBIAN_FRONTEND=noninteractive dpkg -i {names}", timeout=180)
    if result.returncode != 0:
        pytest.fail(f"dpkg -i of the gua packages failed in the container "
                    f"(exit {result.returncode}):\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-3000:]}")
    container.path(CONF).write_text(collector_conf("simulate:lab"))
    container.run(["systemctl", "daemon-reload"], check=True)
    container.run(["useradd", "-m", "-G", "gua", ADMIN], check=True)
    container.run(["useradd", "-m", OUTSIDER], check=True)
    return container


def db_facts(box: nspawn.Container) -> dict[str, Any]:
    """integrity_check, tick count and the runs, read as root (read-only)."""
    script = f"""
import json, sqlite3
con = sqlite3.connect("file:{DB}?mode=ro", uri=True)
out = {{
    "integrity": [r[0] for r in con.execute("PRAGMA integrity_check")],
    "user_version": con.execute("PRAGMA user_version").fetchone()[0],
    "ticks": con.execute("SELECT count(*) FROM tick").fetchone()[0],
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
