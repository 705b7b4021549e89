"""gua-report command line: arguments, exit codes, and nothing else.

Every expected failure becomes one line on stderr, `gua-report: error: ...`,
and a distinct exit code (errors.Exit); tracebacks are for bugs only. With
--format json a failure after the command line was accepted also prints a
small JSON document on stdout, so a script always gets JSON (JSON.md).

Start-up time is most of what a short report costs (a one-hour window reads
in ~10 ms), so modules are imported where they are first needed: --version,
--help and the merge, now and --ssh commands never load the report's
classification and SQL (classify, query), typing is for type checkers only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import __version__
from .errors import EXIT_TABLE, Exit, ReportError, escape
from .render_json import FORMAT_VERSION

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms)
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Sequence
    from typing import TextIO, TypeVar

    from .classify import Options
    from .hourly import HourRow

    T = TypeVar("T")

DEFAULT_DB = "/var/lib/gua/gua.db"
# --table NAME of --format csv (render_table.TABLES, not imported at start-up).
TABLES = ("gpu", "identity", "unit", "hour", "heatmap", "event")
_KNOWN_USERS_SHOWN = 20  # an error line names at most this many users


# Words that select a command of their own when they come first (run()).
COMMANDS = ("now", "merge")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as our one-line format (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        words = message.split(": ", 1)[-1].split() if message.startswith("unrecognized arguments") else []
        command = next((w for w in words if w in COMMANDS), None)
        if command:  # `gua-report --db X now`: the command word must come first, as with git
            message += f" (the command comes first: {self.prog} {command} [OPTIONS], e.g. --db after it)"
        # The message quotes what was typed, which may hold terminal controls.
        self.exit(Exit.BAD_ARGS, f"{self.prog}: error: {escape(message, ascii_only=False)}\n")


def _columns() -> int:
    """shutil.get_terminal_size().columns, without importing shutil (it loads bz2, lzma: ~2 ms)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]  # None: AttributeError below
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, as wide as argparse makes it (the terminal less 2).

    argparse makes one for every add_argument and asks shutil (imported for
    it) for the terminal's width each time; a report never prints help, so
    that was start-up time spent for nothing. make_parser asks once.
    """

    columns = 80  # the terminal's, set by make_parser

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, self.columns - 2 if width is None else width)


def _exit_code_line(code: int, text: str) -> str:
    """One row of the exit code table, wrapped under its text to fit 80 columns."""
    line = f"{code:>3}  {text}"
    if len(line) <= 80:
        return line
    import textwrap  # only for a long row; start-up stays cheap

    return textwrap.fill(text, 80, initial_indent=f"{code:>3}  ", subsequent_indent=" " * 5)


def _epilog() -> str:
    codes = "\n".join(_exit_code_line(int(c), text) for c, text in EXIT_TABLE)
    return (
        "WHEN: a duration before --until (90m, 12h, 1h30m, 7d, 2w); journalctl's\n"
        "forms, which count from now: now, today, yesterday (local midnight),\n"
        "-2h or '2h ago', @EPOCH; a date 2026-11-28 or 'YYYY-MM-DD HH:MM[:SS]'\n"
        "(also ISO 8601 with T and an offset), read in --tz unless it ends in a\n"
        "zone ('2026-11-28 10:00 UTC'). Times after now (+2h) are refused.\n\n"
        "A GPU-tick is active when SM utilization >= --active-threshold, idle-held\n"
        "when below it while compute processes hold > --held-threshold of memory\n"
        "(or memory NVML cannot report), else truly idle. --user selects rows of\n"
        "the identities section only: the other sections describe whole GPUs.\n"
        "The database is opened read-only; reading it needs membership of the\n"
        "group that owns it. Names from the database are printed with control\n"
        "and bidi characters escaped (\\x1b, \\u202e); JSON has them exactly.\n\n"
        f"exit codes:\n{codes}\n\n"
        f"JSON and CSV output are a versioned contract (format_version {FORMAT_VERSION}),\n"
        "documented in JSON.md beside the gua_report package sources. With\n"
        "--format json, an error (exit 3-8, or 2 for a bad value) also prints\n"
        '{"format_version": N, "error": {"code": C, "message": ...}} on stdout.\n\n'
        "environment: NO_COLOR (non-empty: no colour with --color=auto), TERM\n"
        "(unset or dumb: no colour with --color=auto), TZ (the default --tz)."
    )


def make_parser() -> argparse.ArgumentParser:
    _Formatter.columns = _columns()
    p = _Parser(
        prog="gua-report",
        description="Read-only report of active, idle-held and truly idle GPU time\n"
        "from a gua-collector database.",
        epilog=_epilog(),
        formatter_class=_Formatter,
    )
    p.add_argument("--db", default=DEFAULT_DB, metavar="PATH", help=f"database (default {DEFAULT_DB})")
    p.add_argument("--since", default="7d", metavar="WHEN",
                   help="start: a duration before --until (90m, 7d), -2h, today, yesterday, "
                        "a date or 'YYYY-MM-DD HH:MM' in --tz; see WHEN below (default 7d)")
    p.add_argument("--until", default="now", metavar="WHEN",
                   help="end, in the same forms; a duration is before now (default now)")
    p.add_argument("--gpu", action="append", default=[], metavar="INDEX|UUID",
                   help="only this GPU (repeatable); its MIG instances come with it")
    p.add_argument("--user", action="append", default=[], metavar="NAME|UID",
                   help="only this user in the identities section (repeatable); GPU totals, "
                        "per-GPU, heatmap and energy still count every user")
    p.add_argument("--tz", default=None, metavar="ZONE",
                   help="IANA time zone for times and the heatmap (default: the host's zone)")
    p.add_argument("--active-threshold", default="10", metavar="PERCENT",
                   help="SM utilization at or above which a GPU-tick is active (default 10)")
    p.add_argument("--held-threshold", default="100MB", metavar="SIZE",
                   help="compute memory above which a GPU is held, with a unit: B, kB, MB, "
                        "GB, TB or KiB, MiB, GiB, TiB; only 0 may omit it (default 100MB)")
    p.add_argument("--format", choices=("text", "json", "csv"), default="text",
                   help="text (80 columns, default), json (a versioned contract) or csv "
                        "(section,subject,metric,value; or one table, see --table)")
    p.add_argument("--table", choices=TABLES, metavar="{" + ",".join(TABLES) + "}",
                   help="with --format csv: one rectangular table with a header row instead "
                        "of the long one: a row per GPU, user, (user, unit), local hour and "
                        "GPU (a time series), weekday and hour of the heatmap, or data-quality "
                        "event (gap, hole, collector run, error); times ISO 8601 in --tz")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour in text output: auto (default) only on a terminal, "
                        "with NO_COLOR empty or unset and TERM not dumb")
    p.add_argument("--no-rollups", action="store_true",
                   help="verification: ignore the hourly rollups, classify every raw row (slow)")
    p.add_argument("--version", action="version", version=f"gua-report {__version__}")
    fleet = p.add_argument_group(
        "fleet", "one report across servers; to merge saved JSON documents instead:\n"
        "gua-report merge FILE... (see gua-report merge --help)")
    fleet.add_argument("--ssh", metavar="HOSTS",
                       help="run this report (same window, thresholds, --gpu, --user, --db) on each "
                            "host, comma-separated [user@]host, with your ssh in BatchMode, all at once, "
                            "and print one fleet report; a host that fails is a line in it")
    fleet.add_argument("--ssh-command", default="gua-report", metavar="CMD",
                       help="the program to run on each host, split into words as a shell would "
                            "(default gua-report; e.g. /opt/gua/bin/gua-report or 'sudo -n -u gua "
                            "gua-report')")
    fleet.add_argument("--ssh-config", metavar="FILE", help="ssh_config file to use (ssh -F)")
    fleet.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                       help="an ssh option (ssh -o), repeatable; e.g. ConnectTimeout=30 (default 10)")
    fleet.add_argument("--ssh-timeout", default="120s", metavar="DURATION",
                       help="overall limit for all hosts; a host still running then is a line (default 120s)")
    return p


def _parse(option: str, value: str, parse: Callable[..., T], *extra: object) -> T:
    """Run one value parser; its error names the option, as argparse's do."""
    from .window import WindowError

    try:
        return parse(value, *extra)
    except WindowError as exc:
        raise WindowError(f"argument {option}: {exc}") from None


def _options(args: argparse.Namespace, now_ms: int) -> Options:
    from .classify import Options
    from .window import WindowError, parse_bytes, parse_instant, parse_percent_permille, zone

    tz, tz_name = _parse("--tz", args.tz, zone)
    until = _parse("--until", args.until, parse_instant, now_ms, tz)
    # A plain duration for --since is a window length ending at --until, so
    # `--since 7d --until 2024-05-01` means the week before May; journalctl's
    # forms (-2h, today) count from now, as they do in journalctl.
    since = _parse("--since", args.since, parse_instant, now_ms, tz, until)
    if since >= until:
        raise WindowError(f"--since ({args.since}) must be before --until ({args.until})")
    return Options(
        since_ms=since,
        until_ms=until,
        tz=tz,
        tz_name=tz_name,
        active_pm=_parse("--active-threshold", args.active_threshold, parse_percent_permille),
        held_bytes=_parse("--held-threshold", args.held_threshold, parse_bytes),
        gpus=tuple(args.gpu),
        users=tuple(args.user),
        use_rollups=not args.no_rollups,
    )


def _check_users(conn: sqlite3.Connection, selectors: Sequence[str]) -> None:
    """A --user that names no account in the database is a typo: say so (exit 2).

    Matches as the identities section does: a username, or a uid in digits.
    A known user without samples in the window is not an error (exit 0).
    """
    if not selectors:
        return
    from .query import accounts
    from .window import WindowError

    rows = accounts(conn).values()
    known = {name for _, name in rows} | {str(uid) for uid, _ in rows if uid is not None}
    for sel in selectors:
        if sel.strip() not in known:
            names = sorted({name for _, name in rows})
            shown = ", ".join(names[:_KNOWN_USERS_SHOWN]) or "none"
            more = len(names) - _KNOWN_USERS_SHOWN
            raise WindowError(f"no user matches --user {sel!r} (users in this database: {shown}"
                              + (f", and {more} more)" if more > 0 else ")"))


def _colour(when: str, stream: TextIO) -> bool:
    """--color: auto means a terminal that can show colour and a user who wants it.

    NO_COLOR counts only when non-empty (no-color.org); an explicit --color
    overrides it. TERM unset or 'dumb' cannot show escapes (systemd's rule).
    """
    if when != "auto":
        return when == "always"
    if os.environ.get("NO_COLOR") or os.environ.get("TERM", "dumb") in ("", "dumb"):
        return False
    return stream.isatty()


def _attach_time_values(argv: Sequence[str]) -> list[str]:
    """`--since -2h` -> `--since=-2h`.

    argparse takes a value that starts with '-' and is not a plain negative
    number for an option and stops with "expected one argument"; journalctl
    (getopt) takes the word after --since whatever it is. Joining the two
    words lets admins type what journalctl taught them.
    """
    out: list[str] = []
    it = iter(argv)
    for word in it:
        if word == "--":
            out += [word, *it]
        elif word in ("--since", "--until"):
            value = next(it, None)
            if value is not None and value[:1] == "-" and value[1:2].isdigit():
                out.append(f"{word}={value}")
            else:
                out += [word] if value is None else [word, value]
        else:
            out.append(word)
    return out


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["now"]:  # `gua-report now ...`: its own options and exit codes (now.py)
        from .now import run as run_now

        return run_now(argv[1:])
    if argv[:1] == ["merge"]:  # `gua-report merge FILE...`: one fleet report (merge.py)
        from .merge import run as run_merge

        return run_merge(argv[1:])
    parser = make_parser()
    args = parser.parse_args(_attach_time_values(argv))
    if args.table is not None and (args.format != "csv" or args.ssh is not None):
        parser.error("argument --table: only with --format csv" if args.format != "csv"
                     else "argument --table: not with --ssh (the fleet report has its own CSV)")
    now_ms = int(time.time() * 1000)
    if args.ssh is not None:  # `--ssh HOSTS`: this report on each host, merged (ssh.py)
        from .ssh import run as run_ssh

        return run_ssh(args, _options, now_ms, DEFAULT_DB)
    import sqlite3

    from .classify import build
    from .opendb import open_readonly
    from .window import WindowError

    hours: list[HourRow] | None = None  # --table hour's time series (hourly.py)
    try:
        opts = _options(args, now_ms)
        db = open_readonly(args.db)
        try:
            _check_users(db.conn, opts.users)
            if args.table == "hour":  # the time series: read with the report, in its transaction
                from .hourly import build as build_hourly

                rep, hours = build_hourly(db.conn, args.db, db.schema_version, opts, db.warning)
            else:
                rep = build(db.conn, args.db, db.schema_version, opts, db.warning)
        except sqlite3.DatabaseError as exc:
            msg = str(exc)
            if "malformed" in msg or "not a database" in msg:
                raise ReportError(Exit.CORRUPT, f"{args.db} is corrupt ({msg})") from None
            raise ReportError(Exit.CORRUPT, f"cannot read {args.db}: {msg}") from None
        finally:
            db.conn.close()
    except WindowError as exc:
        return _fail(Exit.BAD_ARGS, str(exc), args.format)
    except ReportError as exc:
        return _fail(exc.code, exc.message, args.format)

    if args.format == "json":
        from .render_json import render as render_json
        text = render_json(rep)
    elif args.format == "csv" and args.table is not None:
        from .render_table import render as render_table
        text = render_table(rep, args.table, hours)
    elif args.format == "csv":
        from .render_csv import render as render_csv
        text = render_csv(rep)
    else:
        from .render_text import render as render_text
        text = render_text(rep, colour=_colour(args.color, sys.stdout))
    _write(text)
    return Exit.OK


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `gua-report | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(code: Exit, message: str, fmt: str) -> int:
    # Messages quote paths, --user values and SQLite's words: escape controls.
    sys.stderr.write(f"gua-report: error: {escape(message, ascii_only=False)}\n")
    if fmt == "json":
        import json

        # json.dumps escapes every control and non-ASCII character itself.
        doc = {"format_version": FORMAT_VERSION, "generator": f"gua-report {__version__}",
               "error": {"code": int(code), "message": message}}
        _write(json.dumps(doc, indent=2) + "\n")
    return int(code)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run(argv)
    except KeyboardInterrupt:
        code = 130
    sys.exit(int(code))
