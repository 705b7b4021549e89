"""Open a gua database strictly read-only and map every failure to an exit code.

Facts this relies on (measured with SQLite 3.40, see DESIGN.md):
- While the collector runs, a -wal and -shm exist and `mode=ro` works for a
  reader that may read them but not write the directory.
- After a clean collector exit SQLite removes -wal/-shm; `mode=ro` then
  fails for such a reader (SQLITE_READONLY_DIRECTORY) and, where the reader
  can write the directory, could create a -shm. With no -wal there is no
  uncommitted state to see, so `immutable=1` is both correct and inert.
- `immutable=1` is wrong while a -wal exists (it would ignore the WAL).
- `immutable=1` takes no lock: a collector that starts (or stops) during the
  read may checkpoint pages into the main file under it, and SQLite then
  reads a mix of old and new pages ("database disk image is malformed", or
  silently wrong rows). So a lock-free read remembers what the files looked
  like (FileState) and the caller reads again, through the WAL and its locks
  (`mode=ro`) once a -wal exists, when they changed (changed_under).
- SQLite trusts the page count in a valid header: a file cut short reads as
  zero-filled pages, i.e. silently missing rows, not always as an error.
  While the main file is all there is (no -wal with content), a file shorter
  than its header says is corrupt (_truncation). With a -wal the main file
  may legitimately lag (a checkpoint writes page 1 first and the file grows
  after), so it is not judged alone.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time

from .errors import Exit, ReportError

SCHEMA_VERSION = 5  # the newest gua schema this reporter understands
APPLICATION = "gua"
_MAGIC = b"SQLite format 3\x00"
_HEADER_BYTES = 100
# How often a read is tried again when the files changed under a lock-free
# read (a collector starting or stopping): by the second try a starting
# collector's -wal exists and the read goes through its locks.
READ_TRIES = 3
_SETTLE_S = (0.0, 0.2, 1.0)  # pause before each try: let a starting or stopping collector finish


class FileState:
    """What a reader that takes no locks can see of the database and its -wal/-shm.

    Two states are equal when every field is: a difference means the files
    changed. (A plain class rather than a dataclass: see classify.py.)
    """

    __slots__ = ("ino", "size", "mtime_ns", "header", "wal_size", "shm")

    def __init__(self, ino: int, size: int, mtime_ns: int, header: bytes, wal_size: int | None,
                 shm: bool) -> None:
        self.ino = ino
        self.size = size
        self.mtime_ns = mtime_ns
        self.header = header  # the first 100 bytes: page size, change counter, page count
        self.wal_size = wal_size  # None: no -wal
        self.shm = shm

    def _key(self) -> tuple[int, int, int, bytes, int | None, bool]:
        return (self.ino, self.size, self.mtime_ns, self.header, self.wal_size, self.shm)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FileState) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return "FileState" + repr(self._key())

    @property
    def wal_has_content(self) -> bool:
        return bool(self.wal_size)


def file_state(path: str) -> FileState | None:
    """The files as they are now; None when the database cannot be read at all."""
    try:
        with open(path, "rb") as f:
            header = f.read(_HEADER_BYTES)
            st = os.fstat(f.fileno())
    except OSError:
        return None
    try:
        wal_size: int | None = os.stat(path + "-wal").st_size
    except OSError:
        wal_size = None
    return FileState(st.st_ino, st.st_size, st.st_mtime_ns, header, wal_size, os.path.exists(path + "-shm"))


class ReadConnection(sqlite3.Connection):
    """A read-only connection that remembers the files as they were when it was opened."""

    gua_path: str = ""
    gua_immutable: bool = False
    gua_state: FileState | None = None


def changed_under(conn: sqlite3.Connection) -> bool:
    """True when `conn` read without locks (immutable) and the files changed since it was opened.

    Its reads may then mix pages from before and after a checkpoint: read
    again (open_readonly decides afresh, through the WAL if one exists now).
    A connection opened with `mode=ro` reads a snapshot under SQLite's locks.
    """
    if not isinstance(conn, ReadConnection) or not conn.gua_immutable:
        return False
    return file_state(conn.gua_path) != conn.gua_state


def settle(attempt: int) -> None:
    """Pause before try `attempt` (0-based) of a read that the files changed under."""
    pause = _SETTLE_S[min(attempt, len(_SETTLE_S) - 1)]
    if pause:  # sleep(0) still yields the CPU: on a busy host, a time slice lost before every report
        time.sleep(pause)


def _truncation(state: FileState) -> str | None:
    """Why the main file is too short for what its header says; None when it is not.

    Header fields (sqlite.org/fileformat.html): page size at 16-17 (1 means
    65536), the change counter at 24-27, the page count at 28-31, valid only
    when the change counter equals "version-valid-for" at 92-95. Only for a
    main file that holds the whole database (no -wal with content).
    """
    if state.size == 0:
        return None  # an empty file is an empty database: "not gua", not corrupt
    h = state.header
    if len(h) < _HEADER_BYTES:
        return f"only {state.size} bytes, shorter than the {_HEADER_BYTES}-byte SQLite header"
    page_size = int.from_bytes(h[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"damaged SQLite header (page size {page_size})"
    pages = int.from_bytes(h[28:32], "big")
    if pages and h[24:28] == h[92:96]:  # SQLite reads this many pages, zeros past the end
        if state.size < pages * page_size:
            return (f"truncated: {state.size} bytes, but its header counts {pages} pages of "
                    f"{page_size} bytes ({pages * page_size} bytes)")
        return None
    if state.size % page_size:  # SQLite counts whole pages of the file: a cut one goes unseen
        return f"truncated? {state.size} bytes is not a whole number of {page_size}-byte pages"
    return None


class OpenedDb:
    """A database open_readonly opened, and how."""

    __slots__ = ("conn", "path", "immutable", "schema_version", "warning")

    def __init__(self, conn: sqlite3.Connection, path: str, immutable: bool, schema_version: int,
                 warning: str = "") -> None:
        self.conn = conn
        self.path = path
        self.immutable = immutable  # opened without looking at (absent) WAL state
        self.schema_version = schema_version
        self.warning = warning  # something the report should say about how it was opened


def _owner_text(st: os.stat_result) -> tuple[str, str]:
    import grp  # only for a permission error's message
    import pwd

    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return user, group


def _permission_error(path: str) -> ReportError:
    """Say who may read the file, and which group to join."""
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is None:
        # The file itself cannot even be looked at: a directory above it is closed.
        # Name the first directory on the way down that this user cannot enter.
        parent = "/"
        for part in os.path.abspath(path).split("/")[1:-1]:
            if not os.access(parent, os.X_OK):
                break
            parent = os.path.join(parent, part)
        try:
            pst = os.stat(parent)
            user, group = _owner_text(pst)
            hint = f" (directory {parent} is {user}:{group} {stat.filemode(pst.st_mode)}): join the '{group}' group"
        except OSError:
            hint = ": join the 'gua' group"
        return ReportError(Exit.PERMISSION, f"permission denied: {path}{hint}")
    user, group = _owner_text(st)
    return ReportError(
        Exit.PERMISSION,
        f"permission denied reading {path} (owned by {user}:{group}, "
        f"mode {stat.filemode(st.st_mode)}): join the '{group}' group, "
        "then log in again",
    )


def _precheck(path: str) -> None:
    """Classify missing / unreadable / not-a-file before SQLite guesses."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ReportError(
            Exit.DB_MISSING,
            f"database {path} does not exist (is gua-collector running? use --db PATH)",
        ) from None
    except PermissionError:
        raise _permission_error(path) from None
    except OSError as exc:
        raise ReportError(Exit.DB_MISSING, f"cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ReportError(Exit.NOT_GUA, f"{path} is not a regular file, so not a gua database")
    if not os.access(path, os.R_OK):
        raise _permission_error(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_MAGIC))
    except PermissionError:
        raise _permission_error(path) from None
    except OSError as exc:
        raise ReportError(Exit.CORRUPT, f"cannot read {path}: {exc.strerror}") from None
    # An empty file is an empty SQLite database (no tables): "not gua" below.
    if head and head != _MAGIC:
        if len(head) == len(_MAGIC) and head[:6] == _MAGIC[:6]:
            raise ReportError(Exit.CORRUPT, f"{path} is corrupt (damaged SQLite header)")
        raise ReportError(Exit.NOT_GUA, f"{path} is not a SQLite database, so not a gua database")
    for side in (path + "-wal", path + "-shm"):
        if os.path.exists(side) and not os.access(side, os.R_OK):
            raise _permission_error(side)


# Bytes a path may keep in a SQLite URI: urllib.parse.quote's unreserved set
# and "/". Everything else, "%", "?" and "#" included, is percent-encoded.
_URI_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~/")


def quote_path(path: str) -> str:
    """`path` percent-encoded for a `file:` URI, as urllib.parse.quote(path) writes it.

    Here rather than urllib.parse, whose import (it pulls in ipaddress) cost
    more start-up time than a one-hour report takes. Unlike quote(), a name
    that is not valid UTF-8 (the bytes os.fsdecode kept as surrogates) is
    encoded as the bytes it has on disk, so it still opens.
    """
    return "".join(chr(b) if b in _URI_SAFE else f"%{b:02X}" for b in os.fsencode(path))


def _uri(path: str, immutable: bool) -> str:
    quoted = quote_path(os.path.abspath(path))
    return f"file:{quoted}?mode=ro&immutable=1" if immutable else f"file:{quoted}?mode=ro"


def _map_sqlite_error(path: str, exc: sqlite3.Error) -> ReportError:
    msg = str(exc)
    code = getattr(exc, "sqlite_errorname", "")
    if "not a database" in msg or code == "SQLITE_NOTADB":
        return ReportError(Exit.CORRUPT, f"{path} is corrupt ({msg})")
    if "malformed" in msg or code == "SQLITE_CORRUPT":
        return ReportError(Exit.CORRUPT, f"{path} is corrupt ({msg})")
    if code in ("SQLITE_PERM", "SQLITE_AUTH") or "permission" in msg.lower():
        return _permission_error(path)
    if code.startswith("SQLITE_READONLY") or code.startswith("SQLITE_CANTOPEN") or "unable to open" in msg:
        if not os.access(path, os.R_OK):
            return _permission_error(path)
        return ReportError(
            Exit.PERMISSION,
            f"cannot open {path} read-only ({msg}); its -wal/-shm files may need "
            "group read access: join the group that owns them",
        )
    return ReportError(Exit.CORRUPT, f"cannot read {path}: {msg}")


def open_readonly(path: str) -> OpenedDb:
    """Open `path` read-only and check it is a gua database of a known version.

    Raises ReportError with the exit code for each failure. A failure while
    the files changed under a lock-free read (a collector starting or
    stopping) is not a verdict on the database: it is tried again.
    """
    _precheck(path)
    for attempt in range(READ_TRIES):
        settle(attempt)
        state = file_state(path)
        try:
            return _open_once(path, state)
        except ReportError:
            if attempt == READ_TRIES - 1 or not _moved(state, file_state(path)):
                raise
    raise AssertionError("unreachable")


def _moved(before: FileState | None, after: FileState | None) -> bool:
    """Did the files change in a way that can fail an open decided on `before`?

    Any change, for a lock-free read; for a read through the WAL, a -wal or
    -shm that came or went (a collector stopping between the look and the
    open), not the WAL growing as a running collector commits.
    """
    if before is None or after is None:
        return before != after
    if _lock_free(before):
        return before != after
    return ((before.wal_size is None, before.shm, before.ino)
            != (after.wal_size is None, after.shm, after.ino))


def _lock_free(state: FileState | None) -> bool:
    """Read with immutable=1: no -wal, or a -wal a killed collector left without its -shm."""
    return state is None or state.wal_size is None or not state.shm


def _open_once(path: str, state: FileState | None) -> OpenedDb:
    """One attempt of open_readonly, deciding from `state` how to read."""
    immutable = _lock_free(state)
    warning = ""
    if immutable and state is not None and state.wal_size is not None:
        # A -wal without its -shm: a collector was killed and nobody has
        # opened the DB since. Reading the WAL needs a rebuilt -shm, i.e.
        # creating a file (or failing, without write access to the
        # directory); read the main file alone instead and say so.
        warning = ("the collector left a -wal file without its -shm (killed?); its newest "
                   "ticks are not shown until gua-collector starts again")
    if state is not None and not state.wal_has_content:
        why = _truncation(state)
        if why:
            raise ReportError(Exit.CORRUPT, f"{path} is corrupt ({why})")
    conn: ReadConnection | None = None
    try:
        # isolation_level=None: we issue BEGIN ourselves so the whole report
        # reads one snapshot while the collector keeps committing.
        conn = sqlite3.connect(_uri(path, immutable), uri=True, isolation_level=None, timeout=10.0,
                               factory=ReadConnection)
        conn.gua_path, conn.gua_immutable, conn.gua_state = path, immutable, state
        conn.execute("PRAGMA query_only = ON")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        app = None
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'application'").fetchone()
            app = row[0] if row else None
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise _map_sqlite_error(path, exc) from None
    if app != APPLICATION and warning:
        conn.close()
        raise ReportError(
            Exit.DB_MISSING,
            f"{path} has no data outside {os.path.basename(path)}-wal, whose -shm is missing "
            "(collector killed?): start gua-collector again, it recovers the WAL",
        )
    if app != APPLICATION:
        conn.close()
        what = "an empty SQLite database" if not tables else "a SQLite database of another program"
        raise ReportError(Exit.NOT_GUA, f"{path} is {what}, not a gua database")
    if version > SCHEMA_VERSION:
        conn.close()
        raise ReportError(
            Exit.SCHEMA_NEWER,
            f"{path} has schema version {version}, newer than this gua-report "
            f"understands ({SCHEMA_VERSION}): upgrade gua-report",
        )
    if version < 1:
        conn.close()
        raise ReportError(Exit.CORRUPT, f"{path} names itself gua but has no schema version")
    return OpenedDb(conn=conn, path=path, immutable=immutable, schema_version=version, warning=warning)
