"""Exit codes and the one exception type the CLI turns into a one-line error."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    """Process exit codes; documented in --help and JSON.md, tested one by one."""

    OK = 0
    BAD_ARGS = 2  # also argparse's own code for usage errors
    DB_MISSING = 3
    PERMISSION = 4
    NOT_GUA = 5
    SCHEMA_NEWER = 6
    CORRUPT = 7
    EMPTY_WINDOW = 8


EXIT_TABLE = (
    (Exit.OK, "report written"),
    (Exit.BAD_ARGS, "bad arguments (unknown option, bad duration, unknown --gpu)"),
    (Exit.DB_MISSING, "database file does not exist (or has no data outside a stale -wal)"),
    (Exit.PERMISSION, "permission denied (join the group that owns the file)"),
    (Exit.NOT_GUA, "file is not a gua database"),
    (Exit.SCHEMA_NEWER, "database schema is newer than this gua-report"),
    (Exit.CORRUPT, "database file is corrupt"),
    (Exit.EMPTY_WINDOW, "no samples in the requested window"),
)


class ReportError(Exception):
    """An expected failure: printed as one line, mapped to an exit code."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
