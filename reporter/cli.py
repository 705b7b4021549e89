"""gua-report command line: arguments, exit codes, and nothing else.

Every expected failure becomes one line on stderr, `gua-report: error: ...`,
and a distinct exit code (errors.Exit); tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from collections.abc import Sequence

from . import __version__
from .classify import Options, build
from .errors import EXIT_TABLE, Exit, ReportError
from .opendb import open_readonly
from .render_json import FORMAT_VERSION
from .window import WindowError, parse_bytes, parse_instant, parse_percent_permille, zone

DEFAULT_DB = "/var/lib/gua/gua.db"


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as our one-line format (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(Exit.BAD_ARGS, f"{self.prog}: error: {message}\n")


def _epilog() -> str:
    codes = "\n".join(f"  {int(c)}  {text}" for c, text in EXIT_TABLE)
    return (
        "A GPU-tick is active when SM utilization >= --active-threshold, idle-held\n"
        "when below it while compute processes hold > --held-threshold of memory\n"
        "(or memory NVML cannot report), else truly idle. The database is opened\n"
        "read-only; reading it needs membership of the group that owns it.\n\n"
        f"exit codes:\n{codes}\n\n"
        f"JSON and CSV output are a versioned contract (format_version {FORMAT_VERSION}), documented\n"
        "in JSON.md beside the gua_report package sources."
    )


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gua-report",
        description="Read-only report of active, idle-held and truly idle GPU time\n"
        "from a gua-collector database.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", default=DEFAULT_DB, metavar="PATH", help=f"database (default {DEFAULT_DB})")
    p.add_argument("--since", default="7d", metavar="WHEN",
                   help="start: a duration before --until (90m, 12h, 7d, 2w) or an ISO "
                        "date/datetime, read in --tz (default 7d)")
    p.add_argument("--until", default="now", metavar="WHEN",
                   help="end: 'now', a duration before now, or an ISO date/datetime (default now)")
    p.add_argument("--gpu", action="append", default=[], metavar="INDEX|UUID",
                   help="only this GPU (repeatable); its MIG instances come with it")
    p.add_argument("--user", action="append", default=[], metavar="NAME|UID",
                   help="only this user in the identities section (repeatable)")
    p.add_argument("--tz", default=None, metavar="ZONE",
                   help="IANA time zone for times and the heatmap (default: the host's zone)")
    p.add_argument("--active-threshold", default="10", metavar="PERCENT",
                   help="SM utilization at or above which a GPU-tick is active (default 10)")
    p.add_argument("--held-threshold", default="100MB", metavar="SIZE",
                   help="compute memory above which a GPU is held: MB, MiB, GB, GiB (default 100MB)")
    p.add_argument("--format", choices=("text", "json", "csv"), default="text",
                   help="text (80 columns, default), json (a versioned contract) or csv "
                        "(section,subject,metric,value)")
    p.add_argument("--no-rollups", action="store_true",
                   help="verification: ignore the hourly rollups, classify every raw row (slow)")
    p.add_argument("--version", action="version", version=f"gua-report {__version__}")
    return p


def _options(args: argparse.Namespace, now_ms: int) -> Options:
    tz, tz_name = zone(args.tz)
    until = parse_instant(args.until, now_ms, tz)
    # A duration for --since is a window length ending at --until, so
    # `--since 7d --until 2024-05-01` means the week before May.
    since = parse_instant(args.since, until, tz)
    if since >= until:
        raise WindowError(f"--since ({args.since}) must be before --until ({args.until})")
    return Options(
        since_ms=since,
        until_ms=until,
        tz=tz,
        tz_name=tz_name,
        active_pm=parse_percent_permille(args.active_threshold),
        held_bytes=parse_bytes(args.held_threshold),
        gpus=tuple(args.gpu),
        users=tuple(args.user),
        use_rollups=not args.no_rollups,
    )


def run(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    now_ms = int(time.time() * 1000)
    try:
        opts = _options(args, now_ms)
        db = open_readonly(args.db)
        try:
            rep = build(db.conn, args.db, db.schema_version, opts, db.warning)
        except sqlite3.DatabaseError as exc:
            msg = str(exc)
            if "malformed" in msg or "not a database" in msg:
                raise ReportError(Exit.CORRUPT, f"{args.db} is corrupt ({msg})") from None
            raise ReportError(Exit.CORRUPT, f"cannot read {args.db}: {msg}") from None
        finally:
            db.conn.close()
    except WindowError as exc:
        return _fail(Exit.BAD_ARGS, str(exc))
    except ReportError as exc:
        return _fail(exc.code, exc.message)

    if args.format == "json":
        from .render_json import render as render_json
        text = render_json(rep)
    elif args.format == "csv":
        from .render_csv import render as render_csv
        text = render_csv(rep)
    else:
        from .render_text import render as render_text
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        text = render_text(rep, colour=colour)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `gua-report | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return Exit.OK


def _fail(code: Exit, message: str) -> int:
    sys.stderr.write(f"gua-report: error: {message}\n")
    return int(code)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run(argv)
    except KeyboardInterrupt:
        code = 130
    sys.exit(int(code))
