"""System test: the Prometheus textfile with Debian's own prometheus-node-exporter, as installed.

Debian's package runs node_exporter as user prometheus and has it read
/var/lib/prometheus/node-exporter/*.prom, a root:root 0755 directory the
gua service cannot write. This module boots its own container whose root
has prometheus-node-exporter installed by debootstrap (the package's own
postinst, user and enabled unit), installs the gua .debs, and shows:

- the old recipe (textfile in node-exporter's directory, plus the drop-in
  the README used to ask for) fails on every tick, and STATUS and
  gua-collector --check say so while the unit stays active;
- the shipped recipe (textfile = /run/gua-collector/gua.prom; tmpfiles.d
  makes the directory, the deb links the file into node-exporter's) is
  served by the packaged node_exporter, without user names, 0644;
- textfile_users = on with the documented setgid directory is read by
  node_exporter and by no other local account;
- a clean stop leaves the collector's own series only.

The only change to the exporter's configuration is its listen address (a
free loopback port: nspawn shares the host's network) and, to keep it
quick, only the textfile collector.

Run as root:  python -m pytest -m system -v -rs tests/system/test_node_exporter.py
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nspawn
import pytest
from systest import CONF, OUTSIDER, UNIT, booted_container, collector_conf, service_state

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

EXPORTER = "prometheus-node-exporter.service"
EXPORTER_DIR = "/var/lib/prometheus/node-exporter"
TEXTFILE = "/run/gua-collector/gua.prom"
DROPIN = "/etc/systemd/system/gua-collector.service.d/old-recipe.conf"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PORT = _free_port()


@pytest.fixture(scope="module")
def container(host_ready: None, debs: list[Path], request: pytest.FixtureRequest) -> Iterator[nspawn.Container]:
    """conftest's container, from a root that also holds Debian's prometheus-node-exporter."""
    def listen_on_loopback(root: Path) -> None:
        (root / "etc/default/prometheus-node-exporter").write_text(
            f'ARGS="--web.listen-address=127.0.0.1:{PORT} --collector.disable-defaults --collector.textfile"\n')

    yield from booted_container(request, debs, ("prometheus-node-exporter",), listen_on_loopback)


def metrics(box: nspawn.Container) -> str:
    """What the packaged node_exporter serves, fetched inside the container."""
    script = ("import sys, urllib.request; "
              f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{PORT}/metrics', timeout=5).read().decode())")
    result = box.run(["python3", "-c", script], timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for(what: str, probe: Callable[[], object], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def configure(box: nspawn.Container, **keys: str) -> None:
    """The test's collector config plus keys, then a restart."""
    extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
    box.path(CONF).write_text(collector_conf("simulate:lab") + extra)
    box.run(["systemctl", "daemon-reload"], check=True)
    box.run(["systemctl", "restart", UNIT], check=True, timeout=60)


def check_lines(box: nspawn.Container) -> tuple[int, dict[str, str]]:
    """gua-collector --check as root: exit status, and subject -> its line."""
    result = box.run(["gua-collector", "--check"], timeout=60)
    lines: dict[str, str] = {}
    subject = ""
    for line in result.stdout.splitlines():
        match = re.match(r"(OK|WARN|FAIL)\s+([^:]+): ", line)
        if match:
            subject = match.group(2)
            lines[subject] = line
        elif subject and line.startswith(" "):  # wrapped at 80 columns: one finding, fix included
            lines[subject] += " " + line.strip()
    return result.returncode, lines


def stat(box: nspawn.Container, path: str) -> str:
    return box.run(["stat", "-c", "%a %U:%G", path], check=True).stdout.strip()


def test_packaged_node_exporter_runs_as_prometheus(installed: nspawn.Container) -> None:
    box = installed
    wait_for("node_exporter to answer", lambda: box.show(EXPORTER, "ActiveState")["ActiveState"] == "active")
    assert box.show(EXPORTER, "User")["User"] == "prometheus"
    assert stat(box, EXPORTER_DIR) == "755 root:root", "Debian's directory: only root writes it"
    assert stat(box, "/var/lib/prometheus") == "755 prometheus:prometheus", "installing gua left it alone"
    link = box.run(["readlink", f"{EXPORTER_DIR}/gua.prom"], check=True).stdout.strip()
    assert link == TEXTFILE
    assert stat(box, "/run/gua-collector") == "755 gua:gua"
    wait_for("a first scrape", lambda: "node_textfile_scrape_error 0" in metrics(box))


def test_the_old_recipe_fails_visibly(installed: nspawn.Container) -> None:
    """textfile in node-exporter's directory (with the drop-in the README asked for): Permission denied."""
    box = installed
    dropin = box.path(DROPIN)
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(f"[Service]\nReadWritePaths={EXPORTER_DIR}\n")
    try:
        configure(box, textfile=f"{EXPORTER_DIR}/old.prom")
        wait_for("STATUS to name the failure",
                 lambda: "textfile not written" in service_state(box)["StatusText"])
        state = service_state(box)
        assert state["ActiveState"] == "active", state
        assert state["StatusText"].endswith("; textfile not written: Permission denied"), state
        code, lines = check_lines(box)
        assert code == 10 and lines["textfile"].startswith("FAIL"), lines
        assert "gua cannot write /var/lib/prometheus/node-exporter" in lines["textfile"]
    finally:
        dropin.unlink()


def test_the_shipped_recipe_reaches_node_exporter(installed: nspawn.Container) -> None:
    box = installed
    configure(box, textfile=TEXTFILE)
    wait_for("gua series from node_exporter", lambda: "gua_gpu_info{" in metrics(box))
    served = metrics(box)
    assert "node_textfile_scrape_error 0" in served
    assert len(re.findall(r"^gua_gpu_info\{", served, re.M)) == 4
    assert "user=" not in served, "no user names by default"
    assert stat(box, TEXTFILE) == "644 gua:gua"
    assert "textfile not written" not in service_state(box)["StatusText"]
    code, lines = check_lines(box)
    assert lines["textfile"].startswith("OK") and lines["node_exporter"].startswith("OK"), lines
    assert f"as {EXPORTER_DIR}/gua.prom" in lines["node_exporter"]


def test_user_names_for_node_exporter_only(installed: nspawn.Container) -> None:
    """textfile_users = on, with the directory setgid prometheus as gua-collector(8) says."""
    box = installed
    shipped = box.path("/usr/lib/tmpfiles.d/gua.conf").read_text()
    override = shipped.replace("d /run/gua-collector 0755 gua gua -", "d /run/gua-collector 2750 gua prometheus -")
    assert override != shipped
    box.path("/etc/tmpfiles.d/gua.conf").write_text(override)
    box.run(["systemd-tmpfiles", "--create", "gua.conf"], check=True)
    configure(box, textfile=TEXTFILE, textfile_users="on")
    wait_for("per-user series from node_exporter", lambda: 'user="bob"' in metrics(box))
    assert "node_textfile_scrape_error 0" in metrics(box)
    assert stat(box, TEXTFILE) == "640 gua:prometheus"
    outsider = box.run(["runuser", "-u", OUTSIDER, "--", "cat", TEXTFILE])
    assert outsider.returncode != 0 and "Permission denied" in outsider.stderr, outsider
    code, lines = check_lines(box)
    assert lines["node_exporter"].startswith("OK"), lines


def test_a_clean_stop_leaves_no_gpu_series(installed: nspawn.Container) -> None:
    box = installed
    box.run(["systemctl", "stop", UNIT], check=True, timeout=60)
    served = metrics(box)
    assert "node_textfile_scrape_error 0" in served
    assert "gua_collector_last_tick_timestamp_seconds " in served
    assert not re.search(r"^gua_(gpu|user|mig)_", served, re.M), "nothing left for the idle alerts"
