"""gua-collector command line: options, config file, exit codes."""

from __future__ import annotations

import argparse
import configparser
import os
import shutil
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

from . import __version__
from .backend import Backend
from .check import FAIL, Host, render, run_checks
from .clock import Clock, RealClock, SimClock
from .durations import parse_duration_ms
from .notify import Notifier, SystemdNotifier, watchdog_interval_s
from .service import Log, Service, Settings, install_signal_handlers
from .simulate import SimBackend, check_scenario
from .store import LastTick, Store, StoreError
from .textfile import Textfile

DEFAULT_CONFIG = "/etc/gua/gua-collector.conf"
DEFAULTS = {
    "db": "/var/lib/gua/gua.db",
    "interval": "10s",
    "retention": "90d",
    "unit_retention": "400d",
    "backend": "nvml",
    "textfile": "",
    "textfile_users": "off",
}
BOOLEANS = {"on": True, "yes": True, "true": True, "1": True, "off": False, "no": False, "false": False, "0": False}

# Exit codes, one per problem (documented in gua-collector(8)).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_DB_PATH = 3
EXIT_PERMISSION = 4
EXIT_NOT_GUA = 5
EXIT_NEWER = 6
EXIT_CORRUPT = 7
EXIT_LOCKED = 8
EXIT_UNAVAILABLE = 9
EXIT_CHECK_FAILED = 10
MAX_TICKS = 1_000_000_000  # 300 years at 10 s: more is a typo
MAX_INTERVAL_MS = 3_600_000
STORE_EXIT = {
    "path": EXIT_DB_PATH,
    "permission": EXIT_PERMISSION,
    "not_sqlite": EXIT_NOT_GUA,
    "not_gua": EXIT_NOT_GUA,
    "newer": EXIT_NEWER,
    "corrupt": EXIT_CORRUPT,
    "locked": EXIT_LOCKED,
    "transient": EXIT_UNAVAILABLE,
}

EPILOG = """\
exit status: 0 stopped cleanly, 2 bad option or config, 3 database directory
missing, 4 permission denied, 5 not a gua database, 6 database schema newer
than this collector, 7 corrupt database, 8 another collector holds the
database, 9 database unusable for now (disk full, I/O error; only with --ticks:
the service waits instead), 10 --check found a FAIL, 1 internal error.
"""


class UsageError(Exception):
    """A bad option or config value."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


@dataclass(frozen=True)
class Options:
    """Validated options."""

    db: str
    interval_ms: int
    retention_ms: int
    backend: str  # 'nvml' or 'simulate:SCENARIO'
    ticks: int | None
    start_ms: int | None
    textfile: str  # '' = off
    check: bool = False
    textfile_users: bool = False  # publish per-user series (user names) in the textfile
    unit_retention_ms: int = 400 * 86_400_000  # per-unit rollups (hour_unit, hour_unit_hist)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep --help within 80 columns on any terminal, as the man page does."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=min(80, shutil.get_terminal_size().columns), max_help_position=28)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gua-collector",
        description="Record NVML GPU telemetry into SQLite for gua-report. Runs in the\n"
        "foreground; systemd (gua-collector.service) is its lifecycle.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--config", metavar="FILE",
                        help=f"INI file with a [collector] section (default {DEFAULT_CONFIG} if present)")
    parser.add_argument("--db", metavar="PATH", help=f"database file (default {DEFAULTS['db']})")
    parser.add_argument("--interval", metavar="DURATION", help="time between ticks, e.g. 10s, 1m (default 10s)")
    parser.add_argument("--retention", metavar="DURATION", help="keep raw samples this long, e.g. 90d (default 90d)")
    parser.add_argument("--unit-retention", metavar="DURATION",
                        help="keep per-unit (Slurm job, container) hourly rollups this long, at least --retention "
                        "(default 400d); per-GPU and per-user rollups are kept for ever")
    parser.add_argument("--backend", metavar="BACKEND",
                        help="nvml (default) or simulate[:SCENARIO] (lab, lab8, mig, faults, hang, late, gpm)")
    parser.add_argument(
        "--textfile", metavar="FILE.prom",
        help="also write Prometheus metrics here each tick, for node_exporter's textfile collector "
        "(e.g. /run/gua-collector/gua.prom, which the deb links into node-exporter's directory; default off)",
    )
    parser.add_argument(
        "--textfile-users", metavar="on|off",
        help="also publish per-user series (user names) in the textfile, which then becomes 0640 "
        "(default off: GPU-level series only, 0644)",
    )
    parser.add_argument(
        "--ticks", metavar="N", type=int,
        help="stop after N ticks; with a simulated backend, on a simulated clock (fast-forward)",
    )
    parser.add_argument("--start", metavar="TIME",
                        help="simulated clock start (ISO date/time, UTC unless given); default: ends now")
    parser.add_argument("--check", action="store_true",
                        help="check that collection can work on this host (NVML, GPUs, /proc, database, clock), "
                        "print one line per fact and exit; records nothing")
    parser.add_argument("--version", action="version", version=f"gua-collector {__version__}")
    return parser


def parse_options(argv: list[str]) -> Options:
    """Merge defaults, config file and flags; raise UsageError on anything invalid."""
    args = build_parser().parse_args(argv)
    values = dict(DEFAULTS)
    values.update(_read_config(args.config))
    for key in DEFAULTS:
        flag = getattr(args, key)
        if flag is not None:
            values[key] = flag
    try:
        interval_ms = parse_duration_ms(values["interval"])
        retention_ms = parse_duration_ms(values["retention"])
        unit_retention_ms = parse_duration_ms(values["unit_retention"])
    except ValueError as error:
        raise UsageError(str(error)) from None
    if interval_ms < 1000:
        raise UsageError(f"interval must be at least 1s, got {values['interval']!r}")
    if interval_ms > MAX_INTERVAL_MS:
        raise UsageError(f"interval must be at most 1h, got {values['interval']!r}")
    if retention_ms < interval_ms:
        raise UsageError("retention must be longer than the interval")
    if unit_retention_ms < retention_ms:
        # Hours rolled up but still raw would lose their units before their samples.
        raise UsageError(f"unit_retention ({values['unit_retention']}) must be at least retention "
                         f"({values['retention']})")
    backend = values["backend"].strip()
    if backend == "simulate":
        backend = "simulate:lab"
    if backend.startswith("simulate:"):
        try:
            check_scenario(backend.split(":", 1)[1])
        except ValueError as error:
            raise UsageError(str(error)) from None
    elif backend != "nvml":
        raise UsageError(f"unknown backend {backend!r} (use nvml or simulate[:SCENARIO])")
    if args.ticks is not None and not 1 <= args.ticks <= MAX_TICKS:
        raise UsageError(f"--ticks must be between 1 and {MAX_TICKS}")
    start_ms = _parse_start(args.start) if args.start else None
    if start_ms is not None and not (backend.startswith("simulate:") and args.ticks):
        raise UsageError("--start needs a simulated backend and --ticks")
    textfile = values["textfile"].strip()
    if textfile and not textfile.endswith(".prom"):
        raise UsageError(f"textfile must end in .prom (node_exporter reads only those): {textfile!r}")
    users = BOOLEANS.get(values["textfile_users"].strip().lower())
    if users is None:
        raise UsageError(f"textfile_users must be on or off, got {values['textfile_users']!r}")
    if args.check and args.ticks is not None:
        raise UsageError("--check records nothing: it takes no --ticks")
    return Options(values["db"], interval_ms, retention_ms, backend, args.ticks, start_ms, textfile, args.check,
                   textfile_users=users, unit_retention_ms=unit_retention_ms)


def _read_config(path: str | None) -> dict[str, str]:
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG):
            return {}
        path = DEFAULT_CONFIG
    # No interpolation: a '%' in a value (a path, a label) is just a character.
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as error:
        raise UsageError(f"cannot read config {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"config {path}: not UTF-8 text (byte {error.start})") from None
    except configparser.Error as error:
        raise UsageError(f"config {path}: {str(error).splitlines()[0]}") from None
    if not parser.has_section("collector"):
        return {}
    section = dict(parser.items("collector"))
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"config {path}: unknown key {unknown[0]!r} in [collector]")
    return section


def _parse_start(text: str) -> int:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--start: not an ISO date/time: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        ms = int(when.timestamp() * 1000)
    except (OverflowError, OSError, ValueError):
        raise UsageError(f"--start: out of range: {text!r}") from None
    if ms < 0:
        raise UsageError(f"--start: before 1970: {text!r}")
    return ms


def make_backend(options: Options, clock: Clock) -> Backend:
    if options.backend.startswith("simulate:"):
        return SimBackend(options.backend.split(":", 1)[1], clock)
    from .nvml_backend import NvmlBackend

    return NvmlBackend()


def _simulated_start(options: Options, last: LastTick | None, log: Log) -> int:
    """Where a fast-forward run's clock starts: never inside time the DB already holds."""
    ticks = options.ticks or 0
    start = options.start_ms
    if start is None:
        start = max(0, RealClock().wall_ms() - ticks * options.interval_ms)
    if last is not None and start <= last.ts_ms:
        shifted = last.ts_ms + options.interval_ms
        log.info(f"the database already holds ticks up to {_iso(last.ts_ms)}; the simulated run starts after them")
        start = shifted
    return start


def _check(options: Options) -> int:
    clock = RealClock()
    findings = run_checks(options.db, options.interval_ms, options.textfile, make_backend(options, clock),
                          clock.wall_ms(), Host(), textfile_users=options.textfile_users)
    sys.stdout.write(render(findings))
    return EXIT_CHECK_FAILED if any(f.level == FAIL for f in findings) else EXIT_OK


# How long systemd may wait for a schema upgrade (EXTEND_TIMEOUT_USEC): one
# of a year's history took 150 s on a 2-core machine, past the 90 s start
# timeout, and a killed upgrade rolls back and starts over at each restart.
UPGRADE_TIMEOUT_S = 1800


def _open_store(path: str, clock: Clock, notifier: Notifier, log: Log) -> Store:
    def on_upgrade(old: int, new: int) -> None:
        # Also covers the watchdog, armed when READY=1 went out earlier (a disk that was full at start).
        notifier.send(f"EXTEND_TIMEOUT_USEC={UPGRADE_TIMEOUT_S * 1_000_000}")
        notifier.send(f"STATUS=upgrading the database from schema {old} to {new}")
        log.info(f"upgrading {path} from schema {old} to {new}; this may take minutes on a long history")

    return Store.open(path, now_ms=clock.wall_ms(), on_upgrade=on_upgrade)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str] | None = None) -> int:
    log = Log()
    try:
        options = parse_options(sys.argv[1:] if argv is None else argv)
    except UsageError as error:
        print(f"gua-collector: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if options.check:
        return _check(options)
    fast_forward = options.backend.startswith("simulate:") and options.ticks is not None
    store: Store | Callable[[], Store]
    notifier = SystemdNotifier()
    try:
        if fast_forward:
            # A one-off run: open now (no waiting) to start the simulated clock after stored time.
            store = Store.open(options.db, now_ms=RealClock().wall_ms())
            clock: Clock = SimClock(_simulated_start(options, store.last_tick(), log))
        else:
            clock = RealClock()
            store = partial(_open_store, options.db, clock, notifier, log)
    except StoreError as error:
        print(f"gua-collector: error: {error}", file=sys.stderr)
        return STORE_EXIT[error.kind]
    stop = threading.Event()
    service = Service(
        Settings(
            interval_s=options.interval_ms / 1000,
            retention_ms=options.retention_ms,
            unit_retention_ms=options.unit_retention_ms,
            ticks=options.ticks,
            hostname=socket.gethostname(),
            version=__version__,
            wait_for_db=not fast_forward,
        ),
        store,
        make_backend(options, clock),
        clock,
        notifier,
        log,
        stop,
        None if fast_forward else watchdog_interval_s(os.environ),
        Textfile(options.textfile, users=options.textfile_users, interval_s=options.interval_ms / 1000,
                 version=__version__, backend=options.backend) if options.textfile else None,
    )
    install_signal_handlers(stop, notifier.send, service.on_signal)
    try:
        return service.run()
    except StoreError as error:
        print(f"gua-collector: error: {error}", file=sys.stderr)
        return STORE_EXIT[error.kind]
    except Exception as error:  # noqa: BLE001 -- a bug: one line for the journal, and a non-zero exit for Restart=
        log.error(f"internal error: {type(error).__name__}: {error}")
        return EXIT_INTERNAL
    finally:
        service.close()


if __name__ == "__main__":
    sys.exit(main())
