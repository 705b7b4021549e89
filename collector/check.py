"""gua-collector --check: can collection work on this host? One line per fact, with the fix.

Read-only: it never creates the database, never takes the writer's lock
and works without root where the database is readable. Each finding is
OK, WARN (collection works, something is worth fixing) or FAIL (it will
not work until fixed).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import grp
import os
import pwd
import sqlite3
import stat
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from . import compact, schema
from .backend import Backend, BackendInitError, Cursor, DeviceError
from .procinfo import proc_hidden

OK = "OK"
WARN = "WARN"
FAIL = "FAIL"
SERVICE_USER = "gua"
DB_MODE = 0o640
STALE_INTERVALS = 3  # a held DB whose last tick is older than this many intervals is not recording
EXPORTER_USER = "prometheus"
EXPORTER_DIR = "/var/lib/prometheus/node-exporter"
PACKAGED_TEXTFILE = "/run/gua-collector/gua.prom"  # gua.tmpfiles makes the directory; the deb links the file


@dataclass(frozen=True)
class Finding:
    """One line of the check."""

    level: str
    subject: str
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Host:
    """What the checks read from the host; tests pass their own."""

    proc_root: str = "/proc"
    clock_synchronised: Callable[[], bool | None] | None = None
    service_user: str = SERVICE_USER
    # Debian's prometheus-node-exporter runs as this user and reads *.prom here.
    exporter_user: str = EXPORTER_USER
    exporter_dir: str = EXPORTER_DIR


def run_checks(
    db: str, interval_ms: int, textfile: str, backend: Backend, now_ms: int, host: Host, textfile_users: bool = False
) -> list[Finding]:
    """Every check, in the order an admin would fix things."""
    findings = _nvml(backend)
    findings += _proc(host)
    findings.append(_child_lists(host))
    findings += _database(os.path.abspath(db), interval_ms, now_ms, host)
    if textfile:
        findings.append(_textfile(textfile, host))
        findings.append(_textfile_reader(os.path.abspath(textfile), textfile_users, host))
    findings.append(_clock(host))
    return findings


def render(findings: list[Finding], width: int = 80) -> str:
    """Each finding as 'LEVEL  subject: detail', then 'fix: ...', wrapped to 80 columns."""
    lines = []
    for f in findings:
        lines += textwrap.wrap(f"{f.level:<4}  {f.subject}: {f.detail}", width, subsequent_indent=" " * 6)
        if f.fix:
            lines += textwrap.wrap(f"fix: {f.fix}", width, initial_indent=" " * 6, subsequent_indent=" " * 11)
    failed = sum(1 for f in findings if f.level == FAIL)
    warned = sum(1 for f in findings if f.level == WARN)
    warnings = "1 warning" if warned == 1 else f"{warned} warnings"
    lines.append(f"{failed} failed, {warnings}, {len(findings) - failed - warned} ok")
    return "\n".join(lines) + "\n"


# --- NVML ----------------------------------------------------------------------------------

def _nvml(backend: Backend) -> list[Finding]:
    try:
        backend.init()
    except BackendInitError as error:
        return [Finding(FAIL, "NVML", str(error), "install or load the NVIDIA driver (nvidia-smi must work)")]
    try:
        versions = ", ".join(f"{k} {v}" for k, v in backend.versions().items())
        out = [Finding(OK, "NVML", f"loaded ({backend.name}; {versions})")]
        try:
            count = backend.device_count()
        except DeviceError as error:
            return out + [Finding(FAIL, "GPUs", f"cannot count devices: {error}", "check nvidia-smi and dmesg")]
        if count == 0:
            return out + [Finding(FAIL, "GPUs", "NVML sees no GPU", "check nvidia-smi and the device nodes")]
        out += [_device(backend, index) for index in range(count)]
        return out
    finally:
        backend.shutdown()


def _device(backend: Backend, index: int) -> Finding:
    subject = f"GPU {index}"
    try:
        raw = backend.read_device(index, Cursor(), full=True)
    except DeviceError as error:
        level = FAIL if error.lost else WARN
        return Finding(level, subject, f"read failed: {error}", "see dmesg for Xid errors; a reset or reboot may be needed")
    has = {
        "utilization samples": raw.util_samples is not None,
        "per-process utilization": raw.process_util is not None,
        "energy": raw.energy_mj is not None,
    }
    supported = [name for name, ok in has.items() if ok]
    missing = [name for name, ok in has.items() if not ok]
    detail = f"{raw.name}, {raw.uuid}; supports {', '.join(supported) or 'none of the optional reads'}"
    # GPM (Hopper and later) is a bonus, not a requirement: said, never a WARN.
    detail += "; GPM SM activity" + ("" if raw.gpm_supported else " not offered")
    if raw.mig_enabled:
        detail += f"; MIG on, {len(raw.mig_devices)} instances (their utilization is unknown to NVML)"
    if not has["utilization samples"] and not raw.mig_enabled:
        return Finding(FAIL, subject, detail, "this GPU's utilization cannot be recorded: every tick will be unknown")
    if missing and not raw.mig_enabled:
        return Finding(WARN, subject, detail + f"; lacks {', '.join(missing)}",
                       "recorded as unknown, never as 0; the report says so")
    return Finding(OK, subject, detail)


# --- /proc ---------------------------------------------------------------------------------

def _proc(host: Host) -> list[Finding]:
    try:
        with open(f"{host.proc_root}/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            mountinfo = handle.read()
    except OSError as error:
        return [Finding(WARN, "/proc", f"cannot read mount options: {error.strerror}")]
    groups = _service_groups(host.service_user)
    hidden = proc_hidden(mountinfo, groups)
    if hidden:
        return [Finding(WARN, "/proc", hidden.split(":")[0] + ": other users' GPU processes are invisible to "
                        f"{host.service_user}, so attribution is incomplete",
                        f"remount /proc with gid=<gid of {host.service_user}>")]
    return [Finding(OK, "/proc", "other users' processes are visible (no hidepid restriction)")]


def _child_lists(host: Host) -> Finding:
    """Whether the kernel lists each thread's children (CONFIG_PROC_CHILDREN): a GPU process's CPU needs them."""
    task = f"{host.proc_root}/self/task"
    try:
        threads = os.listdir(task)
    except OSError as error:
        return Finding(WARN, "process CPU", f"cannot list {task}: {error.strerror}")
    if any(os.path.exists(f"{task}/{tid}/children") for tid in threads):
        return Finding(OK, "process CPU", "child processes are listed: DataLoader workers' CPU counts for their "
                       "GPU process")
    return Finding(WARN, "process CPU", "the kernel lists no child processes (/proc/PID/task/TID/children): "
                   "a GPU process waiting on its DataLoader workers may be called abandoned",
                   "a kernel built with CONFIG_PROC_CHILDREN (Debian's, Ubuntu's and RHEL's are)")


def _service_groups(user: str) -> set[int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return set(os.getgroups()) | {os.getegid()}
    return {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}


# --- the database ----------------------------------------------------------------------------

def _database(path: str, interval_ms: int, now_ms: int, host: Host) -> list[Finding]:
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return [Finding(FAIL, "database", f"directory {directory} does not exist",
                        "install the package (tmpfiles creates /var/lib/gua) or fix db=")]
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return [_creatable(directory, host)]
    except PermissionError:
        return [Finding(WARN, "database", f"{path}: cannot look (permission denied)",
                        f"run as root or as a member of the {host.service_user} group")]
    out = [_ownership(path, info, host)]
    out += _contents(path, interval_ms, now_ms, host)
    return out


def _creatable(directory: str, host: Host) -> Finding:
    writer = _service_uid(host)
    info = os.stat(directory)
    if writer is not None and info.st_uid != writer and os.geteuid() != writer:
        return Finding(FAIL, "database", f"absent, and {directory} is not owned by {host.service_user}",
                       f"chown {host.service_user}:{host.service_user} {directory}")
    return Finding(OK, "database", f"absent; the collector will create it in {directory}")


def _service_uid(host: Host) -> int | None:
    try:
        return pwd.getpwnam(host.service_user).pw_uid
    except KeyError:
        return None


def _ownership(path: str, info: os.stat_result, host: Host) -> Finding:
    mode = stat.S_IMODE(info.st_mode)
    writer = _service_uid(host)
    owner = _user_name(info.st_uid)
    detail = f"{path}, owner {owner}, mode {mode:04o}"
    if not stat.S_ISREG(info.st_mode):
        return Finding(FAIL, "database", f"{path} is not a regular file", "move it away")
    if writer is not None and info.st_uid != writer:
        return Finding(FAIL, "database", detail + f"; the service runs as {host.service_user} and cannot write it",
                       f"chown {host.service_user}:{host.service_user} {path}")
    if not mode & stat.S_IWUSR:
        return Finding(FAIL, "database", detail + "; not writable by its owner", f"chmod 0640 {path}")
    if mode & ~DB_MODE:
        return Finding(WARN, "database", detail + "; readable or writable beyond its group",
                       "the collector sets 0640 at start; or chmod 0640 now")
    return Finding(OK, "database", detail)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _contents(path: str, interval_ms: int, now_ms: int, host: Host) -> list[Finding]:
    held = _held_by_collector(path)
    try:
        version, application, last_ms, oldest_row_ms = _read_facts(path)
    except PermissionError:
        return [Finding(WARN, "schema", "cannot read the database",
                        f"run as root or as a member of the {host.service_user} group")]
    except sqlite3.DatabaseError as error:
        return [Finding(FAIL, "schema", f"cannot read: {error}", "see gua-collector(8), EXIT STATUS 5 and 7")]
    out = []
    if version == 0 and application is None:
        out.append(Finding(OK, "schema", "empty; the collector will create the schema"))
    elif application != schema.APPLICATION:
        out.append(Finding(FAIL, "schema", "not a gua database", "point db= elsewhere; the collector will not touch it"))
    elif version > schema.SCHEMA_VERSION:
        out.append(Finding(FAIL, "schema", f"version {version}, newer than this collector's {schema.SCHEMA_VERSION}",
                           "upgrade gua"))
    elif version < schema.SCHEMA_VERSION:
        out.append(Finding(OK, "schema", f"version {version}; the collector upgrades it to "
                                         f"{schema.SCHEMA_VERSION} in place at start"))
    else:
        out.append(Finding(OK, "schema", f"version {version}"))
    out.append(_writer(held, last_ms, interval_ms, now_ms))
    if oldest_row_ms is not None and last_ms is not None:
        out.append(_compaction(oldest_row_ms, last_ms))
    return out


def _compaction(oldest_row_ms: int, last_ms: int) -> Finding:
    """Schema 5: how many hours of raw rows wait to be compacted (an upgraded database's backlog)."""
    waiting = compact.last_compactable_hour(last_ms) - oldest_row_ms // compact.HOUR_MS + 1
    if waiting <= 0:
        return Finding(OK, "raw rows", f"compacted once a day old; the last {compact.HEAD_HOURS} h are rows")
    return Finding(OK, "raw rows", f"{waiting} h older than a day not compacted yet: the running collector "
                                   "compacts them between ticks, oldest first")


def _held_by_collector(path: str) -> bool | None:
    """True while a collector holds its flock on the file; None when we cannot tell."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        # Closed before SQLite opens the file: no POSIX lock of ours is lost.
        os.close(fd)
    return False


def _read_facts(path: str) -> tuple[int, str | None, int | None, int | None]:
    """(user_version, meta application, newest tick ms, schema 5: the oldest tick left to compact), read-only."""
    if not os.access(path, os.R_OK):
        raise PermissionError(errno.EACCES, "permission denied", path)
    uri = f"file:{path}?mode=ro"
    if not os.path.exists(path + "-wal") and not os.access(os.path.dirname(path), os.W_OK):
        uri = f"file:{path}?immutable=1"  # no writer: read the file as it stands
    conn = sqlite3.connect(uri, uri=True)
    try:
        conn.execute("PRAGMA busy_timeout = 2000")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        application = None
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'application'").fetchone()
            application = row[0] if row else None
        elif tables:
            application = ""
        last = oldest = None
        if "tick" in tables:
            last = conn.execute("SELECT max(ts_ms) FROM tick").fetchone()[0]
        if "raw_chunk" in tables and application == schema.APPLICATION:
            left = compact.oldest_left(conn)  # the collector's own walk, read-only
            oldest = None if left is None else left[1]
        return version, application, last, oldest
    finally:
        conn.close()


def _writer(held: bool | None, last_ms: int | None, interval_ms: int, now_ms: int) -> Finding:
    age = None if last_ms is None else (now_ms - last_ms) / 1000
    when = "no tick yet" if age is None else f"last tick {age:.0f} s ago"
    if held is None:
        return Finding(WARN, "collector", f"cannot tell whether a collector writes it; {when}")
    if not held:
        return Finding(WARN, "collector", f"none is writing the database; {when}",
                       "systemctl enable --now gua-collector")
    if age is None or age * 1000 > STALE_INTERVALS * interval_ms:
        return Finding(WARN, "collector", f"running but not recording ({when})",
                       "systemctl status gua-collector says what it waits for")
    return Finding(OK, "collector", f"running and recording; {when}")


# --- textfile and clock ---------------------------------------------------------------------

def _textfile(path: str, host: Host) -> Finding:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        info = os.stat(directory)
    except OSError as error:
        return Finding(FAIL, "textfile", f"{directory}: {error.strerror}", "create it, or unset textfile=")
    writer = _service_uid(host)
    uid = writer if writer is not None else os.geteuid()
    writable = (info.st_uid == uid and info.st_mode & stat.S_IWUSR) or info.st_mode & stat.S_IWOTH or (
        info.st_mode & stat.S_IWGRP and info.st_gid in _service_groups(host.service_user))
    if uid == 0 or writable:
        return Finding(OK, "textfile", f"{directory} is writable by {host.service_user}")
    return Finding(FAIL, "textfile", f"{host.service_user} cannot write {directory} (owner {_user_name(info.st_uid)}, "
                   f"mode {stat.S_IMODE(info.st_mode):04o}); every tick's metrics would be lost",
                   f"textfile = {PACKAGED_TEXTFILE}: the package makes that directory for {host.service_user} "
                   f"and links the file into {host.exporter_dir}")


def _textfile_reader(path: str, users: bool, host: Host) -> Finding:
    """Can node_exporter, as Debian's package runs it, reach and read the file the collector writes?"""
    try:
        reader = pwd.getpwnam(host.exporter_user)
    except KeyError:
        return Finding(OK, "node_exporter", f"no user {host.exporter_user} (Debian's prometheus-node-exporter is "
                       f"not installed); make sure your exporter can read {path}")
    gids = {reader.pw_gid} | {g.gr_gid for g in grp.getgrall() if host.exporter_user in g.gr_mem}
    who = f"user {host.exporter_user} (node_exporter)"
    # Every directory on the way needs x for the reader: /var/lib/gua (0750) does not give it.
    directory = os.path.dirname(path)
    parts = [directory]
    while parts[-1] != os.path.dirname(parts[-1]):
        parts.append(os.path.dirname(parts[-1]))
    for part in reversed(parts):
        try:
            info = os.stat(part)
        except OSError:
            return Finding(WARN, "node_exporter", f"{part} is missing", f"create it, or use {PACKAGED_TEXTFILE}")
        if not _grants(info, reader.pw_uid, gids, stat.S_IXUSR):
            return Finding(WARN, "node_exporter", f"{who} cannot enter {part} (owner {_user_name(info.st_uid)}, "
                           f"mode {stat.S_IMODE(info.st_mode):04o})", f"use {PACKAGED_TEXTFILE}")
    if users:
        info = os.stat(directory)
        group = info.st_gid if info.st_mode & stat.S_ISGID else _primary_gid(host)
        if reader.pw_uid != info.st_uid and group not in gids:
            return Finding(WARN, "node_exporter", f"textfile_users = on makes the file 0640, group {_group_name(group)}, "
                           f"which {who} is not in: it cannot read the file",
                           f"make {directory} setgid, group {host.exporter_user}: see gua-collector(8), PROMETHEUS")
    link = _exporter_link(path, host.exporter_dir)
    if link is None:
        return Finding(WARN, "node_exporter", f"{host.exporter_dir} has no link to {path}, so node_exporter "
                       "does not read it", f"ln -s {path} {host.exporter_dir}/gua.prom")
    mode = "0640, user names" if users else "0644, no user names"
    return Finding(OK, "node_exporter", f"{who} can read it ({mode}) as {link}")


def _grants(info: os.stat_result, uid: int, gids: set[int], owner_bit: int) -> bool:
    """Whether the owner, group or other bits give uid the permission owner_bit names (x or r)."""
    shift = 0 if info.st_uid == uid else 3 if info.st_gid in gids else 6
    return uid == 0 or bool(info.st_mode & (owner_bit >> shift))


def _primary_gid(host: Host) -> int:
    try:
        return pwd.getpwnam(host.service_user).pw_gid
    except KeyError:
        return os.getegid()


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _exporter_link(path: str, exporter_dir: str) -> str | None:
    """The *.prom name in node_exporter's directory that is, or links to, path; None when there is none."""
    if os.path.dirname(path) == os.path.normpath(exporter_dir) or not os.path.isdir(exporter_dir):
        return path  # written there directly, or node_exporter reads elsewhere: nothing to link
    target = os.path.realpath(path)
    try:
        names = sorted(os.listdir(exporter_dir))
    except OSError:
        return path  # cannot look: say nothing rather than guess
    for name in names:
        entry = os.path.join(exporter_dir, name)
        if name.endswith(".prom") and os.path.realpath(entry) == target:
            return entry
    return None


def _clock(host: Host) -> Finding:
    synced = (host.clock_synchronised or kernel_clock_synchronised)()
    if synced is None:
        return Finding(WARN, "clock", "cannot tell whether the clock is synchronised")
    if not synced:
        return Finding(WARN, "clock", "not synchronised: timestamps may step later (the collector never overlaps them)",
                       "enable systemd-timesyncd or chrony")
    return Finding(OK, "clock", "synchronised (kernel NTP status)")


class _Timex(ctypes.Structure):
    # struct timex: only its size matters here (the kernel fills it); 208 bytes on 64-bit Linux.
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 204)]


def kernel_clock_synchronised() -> bool | None:
    """adjtimex(2) read-only: TIME_ERROR (5) means the kernel's clock is not synchronised."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        state = libc.adjtimex(ctypes.byref(_Timex()))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return bool(state != 5)
