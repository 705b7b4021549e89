"""Builds the deb and rpm packages once with packaging/build.sh and checks
what they contain, their dependencies, maintainer scripts and lint.

Deselected by default; run with `pytest -m packaging` (root or not; the
build tools are listed in .ci/run)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
DEPLOY = REPO / "deploy"
VERSION = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": os.environ.get("HOME", "/")}

TOOLS = {
    "dpkg-buildpackage": "dpkg-dev",
    "dpkg-deb": "dpkg",
    "dpkg-checkbuilddeps": "dpkg-dev",
    "dh": "debhelper",
    "rpmbuild": "rpm",
    "rpm": "rpm",
    "lintian": "lintian",
    "rpmlint": "rpmlint",
}


def run(*argv: str | Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs)
    if check:
        assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@dataclass
class Build:
    dist: Path
    returncode: int
    output: str
    seconds: float

    def path(self, name: str) -> Path:
        path = self.dist / name
        assert path.is_file(), f"packaging/build.sh did not make {name}:\n{self.output[-4000:]}"
        return path

    @property
    def collector_deb(self) -> Path:
        return self.path(f"gua-collector_{VERSION}_all.deb")

    @property
    def report_deb(self) -> Path:
        return self.path(f"gua-report_{VERSION}_all.deb")

    @property
    def collector_rpm(self) -> Path:
        return self.path(f"gua-collector-{VERSION}-1.noarch.rpm")

    @property
    def report_rpm(self) -> Path:
        return self.path(f"gua-report-{VERSION}-1.noarch.rpm")


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """One run of packaging/build.sh into a private dist folder (dist/ is
    left to the system test)."""
    missing = [f"{tool} ({package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        pytest.skip("missing build tools: " + ", ".join(missing) + "; apt-get install them (see .ci/run)")
    unmet = run("dpkg-checkbuilddeps", PACKAGING / "debian" / "control", check=False, env=CLEAN_ENV)
    if unmet.returncode != 0:
        pytest.skip(f"build dependencies missing: {unmet.stderr.strip()}")
    dist = tmp_path_factory.mktemp("dist")
    start = time.monotonic()
    result = run(PACKAGING / "build.sh", check=False, env=dict(os.environ, GUA_DIST=str(dist)))
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    print(f"packaging/build.sh: exit {result.returncode} in {seconds:.1f} s")
    # 0 built and clean, 3 built but lintian complained (test_lintian_is_clean says what).
    assert result.returncode in (0, 3), f"packaging/build.sh failed ({result.returncode}):\n{output[-6000:]}"
    return Build(dist, result.returncode, output, seconds)


def deb_files(deb: Path) -> dict[str, str]:
    """path -> 'mode owner/group' from dpkg-deb -c."""
    files = {}
    for line in run("dpkg-deb", "-c", deb).stdout.splitlines():
        mode, owner, _size, _date, _time, name = line.split(None, 5)
        files[name.split(" -> ")[0].removeprefix(".")] = f"{mode} {owner}"
    return files


def deb_field(deb: Path, field: str) -> str:
    return run("dpkg-deb", "-f", deb, field).stdout.strip()


def deb_control(deb: Path, tmp_path: Path, name: str) -> str:
    out = tmp_path / deb.name
    if not out.exists():
        run("dpkg-deb", "-e", deb, out)
    path = out / name
    return path.read_text() if path.exists() else ""


def deb_extract(deb: Path, tmp_path: Path) -> Path:
    out = tmp_path / (deb.name + ".root")
    run("dpkg-deb", "-x", deb, out)
    return out


RULES = "/usr/share/gua-collector/prometheus/gua-rules.yml"
DASHBOARD = "/usr/share/gua-collector/grafana/gua.json"
NODE_EXPORTER_LINK = "/var/lib/prometheus/node-exporter/gua.prom"


def unit_path(files: dict[str, str] | list[str]) -> str:
    units = [f for f in files if f.endswith("/systemd/system/gua-collector.service")]
    assert len(units) == 1, units
    # Debian 12's debhelper uses /lib, Fedora and Debian 13 /usr/lib.
    assert units[0] in ("/lib/systemd/system/gua-collector.service", "/usr/lib/systemd/system/gua-collector.service")
    return units[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the build -------------------------------------------------------------


def test_versions_agree() -> None:
    changelog = (PACKAGING / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"gua ({VERSION})"), changelog
    spec = (PACKAGING / "rpm" / "gua.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(VERSION)}$", spec, re.M)


def test_build_makes_standard_file_names(build: Build) -> None:
    for name in (f"gua-collector_{VERSION}_all.deb", f"gua-report_{VERSION}_all.deb", f"gua_{VERSION}.dsc",
                 f"gua-collector-{VERSION}-1.noarch.rpm", f"gua-report-{VERSION}-1.noarch.rpm",
                 f"gua-{VERSION}-1.src.rpm"):
        build.path(name)
    print("sizes: " + ", ".join(f"{p.name} {p.stat().st_size}" for p in sorted(build.dist.iterdir())))


# --- gua-collector.deb -------------------------------------------------------


def test_collector_deb_contents(build: Build) -> None:
    files = deb_files(build.collector_deb)
    for path in (
        "/usr/bin/gua-collector",
        "/usr/lib/sysusers.d/gua.conf",
        "/usr/lib/tmpfiles.d/gua.conf",
        "/etc/gua/gua-collector.conf",
        "/usr/share/man/man8/gua-collector.8.gz",
        "/usr/lib/gua-collector/vendor/pynvml.py",
        "/usr/lib/python3/dist-packages/gua_collector/__init__.py",
        "/usr/lib/python3/dist-packages/gua_collector/main.py",
        "/usr/share/doc/gua-collector/copyright",
        RULES,
        DASHBOARD,
        NODE_EXPORTER_LINK,
    ):
        assert path in files, f"{path} not in gua-collector.deb"
    unit_path(files)
    assert not any("gua_report" in f for f in files)
    assert not any(f.startswith("/var/lib/gua") for f in files), "state is made at install, never shipped"


def test_collector_deb_permissions(build: Build) -> None:
    for path, mode in deb_files(build.collector_deb).items():
        if path == NODE_EXPORTER_LINK:
            assert mode == "lrwxrwxrwx root/root", f"{path}: {mode}"
        elif path.endswith("/"):
            assert mode == "drwxr-xr-x root/root", f"{path}: {mode}"
        elif path.startswith("/usr/bin/") or path.startswith("/usr/share/python3/runtime.d/"):
            assert mode == "-rwxr-xr-x root/root", f"{path}: {mode}"
        else:
            assert mode == "-rw-r--r-- root/root", f"{path}: {mode}"


def test_collector_deb_ships_the_deploy_files_unchanged(build: Build, tmp_path: Path) -> None:
    root = deb_extract(build.collector_deb, tmp_path)
    files = deb_files(build.collector_deb)
    pairs = {
        unit_path(files): DEPLOY / "gua-collector.service",
        "/usr/lib/sysusers.d/gua.conf": DEPLOY / "gua.sysusers",
        "/usr/lib/tmpfiles.d/gua.conf": DEPLOY / "gua.tmpfiles",
        "/etc/gua/gua-collector.conf": DEPLOY / "gua-collector.conf",
        "/usr/lib/gua-collector/vendor/pynvml.py": PACKAGING / "vendor" / "pynvml.py",
        RULES: DEPLOY / "prometheus" / "gua-rules.yml",
        DASHBOARD: DEPLOY / "grafana" / "gua.json",
    }
    for installed, source in pairs.items():
        assert (root / installed.lstrip("/")).read_bytes() == source.read_bytes(), installed


def test_collector_deb_links_the_textfile_for_debian_s_node_exporter(build: Build) -> None:
    """Debian's node-exporter reads its own root-owned directory as user prometheus: the deb's link
    leads it to the file the service may write, which tmpfiles.d creates (empty) at boot."""
    listing = run("dpkg-deb", "-c", build.collector_deb).stdout
    assert f".{NODE_EXPORTER_LINK} -> /run/gua-collector/gua.prom" in listing, listing
    tmpfiles = (DEPLOY / "gua.tmpfiles").read_text()
    assert "\nd /run/gua-collector 0755 gua gua -\n" in tmpfiles
    assert "\nf /run/gua-collector/gua.prom - - - -\n" in tmpfiles, "never touches the mode of a live file"
    unit = (DEPLOY / "gua-collector.service").read_text()
    assert "\nReadWritePaths=-/run/gua-collector\n" in unit, "ProtectSystem=strict would refuse the write"


def test_vendored_pynvml_is_the_recorded_upstream_file() -> None:
    readme = (PACKAGING / "vendor" / "README.md").read_text()
    assert sha256(PACKAGING / "vendor" / "pynvml.py") in readme
    assert "13.615.71" in (PACKAGING / "rpm" / "gua.spec").read_text()
    assert "13.615.71" in (PACKAGING / "debian" / "copyright").read_text()


def test_collector_deb_conffile(build: Build, tmp_path: Path) -> None:
    conffiles = deb_control(build.collector_deb, tmp_path, "conffiles").split()
    assert conffiles == ["/etc/gua/gua-collector.conf"]


def test_collector_deb_depends(build: Build) -> None:
    depends = deb_field(build.collector_deb, "Depends")
    assert "python3-sdnotify" in depends
    assert re.search(r"python3(:any)? \(>= 3\.11", depends), depends
    assert "nvidia-ml-py" not in depends and "pynvml" not in depends, "pynvml is private"


def test_copyright_states_the_bundled_pynvml(build: Build, tmp_path: Path) -> None:
    root = deb_extract(build.collector_deb, tmp_path)
    text = (root / "usr/share/doc/gua-collector/copyright").read_text()
    assert "Files: packaging/vendor/pynvml.py" in text
    assert "NVIDIA Corporation" in text and "BSD-3-clause" in text
    assert "/usr/lib/gua-collector/vendor/pynvml.py" in text


def test_collector_maintainer_scripts(build: Build, tmp_path: Path) -> None:
    postinst = deb_control(build.collector_deb, tmp_path, "postinst")
    prerm = deb_control(build.collector_deb, tmp_path, "prerm")
    postrm = deb_control(build.collector_deb, tmp_path, "postrm")
    # Users first, then the directory they own, then the unit.
    order = [postinst.index(s) for s in ("systemd-sysusers", "systemd-tmpfiles", "deb-systemd-helper")]
    assert order == sorted(order), "sysusers, tmpfiles, systemd: in that order"
    assert "systemd-sysusers ${DPKG_ROOT:+--root=\"$DPKG_ROOT\"} gua.conf" in postinst
    assert "--create gua.conf" in postinst
    # Installed disabled: enable only re-creates links for a unit that was enabled.
    assert "deb-systemd-helper --quiet was-enabled 'gua-collector.service'" in postinst
    assert "deb-systemd-invoke $_dh_action 'gua-collector.service'" in postinst
    assert "py3compile -p gua-collector /usr/lib/gua-collector" in postinst
    assert "deb-systemd-invoke stop 'gua-collector.service'" in prerm
    assert "deb-systemd-helper purge 'gua-collector.service'" in postrm
    # Purge keeps the recorded data (packaging/README.md): no command deletes it.
    commands = [line for line in postrm.splitlines() if not line.lstrip().startswith(("#", "echo"))]
    assert not any("/var/lib/gua" in line and "rm " in line for line in commands)


def test_packaged_collector_runs_with_debian_python(build: Build, tmp_path: Path) -> None:
    """The deb's own files, on Debian's python3: the vendored pynvml imports
    and the collector writes a database on the simulated backend."""
    root = deb_extract(build.collector_deb, tmp_path)
    python = shutil.which("python3", path=CLEAN_ENV["PATH"])
    env = dict(CLEAN_ENV, PYTHONPATH=str(root / "usr/lib/python3/dist-packages"))
    run(python, "-c", "import pynvml; print(pynvml.__file__)",
        env=dict(env, PYTHONPATH=str(root / "usr/lib/gua-collector/vendor")))
    probe = run(python, "-c", "import sdnotify", check=False, env=env)
    if probe.returncode != 0:
        pytest.skip("python3-sdnotify is not installed on this host")
    script = root / "usr/bin/gua-collector"
    assert script.read_text().startswith("#!/usr/bin/python3")
    db = tmp_path / "gua.db"
    result = run(python, script, "--config", os.devnull, "--db", db, "--backend", "simulate:lab",
                 "--ticks", "3", check=False, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert db.stat().st_mode & 0o777 == 0o640


# --- gua-report.deb ----------------------------------------------------------


def test_report_deb_contents(build: Build) -> None:
    files = deb_files(build.report_deb)
    for path in ("/usr/bin/gua-report", "/usr/share/man/man1/gua-report.1.gz",
                 "/usr/share/doc/gua-report/JSON.md",  # the contract --help points to
                 "/usr/lib/python3/dist-packages/gua_report/__init__.py",
                 "/usr/lib/python3/dist-packages/gua_report/cli.py"):
        assert path in files, f"{path} not in gua-report.deb"
    for path in files:
        assert "pynvml" not in path and "gua_collector" not in path and "systemd" not in path, path


def test_report_deb_depends_on_python_only(build: Build) -> None:
    depends = [d.strip() for d in deb_field(build.report_deb, "Depends").split(",")]
    assert depends and all(d.startswith(("python3 ", "python3:any")) for d in depends), depends


def test_packaged_report_runs_with_debian_python(build: Build, tmp_path: Path) -> None:
    root = deb_extract(build.report_deb, tmp_path)
    python = shutil.which("python3", path=CLEAN_ENV["PATH"])
    env = dict(CLEAN_ENV, PYTHONPATH=str(root / "usr/lib/python3/dist-packages"))
    result = run(python, root / "usr/bin/gua-report", "--version", check=False, env=env)
    assert result.returncode == 0 and VERSION in result.stdout, result.stdout + result.stderr
    missing = run(python, root / "usr/bin/gua-report", "--db", tmp_path / "absent.db", check=False, env=env)
    assert missing.returncode == 3, missing.stdout + missing.stderr


# --- the rpms ----------------------------------------------------------------


def rpm_query(rpm: Path, *args: str) -> str:
    return run("rpm", "-qp", *args, rpm).stdout


def test_collector_rpm_contents(build: Build) -> None:
    files = rpm_query(build.collector_rpm, "-l").split()
    for path in ("/usr/bin/gua-collector", "/usr/lib/systemd/system/gua-collector.service",
                 "/usr/lib/sysusers.d/gua.conf", "/usr/lib/tmpfiles.d/gua.conf",
                 "/etc/gua/gua-collector.conf", "/usr/lib/gua-collector/vendor/pynvml.py",
                 "/usr/share/man/man8/gua-collector.8.gz"):
        assert path in files, f"{path} not in the gua-collector rpm"
    assert any(re.search(r"/site-packages/gua_collector/main\.py$", f) for f in files)
    assert RULES in files and DASHBOARD in files
    assert not any(f.startswith("/var/lib/prometheus") for f in files), "node_exporter's paths differ off Debian"
    assert not any("gua_report" in f for f in files)
    assert rpm_query(build.collector_rpm, "-c").split() == ["/etc/gua/gua-collector.conf"]
    flags = rpm_query(build.collector_rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]")
    assert "/etc/gua/gua-collector.conf cn" in flags, "%config(noreplace)"
    assert rpm_query(build.collector_rpm, "--qf", "%{ARCH}") == "noarch"


def test_collector_rpm_dependencies(build: Build) -> None:
    requires = rpm_query(build.collector_rpm, "-R")
    assert "python3-sdnotify" in requires
    assert "nvidia-ml-py" not in requires, "the bundled pynvml must not be required"
    provides = rpm_query(build.collector_rpm, "--provides")
    assert "bundled(python3-nvidia-ml-py) = 13.615.71" in provides


def test_collector_rpm_scriptlets(build: Build) -> None:
    scripts = rpm_query(build.collector_rpm, "--scripts")
    pre = scripts.split("preinstall scriptlet")[1].split("postinstall scriptlet")[0]
    assert "systemd-sysusers" in pre and "u gua - " in pre
    assert "systemd-tmpfiles --create /usr/lib/tmpfiles.d/gua.conf" in scripts
    assert "preset gua-collector.service" in scripts
    assert "disable --now gua-collector.service" in scripts
    assert "try-restart gua-collector.service" in scripts


def test_report_rpm(build: Build) -> None:
    files = rpm_query(build.report_rpm, "-l").split()
    assert "/usr/bin/gua-report" in files and "/usr/share/man/man1/gua-report.1.gz" in files
    assert "/usr/share/doc/gua-report/JSON.md" in files
    assert not any("pynvml" in f or "gua_collector" in f for f in files)
    requires = rpm_query(build.report_rpm, "-R")
    assert "sdnotify" not in requires and "nvidia" not in requires
    assert rpm_query(build.report_rpm, "--scripts").strip() == ""


# --- lint --------------------------------------------------------------------


def test_lintian_is_clean(build: Build) -> None:
    report = (build.dist / "lintian.txt").read_text()
    print(report)
    assert "not installed" not in report
    bad = [line for line in report.splitlines() if re.match(r"^[EW]: ", line)]
    assert not bad, "\n".join(bad)
    assert build.returncode == 0


def test_rpmlint_is_clean(build: Build) -> None:
    report = (build.dist / "rpmlint.txt").read_text()
    print(report)
    summary = re.search(r"(\d+) errors, (\d+) warnings", report)
    assert summary, report
    assert summary.groups() == ("0", "0"), report


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "packaging", "-v"]))
