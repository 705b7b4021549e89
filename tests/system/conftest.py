"""Fixtures of the system test modules: the built .debs, a booted container
of the cached Debian root and the packages installed in it.

Each test module gets its own container (module scope), so one module's
faults cannot leak into another's; the .debs are built once per session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nspawn
import pytest
from systest import ADMIN, CONF, DIST, DROPIN, DROPIN_TEXT, OUTSIDER, REPO, SOURCES, booted_container, collector_conf, log


@pytest.fixture(scope="module", autouse=True)
def _duration(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how long each system test module took (setup to teardown)."""
    started = time.monotonic()
    yield
    log(request, f"[gua-systest] {request.module.__name__}: total duration "
                 f"{time.monotonic() - started:.1f} s")


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
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
        log(request, f"[gua-systest] building packages: {script}")
        started = time.monotonic()
        result = subprocess.run(["bash", str(script)], cwd=REPO,
                                env=dict(os.environ, GUA_DIST=str(DIST)),
                                capture_output=True, text=True, timeout=600)
        # Exit 3 means built but lintian complained: the packaging test's
        # business, not a reason to skip running the packages here.
        assert result.returncode in (0, 3), (
            f"packaging/build.sh failed (exit {result.returncode}):\n"
            f"{(result.stdout + result.stderr)[-4000:]}")
        log(request, f"[gua-systest] packages built in {time.monotonic() - started:.1f} s"
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
    yield from booted_container(request, debs)


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
