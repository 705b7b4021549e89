"""The collector's only writer to SQLite: open safely, write ticks, roll up, compact, prune.

The collector's data-changing SQL is here, beside the statements of the two
jobs it runs in its transactions: rollup.py (hourly rollups) and compact.py
(compacting old raw hours); the DDL is in schema.py. Every write is one short transaction: nothing is held across a
sleep, so readers and the WAL checkpointer are never starved.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import stat
from collections.abc import Callable
from dataclasses import dataclass

from . import compact, schema
from .records import Event, GpuInfo, ProcessInfo, Tick
from .rollup import HOUR_MS, Rollups

SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 5000
DB_MODE = 0o640  # the gua group reads; nobody else
# The WAL is trimmed back to this whenever it restarts (and at stop); it
# grows past it only while a reader holds an old snapshot.
WAL_LIMIT_BYTES = 4 * 1024 * 1024
_TRANSIENT_ERRNO = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.ENOMEM})

# --- dimensions -------------------------------------------------------------
SELECT_GPU = "SELECT gpu_id, gpu_index FROM gpu WHERE uuid = ?"
INSERT_GPU = """
INSERT INTO gpu (uuid, gpu_index, name, memory_total, parent_id, mig_slot)
VALUES (?, ?, ?, ?, ?, ?)
"""
UPDATE_GPU_INDEX = "UPDATE gpu SET gpu_index = ? WHERE gpu_id = ?"
SELECT_ACCOUNT = "SELECT account_id FROM account WHERE uid IS ? AND username = ?"
INSERT_ACCOUNT = "INSERT INTO account (uid, username) VALUES (?, ?)"
SELECT_PROCESS = "SELECT proc_id, last_ms FROM process WHERE pid = ? AND start_ms = ?"
INSERT_PROCESS = """
INSERT INTO process (pid, start_ms, account_id, comm, cgroup, unit, last_ms)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
# max(): a clock set back must not make a process look older than it is.
UPDATE_PROCESS_LAST = "UPDATE process SET last_ms = max(last_ms, ?) WHERE proc_id = ?"

# --- facts --------------------------------------------------------------------
INSERT_RUN = """
INSERT INTO run (started_ms, interval_ms, backend, hostname, version)
VALUES (?, ?, ?, ?, ?)
"""
UPDATE_RUN_STOPPED = "UPDATE run SET stopped_ms = ? WHERE run_id = ?"
INSERT_TICK = "INSERT INTO tick (run_id, ts_ms, duration_ms, cpu_permille) VALUES (?, ?, ?, ?)"
INSERT_GPU_SAMPLE = """
INSERT INTO gpu_sample
    (tick_id, gpu_id, status, util_permille, coverage_permille,
     mem_used_mib, power_mw, energy_mj, sm_active_permille, tensor_active_permille)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
INSERT_PROC_SAMPLE = """
INSERT OR REPLACE INTO proc_sample (tick_id, gpu_id, proc_id, kind, mem_mib, sm_util, cpu_permille, rss_mib)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""
# What `gua-report now` reads instead of history: the fold of schema.py
# (_BACKFILL_PROC_STATE is the same in one statement), one row per (GPU,
# process) per tick, in the tick's transaction. :active is 1 when the row's
# sm_util * 10 >= schema.ACTIVE_PERMILLE, :unknown when sm_util is NULL,
# :start the tick's ts_ms - duration_ms.
UPSERT_PROC_STATE = """
INSERT INTO proc_gpu_state (gpu_id, proc_id, first_ms, known_from_ms, last_active_ms, last_seen_ms)
VALUES (:gpu, :proc, :ts, :ts, CASE WHEN :active THEN :ts END, :ts)
ON CONFLICT (gpu_id, proc_id) DO UPDATE SET
    known_from_ms = CASE WHEN :unknown OR :start - last_seen_ms > :hole THEN :ts ELSE known_from_ms END,
    last_active_ms = CASE WHEN :active THEN :ts ELSE last_active_ms END,
    last_seen_ms = :ts
"""
# The first tick that stored a GPM value: a reader of a database without one
# (no Hopper GPU) leaves the GPM columns out of its raw queries.
INSERT_GPM_FIRST = "INSERT INTO meta (key, value) VALUES ('gpm_first_ms', ?) ON CONFLICT (key) DO NOTHING"
INSERT_EVENT = """
INSERT INTO event (ts_ms, end_ms, run_id, kind, gpu_id, detail)
VALUES (?, ?, ?, ?, ?, ?)
"""
# The latest tick and whether the run that wrote it stopped cleanly; uses tick_ts.
SELECT_LAST_TICK = """
SELECT tick.ts_ms, run.stopped_ms
FROM tick JOIN run USING (run_id)
ORDER BY tick.ts_ms DESC
LIMIT 1
"""

# --- retention -----------------------------------------------------------------
# Oldest ticks first through tick_ts; the fact tables' primary keys start
# with tick_id, so each DELETE is a handful of index range seeks.
SELECT_PRUNE_BATCH = "SELECT tick_id FROM tick WHERE ts_ms < ? ORDER BY ts_ms LIMIT ?"
DELETE_PRUNE = (
    *compact.DELETE_ROWS,
    "DELETE FROM tick WHERE tick_id IN (SELECT value FROM json_each(?))",
)
# proc_gpu_state keeps a (GPU, process) while it was seen after :before (the
# retention cut) and within a day of the newest tick; a scan of a small table,
# once at the end of each pruning pass.
DELETE_PROC_STATE = """
DELETE FROM proc_gpu_state
WHERE last_seen_ms < max(:before, coalesce((SELECT max(ts_ms) FROM tick), :before) - :keep)
"""
PROC_STATE_KEEP_MS = 86_400_000
# Per-unit rollups (one unit per Slurm job or container: a busy cluster's
# largest rollups, by far) older than unit_retention, a day of hours a batch;
# both tables are keyed by hour first.
SELECT_OLDEST_UNIT_HOUR = "SELECT min(hour) FROM hour_unit"
DELETE_UNIT_ROLLUPS = (
    "DELETE FROM hour_unit WHERE hour < :upto",
    "DELETE FROM hour_unit_hist WHERE hour < :upto",
)
UNIT_PRUNE_BATCH_HOURS = 24
PRUNE_BATCH = 2000  # raw ticks a transaction
# A process row goes once no retained raw row can refer to it: it was last
# seen (last_ms, up to schema.PROCESS_LAST_STEP_MS early) before the cut, and
# proc_gpu_state (pruned just before) has no row of it. Seeks process_last.
DELETE_PROCESSES = """
DELETE FROM process
WHERE last_ms < :before - :step
  AND proc_id NOT IN (SELECT proc_id FROM proc_gpu_state)
"""


class StoreError(Exception):
    """The database cannot be used; kind names which problem, for the exit code."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        # 'path', 'permission', 'not_sqlite', 'not_gua', 'newer', 'corrupt', 'locked', 'transient'
        self.kind = kind


@dataclass(frozen=True)
class LastTick:
    """Where the previous run left off."""

    ts_ms: int
    clean_stop: bool


class Store:
    """One open gua database, held by this process alone (an flock on the file itself)."""

    def __init__(self, conn: sqlite3.Connection, lock: _InodeLock, path: str) -> None:
        self._conn = conn
        self._lock = lock
        self.path = path
        self.notes: list[str] = []  # what opening changed (file modes), for the log
        self._run_id: int | None = None
        self._gpus: dict[str, tuple[int, int]] = {}
        self._accounts: dict[tuple[int | None, str], int] = {}
        # (pid, start_ms) -> [proc_id, the last_ms stored for it]
        self._procs: dict[tuple[int, int], list[int]] = {}
        self._gpm_noted = False  # meta gpm_first_ms written (or found) in this run
        self._rollups = Rollups(conn)

    # --- opening -------------------------------------------------------------
    @classmethod
    def open(cls, path: str, *, now_ms: int, on_upgrade: Callable[[int, int], None] | None = None) -> Store:
        """Open (creating 0640 if absent), lock by inode and migrate.

        Raises StoreError, leaving foreign files untouched. kind 'transient'
        (disk full, I/O error, busy) means the file is fine and a later try may work.
        on_upgrade(old, new) is called before a schema upgrade (schema.ensure_schema).
        """
        path = os.path.abspath(path)
        directory = os.path.dirname(path)
        try:
            os.stat(directory)
        except FileNotFoundError:
            raise StoreError("path", f"database directory {directory} does not exist") from None
        except PermissionError:
            raise StoreError("permission", f"cannot reach database directory {directory}: permission denied") from None
        if not os.path.isdir(directory):
            raise StoreError("path", f"{directory} is not a directory")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StoreError("permission", f"cannot write database directory {directory}: permission denied")
        _check_header(path)
        lock = _lock_database(path)
        try:
            conn = _connect(path, now_ms, on_upgrade)
            notes = _tighten_modes(path)
        except BaseException:
            lock.close()
            raise
        store = cls(conn, lock, path)
        store.notes = notes
        return store

    def close(self) -> None:
        """Checkpoint, truncate the WAL and close; the inode lock goes last (see _lock_database)."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self._conn.close()
        self._lock.close()

    def bound_wal(self) -> None:
        """Truncate a WAL that outgrew its limit, once no reader still needs its frames.

        SQLite restarts the WAL from its start when a checkpoint completes,
        but keeps the file's size; a reader holding a snapshot for minutes
        lets it grow without bound meanwhile. journal_size_limit trims it at
        each restart; this catches the case where no restart happens soon.
        """
        try:
            size = os.stat(self.path + "-wal").st_size
        except OSError:
            return
        if size <= WAL_LIMIT_BYTES:
            return
        try:
            # Neither call may wait for a reader: the loop must not block on them.
            _, log, done = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if log == done:
                self._conn.execute("PRAGMA busy_timeout = 0")
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                finally:
                    self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error:
            pass

    # --- runs ------------------------------------------------------------------
    def last_tick(self) -> LastTick | None:
        """The newest tick already stored, if any."""
        try:
            row = self._conn.execute(SELECT_LAST_TICK).fetchone()
        except sqlite3.DatabaseError as error:
            # The first query that reads data pages: where a damaged file shows.
            raise _database_error(self.path, error) from None
        return None if row is None else LastTick(row[0], row[1] is not None)

    def begin_run(self, started_ms: int, interval_ms: int, backend: str, hostname: str, version: str) -> int:
        """Record this collector start; returns the run id."""
        with self._transaction():
            cur = self._conn.execute(INSERT_RUN, (started_ms, interval_ms, backend, hostname, version))
            self._run_id = int(cur.lastrowid or 0)
            self._conn.execute(INSERT_EVENT, (started_ms, None, self._run_id, "start", None, backend))
        return self._run_id

    def end_run(self, stopped_ms: int, detail: str = "") -> None:
        """Mark the run stopped cleanly."""
        with self._transaction():
            self._conn.execute(UPDATE_RUN_STOPPED, (stopped_ms, self._run_id))
            self._conn.execute(INSERT_EVENT, (stopped_ms, None, self._run_id, "stop", None, detail))

    # --- writing ---------------------------------------------------------------
    def write_ticks(self, ticks: list[Tick]) -> None:
        """Write ticks (and their events) in one transaction, rolling up finished hours."""
        with self._transaction():
            for tick in ticks:
                self._write_tick(tick)

    def write_events(self, events: list[Event]) -> None:
        """Write events that belong to no tick."""
        with self._transaction():
            for event in events:
                self._write_event(event)

    def _write_tick(self, tick: Tick) -> None:
        conn = self._conn
        cur = conn.execute(INSERT_TICK, (self._run_id, tick.ts_ms, tick.duration_ms, tick.host_cpu_permille))
        tick_id = cur.lastrowid
        gpu_rows = []
        proc_rows = []
        state_rows: list[dict[str, object]] = []
        start = tick.ts_ms - tick.duration_ms
        for sample in tick.gpus:
            gpu_id = self._gpu_id(sample.gpu)
            gpu_rows.append(
                (
                    tick_id,
                    gpu_id,
                    sample.status,
                    sample.util_permille,
                    _stored_coverage(sample.util_permille, sample.coverage_permille),
                    sample.mem_used_mib,
                    sample.power_mw if sample.energy_mj is None else None,
                    sample.energy_mj,
                    sample.sm_active_permille,
                    sample.tensor_active_permille,
                )
            )
            for proc in sample.procs:
                proc_id = self._proc_id(proc.process, tick.ts_ms)
                proc_rows.append(
                    (tick_id, gpu_id, proc_id, proc.kind, proc.mem_mib, proc.sm_util, proc.cpu_permille, proc.rss_mib)
                )
                sm = proc.sm_util
                state_rows.append({
                    "gpu": gpu_id, "proc": proc_id, "ts": tick.ts_ms, "start": start,
                    "active": sm is not None and sm * 10 >= schema.ACTIVE_PERMILLE,
                    "unknown": sm is None, "hole": schema.PROC_STATE_HOLE_MS,
                })
        conn.executemany(INSERT_GPU_SAMPLE, gpu_rows)
        if not self._gpm_noted and any(
                s.sm_active_permille is not None or s.tensor_active_permille is not None for s in tick.gpus):
            conn.execute(INSERT_GPM_FIRST, (str(tick.ts_ms),))
            self._gpm_noted = True
        conn.executemany(INSERT_PROC_SAMPLE, proc_rows)
        conn.executemany(UPSERT_PROC_STATE, state_rows)
        for event in tick.events:
            self._write_event(event)
        self._rollups.before(tick.ts_ms // HOUR_MS)

    def _write_event(self, event: Event) -> None:
        gpu_id = self._gpus[event.gpu_uuid][0] if event.gpu_uuid in self._gpus else None
        if gpu_id is None and event.gpu_uuid is not None:
            row = self._conn.execute(SELECT_GPU, (event.gpu_uuid,)).fetchone()
            gpu_id = row[0] if row else None
        self._conn.execute(
            INSERT_EVENT, (event.ts_ms, event.end_ms, self._run_id, event.kind, gpu_id, event.detail)
        )

    # --- dimensions --------------------------------------------------------------
    def _gpu_id(self, gpu: GpuInfo) -> int:
        cached = self._gpus.get(gpu.uuid)
        if cached is None:
            row = self._conn.execute(SELECT_GPU, (gpu.uuid,)).fetchone()
            if row is None:
                parent = self._gpu_id_by_uuid(gpu.parent_uuid)
                cur = self._conn.execute(
                    INSERT_GPU, (gpu.uuid, gpu.index, gpu.name, gpu.memory_total, parent, gpu.mig_slot)
                )
                row = (int(cur.lastrowid or 0), gpu.index)
            cached = self._gpus[gpu.uuid] = (row[0], row[1])
        if cached[1] != gpu.index:
            # NVML order changed (reboot, hot-plug): the UUID is the identity.
            self._conn.execute(UPDATE_GPU_INDEX, (gpu.index, cached[0]))
            cached = self._gpus[gpu.uuid] = (cached[0], gpu.index)
        return cached[0]

    def _gpu_id_by_uuid(self, uuid: str | None) -> int | None:
        if uuid is None:
            return None
        if uuid in self._gpus:
            return self._gpus[uuid][0]
        row = self._conn.execute(SELECT_GPU, (uuid,)).fetchone()
        return row[0] if row else None

    def _account_id(self, uid: int | None, username: str) -> int:
        key = (uid, username)
        if key not in self._accounts:
            row = self._conn.execute(SELECT_ACCOUNT, key).fetchone()
            if row is None:
                row = (self._conn.execute(INSERT_ACCOUNT, key).lastrowid,)
            self._accounts[key] = int(row[0])
        return self._accounts[key]

    def _proc_id(self, proc: ProcessInfo, ts_ms: int) -> int:
        """The process's row id; its last_ms moves forward at most once per PROCESS_LAST_STEP_MS."""
        key = (proc.pid, proc.start_ms)
        cached = self._procs.get(key)
        if cached is None:
            row = self._conn.execute(SELECT_PROCESS, key).fetchone()
            if row is None:
                account = self._account_id(proc.uid, proc.username)
                cur = self._conn.execute(
                    INSERT_PROCESS, (proc.pid, proc.start_ms, account, proc.comm, proc.cgroup, proc.unit, ts_ms)
                )
                row = (int(cur.lastrowid or 0), ts_ms)
            cached = self._procs[key] = [int(row[0]), int(row[1])]
        if ts_ms - cached[1] >= schema.PROCESS_LAST_STEP_MS:
            self._conn.execute(UPDATE_PROCESS_LAST, (ts_ms, cached[0]))
            cached[1] = ts_ms
        return cached[0]

    # --- retention -------------------------------------------------------------------
    def prune(self, before_ms: int, batch: int = PRUNE_BATCH) -> int:
        """Delete one batch of raw ticks older than before_ms; returns how many ticks went.

        The last batch of a pass (fewer than `batch`) also drops proc_gpu_state
        rows of processes not seen since before_ms or for a day before the newest
        tick, then the process rows nothing retained refers to any more.
        """
        with self._transaction():
            ids = [row[0] for row in self._conn.execute(SELECT_PRUNE_BATCH, (before_ms, batch))]
            if ids:
                as_json = "[" + ",".join(map(str, ids)) + "]"
                for statement in DELETE_PRUNE:
                    self._conn.execute(statement, (as_json,))
                self._rollups.set_meta("raw_pruned_before_ms", str(before_ms))
            if len(ids) < batch:
                self._conn.execute(compact.DELETE_CHUNKS, (before_ms // HOUR_MS,))
                self._conn.execute(DELETE_PROC_STATE, {"before": before_ms, "keep": PROC_STATE_KEEP_MS})
                gone = self._conn.execute(
                    DELETE_PROCESSES, {"before": before_ms, "step": schema.PROCESS_LAST_STEP_MS}
                ).rowcount
                if gone:
                    self._procs.clear()  # a pruned id must never be written again
        return len(ids)

    def compact(self, head_hours: int = compact.HEAD_HOURS) -> compact.Compacted | None:
        """Compact the oldest raw hour that may be (compact.py), in its own transaction; None when none may."""
        with self._transaction():
            return compact.compact_oldest(self._conn, head_hours)

    def prune_units(self, before_ms: int) -> bool:
        """Delete a day's per-unit rollups older than before_ms (hour_unit, hour_unit_hist); True while older remain.

        meta `units_pruned_before_hour` says from which hour on they are kept:
        the reporter tells a window that reaches back further that its units
        are incomplete.
        """
        before_hour = before_ms // HOUR_MS
        with self._transaction():
            oldest = self._conn.execute(SELECT_OLDEST_UNIT_HOUR).fetchone()[0]
            if oldest is None or oldest >= before_hour:
                return False
            upto = min(before_hour, oldest + UNIT_PRUNE_BATCH_HOURS)
            for sql in DELETE_UNIT_ROLLUPS:
                self._conn.execute(sql, {"upto": upto})
            self._rollups.set_meta("units_pruned_before_hour", str(upto))
        return upto < before_hour

    # --- transactions -------------------------------------------------------------------
    def _transaction(self) -> _Transaction:
        return _Transaction(self)

    def _forget_caches(self) -> None:
        """After a rollback, ids and rollup progress cached inside it are void (reloaded lazily)."""
        self._gpus.clear()
        self._accounts.clear()
        self._procs.clear()
        self._gpm_noted = False
        self._rollups.forget()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK and forget cached ids."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __enter__(self) -> None:
        self._store._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        conn = self._store._conn
        if exc_type is None:
            try:
                conn.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        conn = self._store._conn
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        self._store._forget_caches()


def _stored_coverage(util_permille: int | None, coverage_permille: int | None) -> int | None:
    """Schema 3 stores full coverage of a known utilization as NULL (2 bytes less a row)."""
    if util_permille is not None and coverage_permille == 1000:
        return None
    return coverage_permille


def _check_header(path: str) -> None:
    """Refuse a file that is not SQLite before SQLite touches it."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except PermissionError:
        raise StoreError("permission", f"cannot read {path}: permission denied") from None
    except IsADirectoryError:
        raise StoreError("not_sqlite", f"{path} is a directory, not an SQLite database") from None
    if head and head != SQLITE_MAGIC:
        raise StoreError("not_sqlite", f"{path} is not an SQLite database; refusing to touch it")


class _InodeLock:
    """An exclusive flock on the database file, held for the process's life."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def close(self) -> None:
        # Closing any descriptor of the file drops the process's POSIX locks
        # on it, SQLite's included: only ever close after the connection.
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _lock_database(path: str) -> _InodeLock:
    """Lock the database inode so that every path to it (symlink, hard link) is refused.

    flock locks are separate from the POSIX locks SQLite takes on the same
    file, so the two never interfere; a lock file beside the DB would be
    bypassed by a second path to the same inode.
    """
    try:
        fd = _open_or_create(path)
    except PermissionError:
        raise StoreError("permission", f"cannot open {path} for writing: permission denied") from None
    except IsADirectoryError:
        raise StoreError("not_sqlite", f"{path} is a directory, not an SQLite database") from None
    except OSError as error:
        if error.errno in _TRANSIENT_ERRNO:
            raise StoreError("transient", f"cannot create {path}: {error.strerror}") from None
        raise StoreError("path", f"cannot open {path}: {error.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError("not_sqlite", f"{path} is not a regular file; refusing to touch it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError("locked", f"another gua-collector is already writing {path}") from None
    except BaseException:
        os.close(fd)
        raise
    return _InodeLock(fd)


def _open_or_create(path: str) -> int:
    """The DB file's descriptor; a new file gets 0640 whatever the umask (readers need the group bit)."""
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, DB_MODE)
    except FileExistsError:
        return os.open(path, flags)
    os.fchmod(fd, DB_MODE)
    return fd


def _tighten_modes(path: str) -> list[str]:
    """Take away any permission beyond 0640 on the DB, -wal and -shm; say what changed.

    A DB touched by an admin (0644) would let every local account read it;
    -wal and -shm copy the DB's mode when SQLite creates them.
    """
    notes = []
    for name in (path, path + "-wal", path + "-shm"):
        try:
            mode = stat.S_IMODE(os.lstat(name).st_mode)
        except FileNotFoundError:
            continue
        wanted = mode & DB_MODE
        if wanted == mode:
            continue
        try:
            os.chmod(name, wanted, follow_symlinks=False)
            notes.append(f"mode of {name} was {mode:04o}, now {wanted:04o}")
        except OSError as error:
            notes.append(f"mode of {name} is {mode:04o}, cannot change it: {error.strerror}")
    return notes


def _transient(error: BaseException) -> bool:
    """True for SQLite errors that say nothing about the file: full disk, I/O, busy.

    The error that reaches us may be a follow-up (a ROLLBACK that failed
    because SQLite had already rolled back on SQLITE_FULL); the cause is
    then in __context__.
    """
    seen: BaseException | None = error
    while seen is not None:
        name = getattr(seen, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_NOMEM")):
            return True
        if isinstance(seen, OSError) and seen.errno in _TRANSIENT_ERRNO:
            return True
        seen = seen.__context__
    return False


def _intact(path: str) -> bool:
    """quick_check on a fresh read-only connection: only this may call a file corrupt."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return True  # cannot even look: not evidence of corruption
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        return bool(conn.execute("PRAGMA quick_check").fetchone()[0] == "ok")
    except sqlite3.DatabaseError as error:
        return _transient(error) or "malformed" not in str(error) and "not a database" not in str(error)
    finally:
        conn.close()


def _database_error(path: str, error: sqlite3.DatabaseError) -> StoreError:
    """Corrupt only when an integrity check says so; anything else may pass."""
    if _transient(error) or _intact(path):
        return StoreError("transient", f"cannot use {path} now: {_root_cause(error)}")
    return StoreError("corrupt", f"{path} is corrupt: {error}")


def _root_cause(error: BaseException) -> BaseException:
    """The first error of a chain (a failed ROLLBACK reports itself, not the full disk behind it)."""
    while error.__context__ is not None and isinstance(error.__context__, (sqlite3.Error, OSError)):
        error = error.__context__
    return error


def _connect(path: str, now_ms: int, on_upgrade: Callable[[int, int], None] | None) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        try:
            version = schema.read_version(conn)
            if version == 0:
                foreign = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
            else:
                foreign = not schema.is_gua(conn)
        except sqlite3.DatabaseError as error:
            raise _database_error(path, error) from None
        if version > schema.SCHEMA_VERSION:
            raise StoreError(
                "newer",
                f"{path} has schema version {version}, newer than this collector's {schema.SCHEMA_VERSION}; upgrade gua",
            )
        if foreign:
            raise StoreError("not_gua", f"{path} is an SQLite database but not a gua database")
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
            schema.ensure_schema(conn, now_ms, on_upgrade)
        except schema.SchemaError as error:
            raise StoreError("not_gua", f"{path}: {error}") from None
        except sqlite3.DatabaseError as error:
            raise _database_error(path, error) from None
    except BaseException:
        conn.close()
        raise
    return conn
