"""A cached minimal Debian 12 root file system for the system test.

``debootstrap`` takes about a minute, so the finished tree is kept under
``/var/cache/gua-systest/`` in a directory named after a hash of everything
that shapes it (suite, mirror, architecture, package list). Each run gets a
fresh copy (``cp -a --reflink=auto``) and throws it away afterwards, so
every run starts from the same clean tree.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

CACHE_DIR = Path(os.environ.get("GUA_SYSTEST_CACHE", "/var/cache/gua-systest"))
SUITE = "bookworm"
# Bump when the way the tree is built changes, so old caches are not reused.
RECIPE_VERSION = "1"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-sdnotify")


class RootfsUnavailable(Exception):
    """The environment cannot produce a root (no mirror, no network...)."""


def _apt_source_lines() -> list[tuple[str, list[str]]]:
    """Return (uri, suites) pairs from the host's apt configuration."""
    pairs: list[tuple[str, list[str]]] = []
    sources_list = Path("/etc/apt/sources.list")
    one_line = [sources_list] if sources_list.exists() else []
    one_line += [Path(p) for p in sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    for path in one_line:
        for line in path.read_text(errors="replace").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line.startswith("deb "):
                continue
            # Drop an options block such as [arch=amd64 signed-by=...].
            line = re.sub(r"\[[^\]]*\]", "", line)
            words = line.split()
            if len(words) >= 3:
                pairs.append((words[1], [words[2]]))
    for name in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        text = Path(name).read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                pairs.append((uri, fields.get("suites", "").split()))
    return pairs


def host_mirror(suite: str = SUITE) -> str:
    """The Debian mirror the host's apt uses for ``suite``.

    Raises RootfsUnavailable when the host has no such entry.
    """
    for uri, suites in _apt_source_lines():
        if suite in suites:
            return uri.rstrip("/")
    raise RootfsUnavailable(
        f"no apt source for Debian {suite!r} in /etc/apt/sources.list(.d); "
        "cannot debootstrap"
    )


def deb_dependencies(debs: list[Path]) -> list[str]:
    """Package names the given .deb files depend on, excluding each other.

    Version constraints and ``:any`` qualifiers are dropped and only the
    first alternative of ``a | b`` is kept, so the names can go to
    ``debootstrap --include``.
    """
    own: set[str] = set()
    names: set[str] = set()
    for deb in debs:
        own.add(_deb_field(deb, "Package"))
        for field in ("Pre-Depends", "Depends"):
            value = _deb_field(deb, field)
            for clause in filter(None, (c.strip() for c in value.split(","))):
                first = clause.split("|")[0].strip()
                name = re.split(r"[\s(:\[]", first, maxsplit=1)[0]
                if name:
                    names.add(name)
    return sorted(names - own)


def _deb_field(deb: Path, field: str) -> str:
    """One control field of a .deb (empty when absent)."""
    result = subprocess.run(
        ["dpkg-deb", "-f", str(deb), field],
        check=True, capture_output=True, text=True,
    )
    return result.stdout.strip()


def cache_key(packages: list[str], mirror: str, arch: str) -> str:
    """Short hash naming the cached tree for this recipe."""
    text = "\n".join([RECIPE_VERSION, SUITE, mirror, arch, *sorted(set(packages))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _host_arch() -> str:
    """dpkg's name for this machine's architecture (amd64, arm64...)."""
    return subprocess.run(
        ["dpkg", "--print-architecture"], check=True, capture_output=True, text=True
    ).stdout.strip()


def cached_root(extra_packages: list[str] | None = None,
                log: Callable[[str], None] = print) -> Path:
    """Return the cached debootstrap tree, building it if needed.

    ``extra_packages`` are added to BASE_PACKAGES (e.g. the dependencies of
    the packages under test, so that ``dpkg -i`` needs no network later).
    The tree is built in a temporary directory and renamed into place, under
    an exclusive lock, so an interrupted or concurrent build never leaves a
    half-made cache behind.
    """
    packages = sorted(set(BASE_PACKAGES) | set(extra_packages or ()))
    mirror = host_mirror()
    arch = _host_arch()
    key = cache_key(packages, mirror, arch)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    final = CACHE_DIR / f"rootfs-{key}"
    with open(CACHE_DIR / f"rootfs-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".gua-systest-complete").exists():
            return final
        building = CACHE_DIR / f"rootfs-{key}.building"
        if building.exists():
            shutil.rmtree(building)
        cmd = [
            "debootstrap", "--variant=minbase", f"--arch={arch}",
            "--include=" + ",".join(packages), SUITE, str(building), mirror,
        ]
        log(f"[gua-systest] building cached root ({len(packages)} packages): "
            + " ".join(cmd))
        started = time.monotonic()
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr)[-3000:]
            shutil.rmtree(building, ignore_errors=True)
            raise RootfsUnavailable(
                f"debootstrap failed (exit {result.returncode}):\n{tail}"
            )
        _trim(building)
        (building / ".gua-systest-complete").write_text(
            "\n".join(packages) + "\n"
        )
        if final.exists():
            shutil.rmtree(final)
        building.rename(final)
        log(f"[gua-systest] debootstrap took {time.monotonic() - started:.1f} s; "
            f"cached at {final}")
        return final


def _trim(root: Path) -> None:
    """Make the tree boot quietly and fast under nspawn."""
    # No getty/console noise and no network setup needed in the container.
    for unit in ("getty@tty1.service", "console-getty.service"):
        link = root / "etc/systemd/system/getty.target.wants" / unit
        if link.is_symlink():
            link.unlink()
    (root / "etc/hostname").write_text("gua-systest\n")
    apt_cache = root / "var/cache/apt/archives"
    for deb in apt_cache.glob("*.deb"):
        deb.unlink()


def fresh_copy(cached: Path, parent: Path | None = None) -> Path:
    """A throw-away copy of ``cached`` for one run (reflinked where possible)."""
    parent = parent or CACHE_DIR
    target = Path(
        subprocess.run(
            ["mktemp", "-d", str(parent / "run-XXXXXX")],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )
    target.rmdir()
    subprocess.run(
        ["cp", "-a", "--reflink=auto", str(cached), str(target)], check=True
    )
    (target / ".gua-systest-complete").unlink(missing_ok=True)
    return target


def remove_stale_copies() -> list[Path]:
    """Delete run-* copies an aborted earlier run left behind.

    A copy that some process still has as its root (a container another run
    is using right now) is kept. Returns the removed paths.
    """
    if not CACHE_DIR.is_dir():
        return []
    in_use: set[Path] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            in_use.add(Path(os.readlink(f"/proc/{pid}/root")))
        except OSError:
            continue
    removed = []
    for copy in CACHE_DIR.glob("run-*"):
        if not copy.is_dir() or any(p == copy or copy in p.parents for p in in_use):
            continue
        shutil.rmtree(copy, ignore_errors=True)
        removed.append(copy)
    return removed


def remove_copy(root: Path) -> None:
    """Delete a per-run copy; refuses to touch anything but a run-* dir."""
    if root.name.startswith("run-") and root.parent == CACHE_DIR:
        shutil.rmtree(root, ignore_errors=True)
