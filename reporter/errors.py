"""Exit codes, the one exception type the CLI turns into a one-line error,
and the escaping of strings that come from the database or the host before
they reach a terminal (DESIGN.md, threat model).
"""

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
    NOT_RECORDING = 9  # gua-report now: the newest tick is too old to call "now"
    BAD_DOCUMENT = 10  # merge: a FILE is not a gua-report JSON document
    NO_HOST = 11  # merge, --ssh: the report was written, but no host could be added to the fleet


EXIT_TABLE = (
    (Exit.OK, "report written"),
    (Exit.BAD_ARGS, "bad arguments (unknown option, bad time or size, unknown --gpu or --user)"),
    (Exit.DB_MISSING, "database file does not exist (or has no data outside a stale -wal)"),
    (Exit.PERMISSION, "permission denied (join the group that owns the file)"),
    (Exit.NOT_GUA, "file is not a gua database"),
    (Exit.SCHEMA_NEWER, "database schema is newer than this gua-report"),
    (Exit.CORRUPT, "database file is corrupt"),
    (Exit.EMPTY_WINDOW, "no samples in the requested window"),
    (Exit.NOT_RECORDING, "collector not recording (gua-report now: newest tick too old)"),
    (Exit.BAD_DOCUMENT, "merge: a FILE is unreadable or not a gua-report JSON document"),
    (Exit.NO_HOST, "merge, --ssh: fleet report written, but no host could be added to it"),
)
# Codes a plain window report never returns; `now --help` leaves these out.
FLEET_ONLY = (Exit.BAD_DOCUMENT, Exit.NO_HOST)


class ReportError(Exception):
    """An expected failure: printed as one line, mapped to an exit code."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escaped_char(c: str) -> str:
    named = _NAMED_ESCAPES.get(c)
    if named:
        return named
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def escape(text: str, ascii_only: bool = True) -> str:
    """`text` with every character that could act on a terminal written as an escape.

    Names, units, GPU names, host names and event details come from other
    users, the driver or the host: an ESC could recolour or clear the admin's
    screen, a newline forge a report line, a right-to-left override (U+202E)
    or another bidi control reorder what the admin reads. Such characters
    become visible and inert: \\x1b, \\u202e, \\n. Kept: printable ASCII, and
    with ascii_only=False every printable character (str.isprintable: no
    C0/C1 control, no format or bidi character, no line separator).
    The text report is ASCII only (ascii_only=True): one character is then
    one column whatever the locale, so the tables keep their widths, and a
    terminal in a non-UTF-8 locale cannot fail on a name. JSON carries the
    exact strings. A backslash is kept as is, so systemd's own escapes in
    unit names (\\x2d) read as systemctl shows them.
    """
    if text.isascii() and text.isprintable():
        return text
    return "".join(
        c if (" " <= c <= "~" or (not ascii_only and c.isprintable())) else _escaped_char(c) for c in text
    )
