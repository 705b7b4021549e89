"""Checks of deploy/: the systemd unit, sysusers.d, tmpfiles.d and the default
config, with systemd's own tools where the host has them (fast, no root
needed except for the ownership checks)."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "gua-collector.service"
SYSUSERS = DEPLOY / "gua.sysusers"
TMPFILES = DEPLOY / "gua.tmpfiles"
CONF = DEPLOY / "gua-collector.conf"
MAN = REPO / "packaging" / "man"

# Exposure measured with systemd 252 on Debian 12: 0.7. The brief's ceiling.
MAX_EXPOSURE = 2.0


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install systemd)")
    return path


def run(*argv: str | Path, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60, **kwargs)


def unit_directives() -> dict[str, list[str]]:
    """KEY -> every value it is given (DeviceAllow= and others repeat)."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


# --- the unit ------------------------------------------------------------


def test_unit_lifecycle_directives() -> None:
    d = unit_directives()
    expect = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/usr/bin/gua-collector",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "RestartSec": "5s",
        "User": "gua",
        "Group": "gua",
        "StateDirectory": "gua",
        "StateDirectoryMode": "0750",
        "DevicePolicy": "closed",
        "WantedBy": "multi-user.target",
    }
    for key, value in expect.items():
        assert d.get(key) == [value], f"{key}= is {d.get(key)}, want {value}"
    assert "StartLimitIntervalSec" in d and "StartLimitBurst" in d
    # The DB must not be world-readable: the umask takes "other" away.
    assert int(d["UMask"][0], 8) & 0o007 == 0o007, d["UMask"]


def test_unit_allows_exactly_the_nvidia_devices() -> None:
    allow = sorted(unit_directives()["DeviceAllow"])
    assert allow == sorted(
        ["char-nvidiactl rw", "char-nvidia rw", "char-nvidia-frontend rw", "char-nvidia-uvm rw",
         "char-nvidia-caps r"]
    )


def test_unit_has_none_of_the_settings_that_break_nvml() -> None:
    """Measured: these hide other users' /proc entries, the GPU devices or
    /proc/driver/nvidia; DynamicUser makes the state unreadable for admins."""
    d = unit_directives()
    for key in ("PrivateDevices", "PrivateUsers", "DynamicUser", "ProcSubset", "ProtectProc"):
        assert key not in d, f"{key}= breaks the collector (see the comments in the unit)"


def test_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify is clean. ExecStart points at a stand-in
    executable (the real one is not installed here) and MANPATH at our man
    pages, so Documentation= is checked too."""
    analyze = need("systemd-analyze")
    exe = tmp_path / "gua-collector"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / "gua-collector.service"
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/gua-collector\n" in text
    unit.write_text(text.replace("ExecStart=/usr/bin/gua-collector\n", f"ExecStart={exe}\n"))
    for page in MAN.iterdir():
        section = page.suffix.lstrip(".")
        (tmp_path / "man" / f"man{section}").mkdir(parents=True, exist_ok=True)
        shutil.copy(page, tmp_path / "man" / f"man{section}" / page.name)
    if shutil.which("man") is None:
        pytest.skip("man is not installed: systemd-analyze verify cannot check Documentation=")
    result = run(analyze, "verify", unit, env=dict(os.environ, MANPATH=str(tmp_path / "man")))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", output


def exposure(unit: Path) -> float:
    analyze = need("systemd-analyze")
    result = run(analyze, "security", "--offline=true", "--no-pager", unit)
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure line in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1))


def test_unit_security_exposure() -> None:
    score = exposure(UNIT)
    print(f"systemd-analyze security exposure: {score}")
    assert score <= MAX_EXPOSURE


def test_exposure_check_notices_a_weak_unit(tmp_path: Path) -> None:
    """The parser reads the real number: a bare unit scores far worse."""
    weak = tmp_path / "weak.service"
    weak.write_text("[Service]\nExecStart=/bin/true\n")
    assert exposure(weak) > 5.0


# --- sysusers.d and tmpfiles.d -------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A skeleton root with both files where the packages install them."""
    (tmp_path / "etc").mkdir()
    for src, rel in ((SYSUSERS, "usr/lib/sysusers.d/gua.conf"), (TMPFILES, "usr/lib/tmpfiles.d/gua.conf")):
        dest = tmp_path / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    return tmp_path


def sysusers(root: Path) -> None:
    tool = need("systemd-sysusers")
    result = run(tool, f"--root={root}", "gua.conf")
    if result.returncode != 0 and os.geteuid() != 0:
        pytest.skip(f"systemd-sysusers --root needs root here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr


def test_sysusers_creates_a_system_user_and_group(root: Path) -> None:
    sysusers(root)
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    name, _, uid, gid, _gecos, home, shell = users["gua"]
    assert int(uid) < 1000, "a system user"
    assert groups["gua"][2] == gid, "primary group gua"
    assert home == "/var/lib/gua"
    assert shell.endswith("/nologin")


def test_tmpfiles_creates_the_state_directory(root: Path) -> None:
    sysusers(root)
    tool = need("systemd-tmpfiles")
    result = run(tool, "--create", f"--root={root}", "gua.conf")
    st = (root / "var/lib/gua").stat()
    assert st.st_mode & 0o7777 == 0o750, oct(st.st_mode)
    if os.geteuid() != 0:
        pytest.skip("the directory is 0750; its owner needs root (tmpfiles cannot chown to gua)")
    assert result.returncode == 0, result.stderr
    uid = next(line.split(":")[2] for line in (root / "etc/passwd").read_text().splitlines()
               if line.startswith("gua:"))
    gid = next(line.split(":")[2] for line in (root / "etc/group").read_text().splitlines()
               if line.startswith("gua:"))
    assert (st.st_uid, st.st_gid) == (int(uid), int(gid))


# --- the default config ----------------------------------------------------


def test_default_config_documents_every_key_commented_out() -> None:
    parser = configparser.ConfigParser()
    parser.read_string(CONF.read_text())
    assert parser.sections() == ["collector"]
    assert dict(parser["collector"]) == {}, "every key stays commented out"
    commented = dict(re.findall(r"^#(\w+) =[ ]?(\S*)$", CONF.read_text(), re.MULTILINE))
    assert commented == {
        "db": "/var/lib/gua/gua.db",
        "interval": "10s",
        "retention": "90d",
        "unit_retention": "400d",
        "backend": "nvml",
        "textfile": "",
        "textfile_users": "off",
    }


def test_default_config_matches_the_collector_defaults() -> None:
    """The commented values are the collector's real defaults (when its
    module is importable here)."""
    try:
        from gua_collector import main  # type: ignore[import-not-found]
    except ImportError as error:
        pytest.skip(f"gua_collector is not importable: {error}")
    commented = dict(re.findall(r"^#(\w+) =[ ]?(\S*)$", CONF.read_text(), re.MULTILINE))
    assert commented == main.DEFAULTS
    assert main.DEFAULT_CONFIG == "/etc/gua/gua-collector.conf"


# --- the man pages ---------------------------------------------------------

PAGES = sorted(MAN.glob("gua-*.[18]"))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_man_page_renders_without_warnings(page: Path) -> None:
    man = need("man")
    result = run(man, "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", page,
                 env=dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="80"))
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def documented_options(page: Path) -> set[str]:
    """Long options the page names (roff writes a hyphen as \\-)."""
    return set(re.findall(r"--([a-z][a-z-]*[a-z])", page.read_text().replace("\\-", "-")))


def parser_options(parser) -> set[str]:
    return {opt[2:] for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


def test_collector_man_page_lists_every_option() -> None:
    try:
        from gua_collector import main  # type: ignore[import-not-found]
    except ImportError as error:
        pytest.skip(f"gua_collector is not importable: {error}")
    assert parser_options(main.build_parser()) <= documented_options(MAN / "gua-collector.8")


def test_report_man_page_lists_every_option() -> None:
    try:
        from gua_report import cli  # type: ignore[import-not-found]
    except ImportError as error:
        pytest.skip(f"gua_report is not importable: {error}")
    assert parser_options(cli.make_parser()) <= documented_options(MAN / "gua-report.1")
