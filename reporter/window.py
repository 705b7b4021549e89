"""Parsing of times, durations, thresholds and time zones; no database here.

All instants are UTC epoch milliseconds, as in the database. A report window
is half-open, [since_ms, until_ms), over each tick's `ts_ms`: that makes a
whole UTC hour h exactly the ticks of the rollup row `hour = h`.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, date, datetime, timedelta, tzinfo

HOUR_MS = 3_600_000
QUARTER_MS = 900_000  # the rollups' finest grain: the offset of every zone in use today is whole quarter hours
DAY_MS = 24 * HOUR_MS

# Instants gua-report accepts: from 1900 (long before any gua database, and
# far enough before 1970 that `--since 1970-01-01` works in every zone) to
# the start of year 9999, so that formatting one in any zone (offsets up to
# +-26 h) stays inside datetime's years 1..9999 and SQLite's 64-bit integers.
MIN_MS = -2_208_988_800_000  # 1900-01-01T00:00:00Z
MAX_MS = 253_370_764_800_000  # 9999-01-01T00:00:00Z
# Thresholds above any GPU's memory make no sense; this keeps the byte count
# far inside SQLite's 64-bit integers whatever the user typed.
MAX_BYTES = 10**15

# ASCII digits only: \d would also take Arabic-Indic or full-width digits,
# and float() would take 'nan', 'inf', '1e3' and '1_000'.
_NUMBER = r"([0-9]+)(?:\.([0-9]+))?"
# A systemd-style time span: one or more <number><unit>, e.g. 90m, 1h30m, 2 days.
# Letters are spelled out in both cases rather than with re.IGNORECASE: that
# flag makes a [a-z] class match U+212A KELVIN SIGN and U+017F (long s) too,
# and compiling it costs ~5 ms of every start (Unicode case folding tables).
_SPAN_PART = re.compile(_NUMBER + r"\s*([a-zA-Z]+)\s*")
_UNIT_MS = {
    "s": 1000, "sec": 1000, "secs": 1000, "second": 1000, "seconds": 1000,
    "m": 60_000, "min": 60_000, "mins": 60_000, "minute": 60_000, "minutes": 60_000,
    "h": HOUR_MS, "hr": HOUR_MS, "hrs": HOUR_MS, "hour": HOUR_MS, "hours": HOUR_MS,
    "d": DAY_MS, "day": DAY_MS, "days": DAY_MS,
    "w": 7 * DAY_MS, "week": 7 * DAY_MS, "weeks": 7 * DAY_MS,
}
# More digits than this cannot be a window inside [MIN_MS, MAX_MS] in any unit;
# refusing them early also keeps int() away from its 4300-digit limit.
_MAX_DIGITS = 18
_FRACTION_DIGITS = 9

_SIZE = re.compile(r"^\s*" + _NUMBER + r"\s*([kmgtKMGT][iI]?[bB]?|[bB])?\s*$")  # ASCII units, as _SPAN_PART
_SIZE_FACTOR = {
    "b": 1,
    "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mi": 2**20, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "ti": 2**40, "tib": 2**40,
}
_PERCENT = re.compile(r"^\s*" + _NUMBER + r"\s*%?\s*$")
_CLOCK = re.compile(r"^([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))?$")
_DAY_WORDS = {"today": 0, "yesterday": -1, "tomorrow": 1}

_TIME_FORMS = (
    "use a duration before --until (90m, 1h30m, 7d), -2h or '2h ago' (before now), "
    "now, today, yesterday, an ISO date (2024-05-01) or 'YYYY-MM-DD HH:MM[:SS]'"
)


class WindowError(ValueError):
    """A value the user typed cannot be understood (exit code 2)."""


def _scaled(whole: str, frac: str | None, factor: int, text: str) -> int:
    """whole.frac x factor, exactly, in integers (no float rounding or overflow)."""
    if len(whole) > _MAX_DIGITS:
        raise WindowError(f"{text!r} is too large")
    frac = (frac or "")[:_FRACTION_DIGITS]
    return int(whole) * factor + int(frac or "0") * factor // 10 ** len(frac)


def parse_duration_ms(text: str) -> int | None:
    """'90m', '12h', '7d', '2w', '1h30m', '2 days' -> milliseconds; None when it is not a duration.

    Raises WindowError for a duration too long to be a window (so the caller
    does not go on to call it an unreadable time).
    """
    t = text.strip()
    pos, total, parts = 0, 0, []
    while pos < len(t):
        m = _SPAN_PART.match(t, pos)
        if not m or m.group(3).lower() not in _UNIT_MS:
            return None
        parts.append(m)
        pos = m.end()
    if not parts:
        return None
    for m in parts:
        total += _scaled(m.group(1), m.group(2), _UNIT_MS[m.group(3).lower()], text)
    if total > MAX_MS - MIN_MS:
        raise WindowError(f"duration {text.strip()!r} is longer than gua-report can read")
    return total


def _checked(ms: int, text: str) -> int:
    if ms < MIN_MS:
        raise WindowError(f"{text.strip()!r} is before 1900-01-01, the earliest time gua-report reads")
    if ms >= MAX_MS:
        raise WindowError(f"{text.strip()!r} is after 9999-01-01, the latest time gua-report reads")
    return ms


def _midnight_ms(now_ms: int, tz: tzinfo, days: int) -> int:
    """Local midnight starting the day `days` away from today in `tz`."""
    d = datetime.fromtimestamp(now_ms / 1000, tz).date() + timedelta(days=days)
    return int(datetime(d.year, d.month, d.day, tzinfo=tz).timestamp() * 1000)


def _calendar_ms(text: str, now_ms: int, tz: tzinfo) -> int | None:
    """A date, a date and time (ISO or systemd.time(7)), or a time of day today."""
    words = text.split()
    # systemd.time(7) allows a zone after the time: "2024-05-01 09:30 UTC",
    # "... Europe/Berlin". The last word names one if it is not a time itself.
    if len(words) > 1 and not words[-1][:1].isdigit() and words[-1][:1] not in "+-":
        try:
            tz = zone(words[-1])[0]
        except WindowError:
            return None
        text = " ".join(words[:-1])
    try:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
            d = date.fromisoformat(text)
            dt = datetime(d.year, d.month, d.day)
        elif m := _CLOCK.match(text):
            today = datetime.fromtimestamp(now_ms / 1000, tz).date()
            dt = datetime(today.year, today.month, today.day,
                          int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
        else:
            dt = datetime.fromisoformat(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=tz)
        return int(dt.timestamp() * 1000)
    except (ValueError, OverflowError):
        return None


def parse_instant(text: str, now_ms: int, tz: tzinfo, base_ms: int | None = None) -> int:
    """A --since/--until value -> UTC epoch ms.

    A plain duration (7d) is that long before `base_ms` (the --until of a
    --since; default now). journalctl's forms count from now: 'now',
    'today'/'yesterday'/'tomorrow' (local midnight), '-2h' and '2h ago',
    '@EPOCH'. A date, a 'YYYY-MM-DD HH:MM[:SS]' or an ISO datetime without an
    offset or zone is read in `tz`, so `--since 2024-05-01` means local
    midnight, as a person would expect. A time after now ('+2h') is refused:
    nothing was recorded then, and a typo of '-' should not pass silently.
    """
    t = text.strip()
    low = t.lower()
    if low == "now":
        return _checked(now_ms, text)
    if low in _DAY_WORDS:
        return _checked(_midnight_ms(now_ms, tz, _DAY_WORDS[low]), text)
    epoch = re.fullmatch("@" + _NUMBER, t)
    if epoch:
        return _checked(_scaled(epoch.group(1), epoch.group(2), 1000, text), text)
    if t[:1] in "+-" and t[1:2].isdigit():
        dur = parse_duration_ms(t[1:])
        if dur is not None:
            if t[0] == "+":
                raise WindowError(f"{t!r} is in the future: use now or a time before it")
            return _checked(now_ms - dur, text)
    if low.endswith(" ago"):
        dur = parse_duration_ms(t[:-4])
        if dur is not None:
            return _checked(now_ms - dur, text)
    dur = parse_duration_ms(t)
    if dur is not None:
        return _checked((now_ms if base_ms is None else base_ms) - dur, text)
    ms = _calendar_ms(t, now_ms, tz)
    if ms is None:
        raise WindowError(f"cannot read time {t!r}: {_TIME_FORMS}")
    return _checked(ms, text)


def parse_percent_permille(text: str) -> int:
    """'10', '10%', '7.5' -> permille (100, 100, 75)."""
    m = _PERCENT.match(text)
    if not m:
        raise WindowError(f"cannot read percentage {text!r} (use e.g. 10 or 7.5%)")
    if len(m.group(1).lstrip("0")) > 3 or _scaled(m.group(1), m.group(2), 1000, text) > 100_000:
        raise WindowError(f"percentage {text!r} is not between 0 and 100")
    # permille, rounded half up: 7.55 % -> 76
    return (_scaled(m.group(1), m.group(2), 100, text) + 5) // 10


def parse_bytes(text: str) -> int:
    """'100MB', '100 MiB', '1GB', '0' -> bytes. MB = 10^6, MiB = 2^20.

    The unit is required (except for 0, the same in every unit): '5' could
    mean bytes, MB or GB, and guessing wrong silently changes every
    idle-held figure by a factor of a thousand or more.
    """
    m = _SIZE.match(text)
    if not m:
        raise WindowError(f"cannot read size {text!r}: use e.g. 100MB, 512MiB, 1GB")
    if m.group(3) is None:
        if not (m.group(1) + (m.group(2) or "")).strip("0"):
            return 0
        raise WindowError(f"size {text!r} has no unit: write e.g. {text.strip()}MB or {text.strip()}MiB")
    value = _scaled(m.group(1), m.group(2), _SIZE_FACTOR[m.group(3).lower()], text)
    if value > MAX_BYTES:
        raise WindowError(f"size {text!r} is too large (at most 1000TB)")
    return value


def local_zone() -> tuple[tzinfo, str]:
    """The host's zone as a ZoneInfo (with DST rules), and a name to print."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # here: `--tz UTC` and --help need no zoneinfo

    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name), name
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            key = target.split("zoneinfo/", 1)[1]
            return ZoneInfo(key), key
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime"), "localtime"
    except (OSError, ValueError, ZoneInfoNotFoundError):
        return UTC, "UTC"


def zone(name: str | None) -> tuple[tzinfo, str]:
    """--tz NAME -> zone; None -> the host's local zone."""
    if name is None:
        return local_zone()
    if name.upper() in ("UTC", "Z"):
        return UTC, "UTC"
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name), name
    except (ZoneInfoNotFoundError, ValueError):
        raise WindowError(f"unknown time zone {name!r} (use an IANA name like Europe/Berlin)") from None


def offset_ms(tz: tzinfo, ts_ms: int) -> int:
    dt = datetime.fromtimestamp(ts_ms / 1000, tz)
    off = dt.utcoffset() or timedelta(0)
    return int(off.total_seconds() * 1000)


class Segment:
    """From `start_ms` (inclusive) the zone is `offset_ms` ahead of UTC."""

    __slots__ = ("start_ms", "offset_ms")

    def __init__(self, start_ms: int, offset_ms: int) -> None:
        self.start_ms = start_ms
        self.offset_ms = offset_ms

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Segment) and (self.start_ms, self.offset_ms) == (other.start_ms, other.offset_ms)

    def __hash__(self) -> int:
        return hash((self.start_ms, self.offset_ms))

    def __repr__(self) -> str:
        return f"Segment({self.start_ms}, {self.offset_ms})"


def offset_segments(tz: tzinfo, since_ms: int, until_ms: int) -> list[Segment]:
    """The zone's UTC offsets over the window, as few segments as there are changes.

    Probing once a day and bisecting on a change costs ~365 calls per year of
    window, which lets the SQL turn ts_ms into a local hour with a short CASE.
    """
    segments = [Segment(since_ms, offset_ms(tz, since_ms))]
    t = since_ms
    while t < until_ms:
        nxt = min(t + DAY_MS, until_ms)
        off = offset_ms(tz, nxt)
        if off != segments[-1].offset_ms:
            lo, hi = t, nxt  # offset(lo) == previous, offset(hi) == new
            while hi - lo > 1000:
                mid = (lo + hi) // 2
                if offset_ms(tz, mid) == segments[-1].offset_ms:
                    lo = mid
                else:
                    hi = mid
            segments.append(Segment(hi // 1000 * 1000, off))
        t = nxt
    return segments


def fmt_local(ts_ms: int, tz: tzinfo, seconds: bool = False) -> str:
    dt = datetime.fromtimestamp(ts_ms / 1000, tz)
    return dt.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def iso_utc(ts_ms: int) -> str:
    dt = datetime.fromtimestamp(ts_ms / 1000, UTC)
    ms = ts_ms % 1000
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{ms:03d}Z" if ms else f"{base}Z"


def fmt_duration(ms: int) -> str:
    """Compact human duration: 45s, 12m, 3h05m, 2d04h."""
    s = ms // 1000
    if s < 60:
        return f"{s}s"
    m = s // 60
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"
